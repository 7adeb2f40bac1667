"""Ingest validation without a broker: every input is routed or rejected by reason, never raised."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton.coordinator.metrics import Metrics
from lepton.coordinator.runtime.ingest import Inbox, Ingest, subscriptions
from lepton.protocol import codec, topics
from lepton.protocol.messages import CapacityReport, Result, State, TaskAck
from tests.coordinator.factories import report


class Harness:
    def __init__(self) -> None:
        self.metrics = Metrics()
        self.capacity: list[tuple[str, CapacityReport]] = []
        self.inbox = Inbox(limit=10)
        self.ingest = Ingest(
            "default",
            self.metrics,
            on_capacity=lambda d, r, _t: self.capacity.append((d, r)),
            inbox=self.inbox,
        )

    def rejects(self, reason: str) -> float:
        return self.metrics.value("lepton_ingest_rejects_total", {"reason": reason})

    def send(
        self, channel: str, payload: bytes, device: str = "dev-1", fleet: str = "default"
    ) -> None:
        self.ingest.handle(topics.device_topic(fleet, device, channel), payload)


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_valid_messages_are_routed(h: Harness) -> None:
    h.send("capacity", codec.encode(report()))
    h.send("state", codec.encode(State(state="online")))
    h.send("task-ack", codec.encode(TaskAck(task_id="t1", accepted=True)))
    h.send("result", codec.encode(Result(task_id="t1", status="succeeded")))
    assert [d for d, _ in h.capacity] == ["dev-1"]
    batch = h.inbox.take_all()
    assert [type(m.message) for m in batch] == [State, TaskAck, Result]
    assert all(m.device_id == "dev-1" for m in batch)
    assert h.metrics.value("lepton_ingest_messages_total", {"channel": "capacity"}) == 1


@pytest.mark.parametrize(
    ("channel", "payload", "reason"),
    [
        ("capacity", b"\xc1\xc1\xc1", "malformed"),
        ("capacity", b"", "empty"),
        ("result", b"\x00" * (codec.MAX_MESSAGE_BYTES + 1), "oversized"),
        (
            "state",
            msgspec.msgpack.encode(
                {"type": "state", "v": 999, "id": "x", "ts": 1.0, "state": "online"}
            ),
            "unsupported_version",
        ),
        ("capacity", codec.encode(State(state="online")), "unexpected_type"),
        (
            "result",
            msgspec.msgpack.encode(
                {"type": "result", "v": 1, "id": "r", "ts": 1.0, "task_id": "t", "status": "won"}
            ),
            "invalid",
        ),
        ("result", msgspec.msgpack.encode({"type": "nonsense", "v": 1}), "unknown_type"),
        ("state", msgspec.msgpack.encode([1, 2, 3]), "malformed"),
    ],
)
def test_bad_payloads_are_rejected_by_reason(
    h: Harness, channel: str, payload: bytes, reason: str
) -> None:
    h.send(channel, payload)
    assert h.rejects(reason) == 1, {
        s.labels["reason"]: s.value
        for m in h.metrics.registry.collect()
        for s in m.samples
        if s.name == "lepton_ingest_rejects_total"
    }
    assert h.capacity == []
    assert h.inbox.take_all() == []


def test_foreign_topics_are_rejected(h: Harness) -> None:
    payload = codec.encode(report())
    h.ingest.handle("lepton/v1/default/device/dev-1/update", payload)
    assert h.rejects("unhandled_channel") == 1
    h.ingest.handle(topics.device_topic("other-fleet", "d", "capacity"), payload)
    h.ingest.handle(topics.cmd_topic("default", "d", "task"), payload)
    h.ingest.handle("something/else", payload)
    h.ingest.handle("lepton/v1/default/device/$bad/capacity", payload)
    assert h.rejects("bad_topic") == 4
    assert h.capacity == []


def test_full_inbox_is_counted_not_raised(h: Harness) -> None:
    ack = codec.encode(TaskAck(task_id="t1", accepted=True))
    for _ in range(15):
        h.send("task-ack", ack)
    assert len(h.inbox) == 10
    assert h.rejects("overloaded") == 5


def test_draining_ingest_drops_quietly(h: Harness) -> None:
    h.ingest.accepting = False
    h.send("capacity", codec.encode(report()))
    assert h.capacity == []


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    channel=st.sampled_from(["state", "capacity", "task-ack", "result"]),
    payload=st.one_of(
        st.binary(max_size=512),
        st.builds(
            msgspec.msgpack.encode,
            st.recursive(
                st.none()
                | st.booleans()
                | st.integers(-(2**63), 2**64 - 1)
                | st.floats()
                | st.text(max_size=20),
                lambda inner: (
                    st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4)
                ),
                max_leaves=20,
            ),
        ),
    ),
)
def test_no_input_escapes(h: Harness, channel: str, payload: bytes) -> None:
    h.send(channel, payload)  # must not raise
    assert h.rejects("internal_error") == 0


def test_subscriptions_plain_and_shared() -> None:
    plain = subscriptions("default", shared_group=None)
    assert ("lepton/v1/default/device/+/capacity", 0) in plain
    assert ("lepton/v1/default/device/+/result", 1) in plain
    shared = dict(subscriptions("default", shared_group="g"))
    assert shared["$share/g/lepton/v1/default/device/+/result"] == 1
    assert shared["lepton/v1/default/device/+/state"] == 1  # retained states need a plain one


async def test_inbox_batches_in_order() -> None:
    inbox = Inbox()
    inbox.bind(asyncio.get_running_loop())
    acks = [TaskAck(task_id=f"t{i}", accepted=True) for i in range(5)]
    from lepton.coordinator.runtime.ingest import Inbound

    for a in acks:
        inbox.push(Inbound("d", a, 0.0))
    batch = await inbox.get_batch(3)
    assert [m.message for m in batch] == acks[:3]
    batch = await inbox.get_batch(3)
    assert [m.message for m in batch] == acks[3:]


def test_a_revoked_devices_messages_are_dropped_and_counted() -> None:
    revoked = {"dev-x"}
    metrics = Metrics()
    capacity: list[str] = []
    inbox = Inbox()
    ingest = Ingest(
        "default",
        metrics,
        on_capacity=lambda d, _r, _t: capacity.append(d),
        inbox=inbox,
        revoked=revoked,
    )
    for device in ("dev-x", "dev-1"):
        for channel, msg in (("capacity", report()), ("state", State(state="online"))):
            ingest.handle(topics.device_topic("default", device, channel), codec.encode(msg))
    assert capacity == ["dev-1"]
    assert [m.device_id for m in inbox.take_all()] == ["dev-1"]
    assert metrics.value("lepton_ingest_rejects_total", {"reason": "revoked_device"}) == 2
