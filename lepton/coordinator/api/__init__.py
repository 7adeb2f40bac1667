"""The coordinator's HTTP API (FastAPI) and the server that runs it."""

from lepton.coordinator.api.app import ApiContext, create_app

__all__ = ["ApiContext", "create_app"]
