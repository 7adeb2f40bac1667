"""The shipped broker templates on a real mosquitto: identities, topics and client ids.

Finding 5 of the hardening review: with the earlier templates a device that connected with
another device's client id disconnected it (firing its Last Will), and the ACL's ``+`` fleet
level let a device publish into any fleet under its own id.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiomqtt
import pytest

from lepton.protocol import topics
from tests.deploy.conftest import ShippedBroker, ShippedFactory

USERS = {u: f"pw-{u}" for u in ("dev-a", "dev-b", "coordinator", "observer")}
# A test-only account that reads everything: the witness for what the broker let through.
OBSERVER = "\nuser observer\ntopic read #\n"


@pytest.fixture
def acl_broker(shipped_broker_factory: ShippedFactory) -> ShippedBroker:
    return shipped_broker_factory(USERS, acl_extra=OBSERVER)


def client(port: int, user: str, **kw: object) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", port, username=user, password=USERS[user], **kw)  # type: ignore[arg-type]


async def _collect(
    port: int, user: str, filt: str, into: list[str], ready: asyncio.Event, ident: str = ""
) -> None:
    async with client(port, user, identifier=ident or f"{user}-reader") as c:
        await c.subscribe(filt, qos=1)
        ready.set()
        async for m in c.messages:
            into.append(str(m.topic))


async def _until(pred: object, timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not pred():  # type: ignore[operator]
            await asyncio.sleep(0.05)


async def test_device_cannot_publish_as_another(acl_broker: ShippedBroker) -> None:
    seen: list[str] = []
    ready = asyncio.Event()
    reader = asyncio.create_task(_collect(acl_broker.port, "observer", "lepton/#", seen, ready))
    await asyncio.wait_for(ready.wait(), 5)
    # dev-b even picks dev-a's client id: the ACL is on the username, so it gains nothing.
    # Mosquitto drops the publish (it may also close the connection: either is a refusal).
    spoof = topics.device_topic("default", "dev-a", topics.RESULT)
    with contextlib.suppress(aiomqtt.MqttError):
        async with client(acl_broker.port, "dev-b", identifier="dev-a") as dev_b:
            await dev_b.publish(spoof, b"spoof", qos=1)
            await dev_b.publish(spoof, b"spoof", qos=1)
    own = topics.device_topic("default", "dev-b", topics.RESULT)
    async with client(acl_broker.port, "dev-b", identifier="dev-b") as dev_b:
        await dev_b.publish(own, b"own", qos=1)
    await _until(lambda: own in seen)
    reader.cancel()
    assert spoof not in seen


async def test_device_cannot_publish_into_another_fleet(acl_broker: ShippedBroker) -> None:
    seen: list[str] = []
    ready = asyncio.Event()
    reader = asyncio.create_task(_collect(acl_broker.port, "observer", "lepton/#", seen, ready))
    await asyncio.wait_for(ready.wait(), 5)
    other = topics.device_topic("other", "dev-b", topics.RESULT)
    own = topics.device_topic("default", "dev-b", topics.RESULT)
    with contextlib.suppress(aiomqtt.MqttError):
        async with client(acl_broker.port, "dev-b") as dev_b:
            await dev_b.publish(other, b"into another fleet", qos=1)
            await dev_b.publish(other, b"into another fleet", qos=1)
    async with client(acl_broker.port, "dev-b") as dev_b:
        await dev_b.publish(own, b"own", qos=1)
    await _until(lambda: own in seen)
    reader.cancel()
    assert other not in seen


async def test_client_id_is_bound_to_the_username(acl_broker: ShippedBroker) -> None:
    """dev-b connecting with dev-a's client id (clean start, so a takeover would end dev-a's
    session and fire its Last Will) neither disconnects dev-a nor fires the will."""
    seen: list[str] = []
    ready = asyncio.Event()
    reader = asyncio.create_task(_collect(acl_broker.port, "observer", "lepton/#", seen, ready))
    await asyncio.wait_for(ready.wait(), 5)
    state_a = topics.device_topic("default", "dev-a", topics.STATE)
    will = aiomqtt.Will(topic=state_a, payload=b"offline", qos=1, retain=True)
    async with client(
        acl_broker.port, "dev-a", identifier="dev-a", clean_session=False, will=will
    ) as dev_a:
        await dev_a.subscribe(topics.cmd_filter("default", "dev-a"), qos=1)
        for _ in range(3):  # the review's attack repeated the takeover
            async with client(
                acl_broker.port, "dev-b", identifier="dev-a", clean_session=True
            ) as dev_b:
                await dev_b.publish(
                    topics.device_topic("default", "dev-b", topics.CAPACITY), b"", qos=1
                )
        # dev-a's connection still works: a QoS 1 round trip through the broker.
        mine = topics.device_topic("default", "dev-a", topics.RESULT)
        await asyncio.wait_for(dev_a.publish(mine, b"still here", qos=1), 5)
        await _until(lambda: mine in seen)
    reader.cancel()
    assert state_a not in seen, "dev-a's Last Will fired while dev-a was connected"


async def test_device_reads_only_its_own_commands(acl_broker: ShippedBroker) -> None:
    got_a: list[str] = []
    got_b: list[str] = []
    ready_a, ready_b = asyncio.Event(), asyncio.Event()
    ra = asyncio.create_task(
        _collect(acl_broker.port, "dev-a", "lepton/v1/+/cmd/#", got_a, ready_a, "dev-a")
    )
    rb = asyncio.create_task(
        _collect(acl_broker.port, "dev-b", "lepton/v1/+/cmd/dev-b/#", got_b, ready_b, "dev-b")
    )
    await asyncio.wait_for(asyncio.gather(ready_a.wait(), ready_b.wait()), 5)
    async with client(acl_broker.port, "coordinator") as coord:
        await coord.publish(topics.cmd_topic("default", "dev-b", topics.TASK), b"for b", qos=1)
        await coord.publish(topics.cmd_topic("default", "dev-a", topics.TASK), b"for a", qos=1)
    await _until(lambda: got_a and got_b)
    ra.cancel()
    rb.cancel()
    assert got_a == [topics.cmd_topic("default", "dev-a", topics.TASK)]
    assert got_b == [topics.cmd_topic("default", "dev-b", topics.TASK)]


async def test_wrong_password_is_refused(acl_broker: ShippedBroker) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", acl_broker.port, username="dev-a", password="nope"):
            pass


async def test_no_username_is_refused(acl_broker: ShippedBroker) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", acl_broker.port, identifier="dev-a"):
            pass
