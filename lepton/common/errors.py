"""The project's one error root, and the configuration error every loader raises."""

from __future__ import annotations


class LeptonError(Exception):
    """Root of every error Lepton raises on purpose."""


class ConfigError(LeptonError):
    """Configuration is invalid.

    ``key`` names the offending setting (dotted: ``broker.port``) when there is one, and
    ``source`` says where its value came from (a file path, ``env LEPTON_BROKER_PORT``,
    ``flag --broker-port``, ``default``) when it is known.
    """

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        self.key = key
        self.source = source
        super().__init__(message)
