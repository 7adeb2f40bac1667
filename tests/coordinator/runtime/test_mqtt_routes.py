"""MqttLink.add_route on a real mosquitto: a routed topic goes to its handler, not to the
ingest's ``on_message``, and its subscription survives a broker restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lepton.coordinator.config import MqttConfig
from lepton.coordinator.runtime.mqtt import MqttLink
from tests.support.broker import Broker


async def _until(pred: object, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not pred():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_routed_topics_skip_on_message_and_survive_a_restart(tmp_path: Path) -> None:
    broker = Broker(workdir=tmp_path / "b")
    broker.start()
    ingested: list[str] = []
    routed: list[bytes] = []
    late: list[bytes] = []
    cfg = MqttConfig(port=broker.port, reconnect_min_s=0.5, reconnect_max_s=1.0)
    link = MqttLink(
        cfg,
        client_id="routes",
        subscriptions=[("data/#", 1)],
        on_message=lambda topic, _p, _r: ingested.append(topic),
    )
    link.add_route("reply/one", routed.append)  # before connecting
    try:
        async with link:
            assert await link.wait_connected(5)
            link.add_route("late/reply", late.append)  # while connected
            await asyncio.sleep(0.2)  # its SUBACK
            await link.publish("reply/one", b"r1")
            await link.publish("late/reply", b"l1")
            await link.publish("data/other", b"x")
            await _until(lambda: routed and late and ingested)
            assert ingested == ["data/other"]
            broker.stop()
            await _until(lambda: not link.connected)
            broker.start()
            assert await link.wait_connected(10)
            await asyncio.sleep(0.2)
            await link.publish("reply/one", b"r2")
            await link.publish("late/reply", b"l2")
            await _until(lambda: len(routed) == 2 and len(late) == 2)
            assert routed == [b"r1", b"r2"]
            assert late == [b"l1", b"l2"]
            assert ingested == ["data/other"]
    finally:
        broker.kill()


def test_a_route_is_one_exact_topic() -> None:
    link = MqttLink(MqttConfig(), client_id="x", subscriptions=[], on_message=lambda *_: None)
    with pytest.raises(ValueError, match="exact topic"):
        link.add_route("a/+/b", lambda _p: None)
