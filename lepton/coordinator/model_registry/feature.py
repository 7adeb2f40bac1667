"""The model registry as a coordinator feature: its tables, and routes serving blobs by
content address and model metadata (see :mod:`lepton.coordinator.feature`)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from fastapi import APIRouter
from sqlalchemy import Engine, MetaData

from lepton.coordinator.feature import BaseFeature
from lepton.coordinator.model_registry import tables
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.coordinator.model_registry.routes import make_router


class ModelRegistryFeature(BaseFeature):
    """Models and blobs on the coordinator's database and data directory."""

    name = "models"

    def __init__(self, engine: Engine, data_dir: str | os.PathLike[str]) -> None:
        #: The registry (other features store their blobs here: federated jobs).
        self.registry = ModelRegistry(engine, data_dir, create_tables=False)

    @property
    def metadata(self) -> MetaData:
        return tables.metadata

    def routers(self) -> Sequence[APIRouter]:
        return [make_router(self.registry)]
