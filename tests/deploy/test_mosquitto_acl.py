"""The shipped ACL on a real mosquitto: a device can publish only under its own id."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest

from protocol import topics
from tests.support.broker import Broker

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"


@pytest.fixture
def acl_broker(broker_factory: Callable[..., Broker], tmp_path: Path) -> Broker:
    passwd = tmp_path / "passwd"
    for user in ("dev-a", "dev-b", "coordinator"):
        subprocess.run(
            [
                "mosquitto_passwd",
                "-b",
                *(["-c"] if user == "dev-a" else []),
                str(passwd),
                user,
                f"pw-{user}",
            ],
            check=True,
        )
    passwd.chmod(0o600)
    return broker_factory(
        f"allow_anonymous false\npassword_file {passwd}\nacl_file {DEPLOY / 'lepton.acl'}\n"
    )


async def _collect(port: int, user: str, filt: str, into: list[str], ready: asyncio.Event) -> None:
    async with aiomqtt.Client(
        "127.0.0.1", port, username=user, password=f"pw-{user}", identifier=f"{user}-reader"
    ) as c:
        await c.subscribe(filt, qos=1)
        ready.set()
        async for m in c.messages:
            into.append(str(m.topic))


async def test_device_cannot_publish_as_another(acl_broker: Broker) -> None:
    seen: list[str] = []
    ready = asyncio.Event()
    reader = asyncio.create_task(
        _collect(acl_broker.port, "coordinator", "lepton/v1/+/device/#", seen, ready)
    )
    await asyncio.wait_for(ready.wait(), 5)
    # dev-b even picks dev-a's client id: the ACL is on the username, so it gains nothing.
    # Mosquitto refuses the publish (and drops the connection of a client that tries).
    with pytest.raises(aiomqtt.MqttError):  # noqa: PT012 (connect + refused publish is one step)
        async with aiomqtt.Client(
            "127.0.0.1", acl_broker.port, username="dev-b", password="pw-dev-b", identifier="dev-a"
        ) as dev_b:
            await dev_b.publish(
                topics.device_topic("default", "dev-a", topics.RESULT), b"spoof", qos=1
            )
            await dev_b.publish(
                topics.device_topic("default", "dev-a", topics.RESULT), b"spoof", qos=1
            )
    async with aiomqtt.Client(
        "127.0.0.1", acl_broker.port, username="dev-b", password="pw-dev-b", identifier="dev-b"
    ) as dev_b:
        await dev_b.publish(topics.device_topic("default", "dev-b", topics.RESULT), b"own", qos=1)
    async with asyncio.timeout(5):
        while topics.device_topic("default", "dev-b", topics.RESULT) not in seen:
            await asyncio.sleep(0.05)
    reader.cancel()
    assert topics.device_topic("default", "dev-a", topics.RESULT) not in seen


async def test_device_reads_only_its_own_commands(acl_broker: Broker) -> None:
    got_a: list[str] = []
    got_b: list[str] = []
    ready_a, ready_b = asyncio.Event(), asyncio.Event()
    ra = asyncio.create_task(
        _collect(acl_broker.port, "dev-a", "lepton/v1/+/cmd/#", got_a, ready_a)
    )
    rb = asyncio.create_task(
        _collect(acl_broker.port, "dev-b", "lepton/v1/+/cmd/dev-b/#", got_b, ready_b)
    )
    await asyncio.wait_for(asyncio.gather(ready_a.wait(), ready_b.wait()), 5)
    async with aiomqtt.Client(
        "127.0.0.1",
        acl_broker.port,
        username="coordinator",
        password="pw-coordinator",
        identifier="coord",
    ) as coord:
        await coord.publish(topics.cmd_topic("default", "dev-b", topics.TASK), b"for b", qos=1)
        await coord.publish(topics.cmd_topic("default", "dev-a", topics.TASK), b"for a", qos=1)
    async with asyncio.timeout(5):
        while not (got_a and got_b):
            await asyncio.sleep(0.05)
    ra.cancel()
    rb.cancel()
    assert got_a == [topics.cmd_topic("default", "dev-a", topics.TASK)]
    assert got_b == [topics.cmd_topic("default", "dev-b", topics.TASK)]


async def test_wrong_password_is_refused(acl_broker: Broker) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", acl_broker.port, username="dev-a", password="nope"):
            pass
