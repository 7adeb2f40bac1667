"""The release registry as a coordinator feature: its tables, the publish and read routes,
the ingest of devices' update status, and ``install`` parameters for a release (see
:mod:`lepton.coordinator.feature`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fastapi import APIRouter
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import MetaData

from lepton.common.releases import load_root
from lepton.coordinator.config import Config
from lepton.coordinator.errors import UnavailableError
from lepton.coordinator.feature import BaseFeature
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.coordinator.releases import tables
from lepton.coordinator.releases.install import install_params
from lepton.coordinator.releases.records import DeviceUpdate, ReleaseRecord
from lepton.coordinator.releases.routes import make_router
from lepton.coordinator.releases.store import DeviceUpdateRepo, ReleaseStore
from lepton.coordinator.store import StateUpdate, Store
from lepton.protocol.messages import UpdateStatus
from lepton.protocol.releases import InstallParams, Root

log = logging.getLogger(__name__)

UpdateListener = Callable[[Sequence[DeviceUpdate]], None]


class ReleasesFeature(BaseFeature):
    """Releases in the coordinator's database, their bytes in the model registry's blob
    store. ``base_url()``: where devices reach this coordinator (the install URLs)."""

    name = "releases"

    def __init__(
        self,
        config: Config,
        store: Store,
        registry: ModelRegistry,
        metrics: CollectorRegistry,
        *,
        base_url: Callable[[], str],
    ) -> None:
        self.config = config.releases
        self.base_url = base_url
        self.releases = ReleaseStore(
            store.engine,
            registry,
            self.trust_root,
            work_dir=Path(config.data_dir).expanduser() / "releases" / "incoming",
        )
        self.updates = DeviceUpdateRepo(store.engine)
        self.published = Counter(
            "lepton_release_publishes",
            "Release bundles sent to POST /v1/releases, by outcome (published, unchanged, or"
            " the reason it was refused)",
            ["outcome"],
            registry=metrics,
        )
        self.update_reports = Counter(
            "lepton_device_update_reports",
            "Changed update statuses devices reported, by outcome",
            ["outcome"],
            registry=metrics,
        )
        self._listeners: list[UpdateListener] = []
        self._lock = threading.Lock()

    @property
    def metadata(self) -> MetaData:
        return tables.metadata

    def routers(self) -> Sequence[APIRouter]:
        return [
            make_router(
                self.releases,
                max_bytes=self.config.max_bundle_bytes,
                enabled=lambda: bool(self.config.root_file),
                on_outcome=lambda outcome: self.published.labels(outcome).inc(),
            )
        ]

    # ------------------------------------------------------------------ trust

    def trust_root(self) -> Root:
        """The root bundles are checked against, read from ``[releases] root_file`` now
        (``UnavailableError`` when none is configured; ``ReleaseRefused`` for a bad one)."""
        if not self.config.root_file:
            raise UnavailableError("release trust root", "set [releases] root_file")
        raw = Path(self.config.root_file).expanduser().read_bytes()
        return load_root(raw, trusted=None, now=time.time())

    def install_params(
        self, record: ReleaseRecord, *, health_deadline_s: float = 300.0, rollout: str | None = None
    ) -> InstallParams:
        """An ``install`` task's parameters for ``record``, at this coordinator's URL."""
        return install_params(
            record, self.base_url(), health_deadline_s=health_deadline_s, rollout=rollout
        )

    # ------------------------------------------------------------------ device updates

    def add_update_listener(self, cb: UpdateListener) -> None:
        """Call ``cb`` with the device updates that changed, from the ingest's worker
        thread, after they are stored (``cb`` must return at once)."""
        with self._lock:
            self._listeners.append(cb)

    def on_states(self, states: Sequence[StateUpdate]) -> None:
        """Births were applied (worker thread): store their update status where it changed
        and tell the listeners."""
        items: list[tuple[str, UpdateStatus]] = [
            (u.device_id, u.message.update)
            for u in states
            if u.message.state == "online" and u.message.update is not None
        ]
        if not items:
            return
        changed = self.updates.put_many(items, received_at=max(u.received_at for u in states))
        if not changed:
            return
        for d in changed:
            self.update_reports.labels(d.outcome).inc()
        with self._lock:
            listeners = list(self._listeners)
        for cb in listeners:
            try:
                cb(changed)
            except Exception:  # one listener's bug must not stop the ingest
                log.exception("device update listener %r failed", cb)
