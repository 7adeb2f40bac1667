"""The control worker: what a revoked device sent before the ingest knew, still queued, is
not applied (a late birth must not bring it back online)."""

from __future__ import annotations

import time
import uuid
from typing import Any, cast

from lepton.coordinator.metrics import Metrics
from lepton.coordinator.runtime.control import Control, per_device_order
from lepton.coordinator.runtime.ingest import Inbound, Inbox
from lepton.coordinator.store import Store
from lepton.protocol.messages import Result, State, TaskAck


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


def test_a_state_after_the_same_devices_result_is_applied_after_it() -> None:
    now = time.time()
    online, offline = State(state="online"), State(state="offline", reason="shutdown")
    result = Result(task_id="t1", status="succeeded")
    ack = TaskAck(task_id="t2", accepted=True)
    a1, b1 = Inbound("a", online, now), Inbound("b", online, now)
    a_res, b_ack = Inbound("a", result, now), Inbound("b", ack, now)
    a_off, b_off = Inbound("a", offline, now), Inbound("b", offline, now)
    # Another device's state never cuts; a device's own state after its result or ack does.
    assert per_device_order([a1, b1, a_res, b1]) == [[a1, b1, a_res, b1]]
    assert per_device_order([a1, a_res, b_ack, a_off]) == [[a1, a_res, b_ack], [a_off]]
    assert per_device_order([a_res, b_ack, b_off, a_off]) == [[a_res, b_ack], [b_off, a_off]]
    assert per_device_order([]) == []
