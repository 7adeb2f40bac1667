"""Hostile traffic through a real broker: rejected, counted, nothing corrupted, service alive."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from lepton.coordinator.service import Coordinator
from lepton.protocol import codec, topics
from lepton.protocol.messages import Result, ResultAck
from tests.coordinator.conftest import eventually
from tests.coordinator.test_service import online, submit, task_in
from tests.support.broker import Broker
from tests.support.device import FakeDevice


class Raw:
    """A bare MQTT client that publishes whatever it is told on any topic and records what
    arrives on the topics it subscribes to."""

    def __init__(self, port: int) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="raw", protocol=paho.MQTTv5
        )
        self.client.on_message = lambda _c, _u, m: self.received.append((m.topic, bytes(m.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
async def raw(broker: Broker) -> AsyncIterator[Raw]:
    r = await asyncio.to_thread(Raw, broker.port)
    yield r
    await asyncio.to_thread(r.close)


def rejects(c: Coordinator, reason: str) -> float:
    return c.metrics.value("lepton_ingest_rejects_total", {"reason": reason})


async def test_malformed_oversized_and_unknown_version(coordinator: Coordinator, raw: Raw) -> None:
    cap = topics.device_topic("default", "evil", "capacity")
    await asyncio.to_thread(raw.publish, cap, b"\x93\x01garbage")
    await asyncio.to_thread(raw.publish, cap, b"\xc1" * (codec.MAX_MESSAGE_BYTES + 10))
    future = msgspec.msgpack.encode({"type": "capacity", "v": 99, "id": "x", "ts": 1.0})
    await asyncio.to_thread(raw.publish, cap, future)
    await eventually(lambda: rejects(coordinator, "unsupported_version") == 1)
    assert rejects(coordinator, "malformed") == 1
    assert rejects(coordinator, "oversized") == 1
    assert not coordinator.store.devices.device_exists("evil")
    assert coordinator.link.connected


async def test_result_from_an_unknown_device_is_rejected_and_not_acked(
    coordinator: Coordinator, raw: Raw
) -> None:
    raw.subscribe(topics.cmd_filter("default", "ghost"))
    await asyncio.sleep(0.2)
    res = Result(task_id="t-none", status="succeeded")
    await asyncio.to_thread(
        raw.publish, topics.device_topic("default", "ghost", "result"), codec.encode(res)
    )
    await eventually(lambda: rejects(coordinator, "unknown_device") == 1)
    await asyncio.sleep(0.3)
    assert raw.received == []  # no ResultAck for what was not applied


async def test_spoofed_replayed_and_unknown_task_results(
    coordinator: Coordinator, broker: Broker, raw: Raw
) -> None:
    async with (
        FakeDevice(broker.port, "honest", interval_s=0.2, behaviour="ack_only") as honest,
        FakeDevice(broker.port, "mallory", interval_s=0.2, behaviour="refuse") as mallory,
    ):
        await online(coordinator, "honest", "mallory")
        tid = await submit(coordinator, device_id="honest")
        await task_in(coordinator, tid, "running")
        attempt = coordinator.store.tasks.get_task(tid).attempt

        # mallory claims the result of honest's task: its own topic, someone else's task.
        forged = Result(task_id=tid, status="succeeded", attempt=attempt, output={"evil": 1})
        mallory.publish(topics.RESULT, codec.encode(forged))
        await eventually(lambda: rejects(coordinator, "spoofed") == 1)
        assert coordinator.store.tasks.get_task(tid).state == "running"
        assert coordinator.store.results.results_for(tid) == []

        # A result for a task that does not exist.
        mallory.publish(topics.RESULT, codec.encode(Result(task_id="nope", status="failed")))
        await eventually(lambda: rejects(coordinator, "unknown_task") == 1)

        # honest finishes; then replays the same result (its ack got lost, say).
        real = Result(task_id=tid, status="succeeded", attempt=attempt, output={"ok": True})
        honest.outbox[real.id] = real
        honest.publish(topics.RESULT, codec.encode(real))
        task = await task_in(coordinator, tid, "succeeded")
        assert task.output == {"ok": True}
        await honest.wait_until(lambda: real.id in honest.acked)
        honest.acked.clear()
        honest.publish(topics.RESULT, codec.encode(real))
        await honest.wait_until(lambda: real.id in honest.acked)  # acked again
        assert rejects(coordinator, "replayed") >= 1
        assert len(coordinator.store.results.results_for(tid)) == 1  # applied once
        assert coordinator.store.tasks.get_task(tid).finished_at == task.finished_at
        # mallory replaying honest's result id: still spoofed, and not acked to mallory.
        mallory.publish(topics.RESULT, codec.encode(real))
        await eventually(lambda: rejects(coordinator, "spoofed") == 2)
        assert not any(
            real.id in codec.decode(p, ResultAck).ids
            for t, p in raw.received
            if t.endswith("mallory/result-ack")
        )


async def test_spoofed_task_ack_changes_nothing(coordinator: Coordinator, broker: Broker) -> None:
    async with (
        FakeDevice(broker.port, "slow", interval_s=0.2, behaviour="ignore"),
        FakeDevice(broker.port, "other", interval_s=0.2, behaviour="ignore") as other,
    ):
        await online(coordinator, "slow", "other")
        tid = await submit(coordinator, device_id="slow")
        await task_in(coordinator, tid, "assigned")
        from lepton.protocol.messages import TaskAck

        other.publish(
            topics.TASK_ACK, codec.encode(TaskAck(task_id=tid, accepted=False, reason="x"))
        )
        await eventually(lambda: rejects(coordinator, "spoofed_ack") == 1)
        assert coordinator.store.tasks.get_task(tid).state == "assigned"


async def test_flood_of_garbage_does_not_stop_service(
    coordinator: Coordinator, broker: Broker
) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="flood", protocol=paho.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        for i in range(2000):
            client.publish(
                topics.device_topic("default", f"d{i % 50}", "capacity"),
                bytes([i % 256]) * (i % 40),
            )
        await eventually(
            lambda: rejects(coordinator, "malformed") + rejects(coordinator, "empty") >= 1900,
            timeout=20,
        )
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
        client.loop_stop()
    async with FakeDevice(broker.port, "after", interval_s=0.2):
        await online(coordinator, "after")
        tid = await submit(coordinator)
        await task_in(coordinator, tid, "succeeded")
