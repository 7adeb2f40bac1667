"""Federated jobs as a coordinator feature: tables, the round engine (run by the leader)
and routes (see :mod:`lepton.coordinator.feature`).

The service builds :class:`FLFeature` after the model registry (the engine stores
weights and updates as registry blobs and registers final models there). Its tables come
with every feature's from the store's migrations, checked at start-up; the upload key is
read (or made) in :meth:`FLFeature.start`, once they exist. Nothing here needs the HTTP server of
this process: train tasks name ``base_url()`` (``http.public_url``, or this process's
server), so a coordinator with HTTP off runs jobs whose uploads another replica serves
(with neither HTTP nor ``public_url`` it runs no rounds: ``lead=False``).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Mapping, Sequence

from fastapi import APIRouter
from prometheus_client import CollectorRegistry
from sqlalchemy import MetaData

from lepton.coordinator.config import Config
from lepton.coordinator.feature import BaseFeature, LeaderLoop
from lepton.coordinator.fl import tables
from lepton.coordinator.fl.credentials import KEY_BYTES, KEY_NAME, UploadSigner
from lepton.coordinator.fl.jobs import planning
from lepton.coordinator.fl.jobs.admission import JobPolicy
from lepton.coordinator.fl.jobs.engine import FLEngine
from lepton.coordinator.fl.metrics import FLMetrics
from lepton.coordinator.fl.routes_jobs import JobsContext, make_jobs_router
from lepton.coordinator.fl.routes_uploads import UploadContext, make_upload_router
from lepton.coordinator.fl.store import FLStore
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.coordinator.scheduler import CostWeights, ThroughputEstimator
from lepton.coordinator.store import ResultOutcome, Store


class FLFeature(BaseFeature):
    """Federated jobs: their tables, the round engine and the FL routes."""

    name = "fl"

    def __init__(
        self,
        config: Config,
        store: Store,
        registry: ModelRegistry,
        metrics: CollectorRegistry,
        *,
        base_url: Callable[[], str],
        estimator: Callable[[], ThroughputEstimator],
        weights: CostWeights,
        on_submit: Callable[[], None],
        lead: bool = True,
    ) -> None:
        #: Whether this process runs the round engine when it leads (not without a base URL).
        self.lead = lead
        self.store = store
        self.fl = FLStore(store.engine)
        self.metrics = FLMetrics(metrics)
        self.policy = JobPolicy.of(config)
        self.registry = registry
        self.engine = FLEngine(
            config,
            self.fl,
            registry,
            self.metrics,
            devices=store.devices,
            tasks=store.tasks,
            results=store.results,
            cancels=store.cancels,
            base_url=base_url,
            estimator=estimator,
            weights=weights,
            on_submit=on_submit,
            policy=self.policy,
        )
        self._routers: list[APIRouter] = []

    @property
    def metadata(self) -> MetaData:
        return tables.metadata

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        signer = UploadSigner(
            self.fl.secret(KEY_NAME, lambda: secrets.token_bytes(KEY_BYTES), now=time.time())
        )
        self.engine.signer = signer
        # Train tasks get their upload credential as they are sent, never in stored params.
        self.store.tasks.add_sealer(planning.KIND, signer.seal)
        self.engine.bind(loop)
        self._routers = [
            make_upload_router(
                UploadContext(
                    store=self.fl,
                    registry=self.registry,
                    metrics=self.metrics,
                    signer=signer,
                    on_update=self.engine.wake_threadsafe,
                )
            ),
            make_jobs_router(
                JobsContext(
                    store=self.fl,
                    policy=self.policy,
                    metrics=self.metrics,
                    on_change=self.engine.wake_threadsafe,
                )
            ),
        ]

    def routers(self) -> Sequence[APIRouter]:
        return self._routers

    def leader_loops(self) -> Mapping[str, LeaderLoop]:
        return {"fl": self.engine.lead} if self.lead else {}

    def on_results(self, outcomes: Sequence[ResultOutcome]) -> None:
        self.engine.on_results(outcomes)
