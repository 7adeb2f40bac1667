"""Authentication as a coordinator feature: its tables, the audit route, the audit pruning
loop, and the :class:`~lepton.coordinator.auth.guard.Authenticator` the HTTP app puts in
front of every route."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence

from fastapi import APIRouter
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, MetaData

from lepton.coordinator.auth import tables
from lepton.coordinator.auth.guard import Authenticator
from lepton.coordinator.auth.metrics import AuthMetrics
from lepton.coordinator.auth.routes import make_router
from lepton.coordinator.auth.store import AuthStore
from lepton.coordinator.config import AuthConfig
from lepton.coordinator.feature import BaseFeature, LeaderLoop
from lepton.coordinator.store.records import Lease

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 3600.0


class AuthFeature(BaseFeature):
    """Tokens, device identities and the audit log (see :mod:`lepton.coordinator.auth`)."""

    name = "auth"

    def __init__(self, config: AuthConfig, engine: Engine, registry: CollectorRegistry) -> None:
        self.config = config
        self.store = AuthStore(engine)
        self.metrics = AuthMetrics(registry)
        self.authenticator = Authenticator(self.store, self.metrics, insecure=config.insecure)

    @property
    def metadata(self) -> MetaData | None:
        return tables.metadata

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.config.insecure:
            log.warning(
                "AUTHENTICATION IS OFF (--insecure): anyone who reaches the API is an"
                " administrator of the whole fleet. Never run like this outside a private"
                " machine."
            )

    def routers(self) -> Sequence[APIRouter]:
        return [make_router(self.store)]

    def leader_loops(self) -> Mapping[str, LeaderLoop]:
        if self.config.audit_retention_days <= 0:
            return {}
        return {"audit-prune": self._prune}

    async def _prune(self, _lease: Lease) -> None:
        keep_s = self.config.audit_retention_days * 86400.0
        while True:
            n = await asyncio.to_thread(self.store.prune_audit, time.time() - keep_s)
            if n:
                log.info("audit log: %d records older than %g days pruned", n, keep_s / 86400)
            await asyncio.sleep(PRUNE_EVERY_S)
