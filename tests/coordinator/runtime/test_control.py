"""The control worker: what a revoked device sent before the ingest knew, still queued, is
not applied (a late birth must not bring it back online)."""

from __future__ import annotations

import time
import uuid
from typing import Any, cast

from lepton.coordinator.metrics import Metrics
from lepton.coordinator.runtime.control import Control
from lepton.coordinator.runtime.ingest import Inbound, Inbox
from lepton.coordinator.store import Store
from lepton.protocol.messages import State


async def test_queued_messages_of_a_revoked_device_are_not_applied(store: Store) -> None:
    metrics = Metrics()
    gone, kept = f"gone-{uuid.uuid4().hex[:8]}", f"kept-{uuid.uuid4().hex[:8]}"
    revoked = {gone}
    control = Control(
        store.devices,
        store.tasks,
        store.results,
        cast(Any, None),  # no results in the batch: the link is not used
        metrics,
        inbox=Inbox(),
        fleet="default",
        revoked=revoked,
    )
    now = time.time()
    birth = State(state="online", agent_version="1")
    await control.process([Inbound(gone, birth, now), Inbound(kept, birth, now)])
    assert store.devices.device_exists(kept)
    assert not store.devices.device_exists(gone)
    assert metrics.value("lepton_ingest_rejects_total", {"reason": "revoked_device"}) == 1
