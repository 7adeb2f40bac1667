"""Wiring federated jobs into the coordinator service: tables, engine, routes.

The service calls :func:`build_fl` next to the model registry (the engine stores weights
and updates as registry blobs and registers final models there). The tables are created
under the store's start-up lock, like the registry's, since replicas may start together.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from typing import TYPE_CHECKING

from fastapi import APIRouter

from lepton.coordinator.fl import tables
from lepton.coordinator.fl.credentials import KEY_BYTES, KEY_NAME, UploadSigner
from lepton.coordinator.fl.jobs import planning
from lepton.coordinator.fl.jobs.admission import JobPolicy
from lepton.coordinator.fl.jobs.engine import FLEngine
from lepton.coordinator.fl.metrics import FLMetrics
from lepton.coordinator.fl.routes_jobs import JobsContext, make_jobs_router
from lepton.coordinator.fl.routes_uploads import UploadContext, make_upload_router
from lepton.coordinator.fl.store import FLStore

if TYPE_CHECKING:
    from lepton.coordinator.model_registry.registry import ModelRegistry
    from lepton.coordinator.service import Coordinator


def build_fl(c: Coordinator, registry: ModelRegistry) -> tuple[FLEngine, list[APIRouter]]:
    """The round engine and the FL routes of coordinator ``c``."""
    c.store.create_schema(tables.metadata)
    fl = FLStore(c.store.engine)
    metrics = FLMetrics(c.metrics.registry)
    policy = JobPolicy.of(c.config)
    signer = UploadSigner(
        fl.secret(KEY_NAME, lambda: secrets.token_bytes(KEY_BYTES), now=time.time())
    )
    # Train tasks get their upload credential as they are sent, never in stored params.
    c.store.add_sealer(planning.KIND, signer.seal)

    def wake_scheduler() -> None:
        with contextlib.suppress(RuntimeError):
            c.scheduler.wake()

    engine = FLEngine(
        c.config,
        c.store,
        fl,
        registry,
        metrics,
        base_url=c.base_url,
        estimator=lambda: c.scheduler.estimator,
        weights=c.scheduler.weights,
        on_submit=wake_scheduler,
        policy=policy,
        signer=signer,
    )
    routes = [
        make_upload_router(
            UploadContext(
                store=fl,
                registry=registry,
                metrics=metrics,
                signer=signer,
                on_update=engine.wake_threadsafe,
            )
        ),
        make_jobs_router(
            JobsContext(store=fl, policy=policy, metrics=metrics, on_change=engine.wake_threadsafe)
        ),
    ]
    return engine, routes
