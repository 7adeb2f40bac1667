"""The agent against a real mosquitto, in process: tasks, acks, hostile input."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import msgspec
import pytest

from lepton.agent.config import AgentConfig, load_config
from lepton.agent.daemon import Agent
from lepton.protocol.codec import MAX_MESSAGE_BYTES, encode
from lepton.protocol.messages import Result, Task
from tests.support.agents import Sink
from tests.support.broker import Broker


@contextlib.asynccontextmanager
async def running_agent(
    broker: Broker, state_dir: Path, device_id: str = "dev-1", **overrides: object
) -> AsyncIterator[Agent]:
    values = {
        "device.id": device_id,
        "broker.port": broker.port,
        "broker.keepalive_s": 5,
        "broker.reconnect_min_s": 0.1,
        "broker.reconnect_max_s": 1.0,
        "agent.state_dir": state_dir,
        "agent.capacity_interval_s": 0.5,
        "agent.capacity_min_interval_s": 0.1,
        "agent.probe": False,
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})  # agent__slots
    config = load_config(None, env={}, overrides=values)
    async with Agent(config) as agent:
        runner = asyncio.create_task(agent.run())
        try:
            async with asyncio.timeout(10):
                await agent.link.connected.wait()
            yield agent
        finally:
            agent.stop()
            await asyncio.wait_for(runner, 30)


async def test_tasks_run_and_results_are_acked(broker: Broker, tmp_path: Path) -> None:
    async with (
        Sink(broker.port) as sink,
        running_agent(broker, tmp_path / "a", agent__slots=2) as agent,
    ):
        await sink.wait(lambda: sink.state_of("dev-1") == "online", 10, "birth")
        tasks = [await sink.send_task("dev-1", sleep_s=0.01, payload={"n": i}) for i in range(20)]
        ids = {t.task_id for t in tasks}
        await sink.wait(lambda: len(sink.results_for(ids)) == 20, 20, "20 results")
        results = sink.results_for(ids)
        assert all(r.status == "succeeded" for r in results.values())
        assert sorted(r.output["echo"]["n"] for r in results.values()) == list(range(20))
        assert all(sink.task_acks[i].accepted for i in ids)
        # Acks empty the outbox.
        await sink.wait(lambda: len(agent.outbox) == 0, 10, "outbox drained")
        await sink.wait(lambda: "dev-1" in sink.capacity, 5, "capacity report")
        report = sink.capacity["dev-1"]
        assert report.slots.total == 2
        assert report.cpu.count >= 1
    # Graceful stop publishes the retained offline state.
    await sink_state_after_stop(broker)


async def sink_state_after_stop(broker: Broker) -> None:
    async with Sink(broker.port, client_id="late") as late:
        await late.wait(lambda: late.state_of("dev-1") == "offline", 5, "retained offline state")
        assert late.states["dev-1"][-1][1].reason == "shutdown"


async def test_failing_and_unknown_tasks_give_error_results(broker: Broker, tmp_path: Path) -> None:
    async with Sink(broker.port) as sink, running_agent(broker, tmp_path / "a"):
        failing = await sink.send_task("dev-1", fail="boom")
        unknown = await sink.send_task("dev-1", kind="no-such-kind")
        bad_param = await sink.send_task("dev-1", sleep_s="soon")
        ids = {failing.task_id, unknown.task_id, bad_param.task_id}
        await sink.wait(lambda: len(sink.results_for(ids)) == 3, 10, "three results")
        res = sink.results_for(ids)
        assert res[failing.task_id].status == "failed"
        assert "boom" in (res[failing.task_id].error or "")
        assert res[unknown.task_id].status == "rejected"
        assert "unknown task kind" in (res[unknown.task_id].error or "")
        assert res[bad_param.task_id].status == "failed"
        await sink.wait(lambda: unknown.task_id in sink.task_acks, 5, "task ack")
        assert sink.task_acks[unknown.task_id].reason == "unknown_kind"


async def test_hostile_input_is_rejected_counted_and_survived(
    broker: Broker, tmp_path: Path
) -> None:
    async with Sink(broker.port) as sink, running_agent(broker, tmp_path / "a") as agent:
        now = time.time()
        valid = Task(task_id="tv", kind="echo", expires_at=now + 60)
        raw = msgspec.to_builtins(valid)
        hostile = {
            # 0xc1 is never valid MessagePack, so these are malformed whatever follows.
            "malformed": [b"\xc1" + os.urandom(n) for n in (0, 7, 64, 1000)] + [b"\x92\x01"],
            "oversized": [b"\x80" * (MAX_MESSAGE_BYTES + 1)],
            "unsupported_version": [msgspec.msgpack.encode({**raw, "v": 2, "id": "v2"})],
            "invalid": [msgspec.msgpack.encode({**raw, "expires_at": "tomorrow"})],
            "unknown_type": [msgspec.msgpack.encode({**raw, "type": "launch-missiles"})],
            "unexpected_type": [encode(Result(task_id="x", status="succeeded"))],
            "expired": [encode(Task(task_id="old", kind="echo", expires_at=now - 1))],
        }
        for payloads in hostile.values():
            for payload in payloads:
                await sink.send("dev-1", payload)
        # Replaying an accepted task does not run it twice.
        await sink.send("dev-1", encode(valid))
        await sink.send("dev-1", encode(valid))
        # The agent keeps working afterwards.
        after = await sink.send_task("dev-1", payload="still alive")
        await sink.wait(
            lambda: after.task_id in {r.task_id for r in sink.applied.values()},
            10,
            "task after hostile input",
        )

        def counted() -> bool:
            c = agent.counters.snapshot()
            return all(c.get(f"rejected.{reason}", 0) >= len(p) for reason, p in hostile.items())

        await sink.wait(counted, 5, "all rejects counted")
        counters = agent.counters.snapshot()
        for reason, payloads in hostile.items():
            assert counters[f"rejected.{reason}"] == len(payloads), reason
        assert counters["tasks.refused.duplicate"] == 1
        assert [r.task_id for r in sink.applied.values()].count("tv") == 1
        # The counters reach the coordinator in the capacity report.
        await sink.wait(
            lambda: (
                sink.capacity.get("dev-1") is not None
                and sink.capacity["dev-1"].counters.get("rejected.malformed", 0)
                == len(hostile["malformed"])
            ),
            5,
            "counters in capacity report",
        )


@pytest.mark.parametrize("n", [200])
async def test_fuzzed_task_payloads_never_stop_the_agent(
    broker: Broker, tmp_path: Path, n: int
) -> None:
    import random

    rng = random.Random(1234)
    base = encode(Task(task_id="fz", kind="echo", expires_at=time.time() + 60))
    async with Sink(broker.port) as sink, running_agent(broker, tmp_path / "a") as agent:
        for _ in range(n):
            data = bytearray(base)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            await sink.send("dev-1", bytes(data))
        after = await sink.send_task("dev-1", payload="ok")
        await sink.wait(
            lambda: after.task_id in {r.task_id for r in sink.applied.values()},
            15,
            "task after fuzzing",
        )
        assert agent.counters["link.handler_errors"] == 0


def _fast_reconnect_config(broker: Broker, tmp_path: Path) -> AgentConfig:
    """An agent's config for driving its link by hand (no probe, quick reconnects)."""
    return load_config(
        None,
        env={},
        overrides={
            "device.id": "dev-1",
            "broker.port": broker.port,
            "broker.reconnect_min_s": 0.05,
            "broker.reconnect_max_s": 0.1,
            "agent.state_dir": tmp_path / "a",
            "agent.probe": False,
        },
    )


@pytest.mark.parametrize("where", ["publisher", "client_exit"])
async def test_link_stops_when_cancelled_while_the_connection_fails(
    broker: Broker, tmp_path: Path, where: str
) -> None:
    """A cancel that meets a connection error still stops the link: it does not reconnect
    and run on. The error comes from a session task (``publisher``) or from aiomqtt's own
    exit (``client_exit``), which then raises it in place of the CancelledError."""
    async with Agent(_fast_reconnect_config(broker, tmp_path)) as agent:
        link = agent.link
        started = asyncio.Event()
        publisher = link._drain_outbox

        async def publisher_failing_on_cancel(client: aiomqtt.Client) -> None:
            started.set()
            try:
                await publisher(client)
            except asyncio.CancelledError:
                if where == "publisher":
                    # What a publish whose connection is cut at that moment raises.
                    raise aiomqtt.MqttError("connection lost") from None
                raise

        class ClientFailingOnExit(aiomqtt.Client):
            async def __aexit__(self, *exc: object) -> None:
                await super().__aexit__(*exc)  # type: ignore[arg-type]
                raise aiomqtt.MqttError("Unexpected disconnection")

        make_client = link._client_for

        def client_for() -> aiomqtt.Client:
            client = make_client()
            if where == "client_exit":
                client.__class__ = ClientFailingOnExit
            return client

        link._drain_outbox = publisher_failing_on_cancel  # type: ignore[method-assign]
        link._client_for = client_for  # type: ignore[method-assign]
        task = asyncio.create_task(link.run())
        async with asyncio.timeout(10):
            await started.wait()
        connects = agent.counters.snapshot().get("link.connects", 0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        if not done:  # end it another way, so that the failure does not hang the teardown

            async def refuse() -> None:
                raise RuntimeError("link ran on after its cancel")

            link._session = refuse  # type: ignore[method-assign]
            task.cancel()
            await asyncio.wait({task}, timeout=10)
        assert done, "the link ignored its cancel and ran on"
        assert task.cancelled()
        assert agent.counters.snapshot().get("link.connects", 0) == connects
        assert not link.connected.is_set()


async def test_link_reconnects_after_a_session_error(broker: Broker, tmp_path: Path) -> None:
    """The other side of the test above: an error with no cancel is a lost connection, and
    the link connects again (several times in a row, so no stale cancel state builds up)."""
    async with Agent(_fast_reconnect_config(broker, tmp_path)) as agent:
        link = agent.link
        sessions = 0

        async def publisher_failing(client: aiomqtt.Client) -> None:
            nonlocal sessions
            sessions += 1
            await asyncio.sleep(0.05)
            raise aiomqtt.MqttError("connection lost")

        link._drain_outbox = publisher_failing  # type: ignore[method-assign]
        task = asyncio.create_task(link.run())
        try:
            async with asyncio.timeout(15):
                while agent.counters.snapshot().get("link.connects", 0) < 4:
                    await asyncio.sleep(0.02)
        finally:
            task.cancel()
            await asyncio.wait({task}, timeout=10)
        assert task.cancelled()
        assert agent.counters.snapshot()["link.disconnects"] >= 3


@pytest.mark.parametrize("where", ["capacity_loop", "link_publisher"])
async def test_agent_stops_when_a_task_loses_its_cancel(
    broker: Broker, tmp_path: Path, where: str
) -> None:
    """A loop that swallows its cancel (Python 3.11's ``wait_for`` in aiomqtt's publish does
    when the publish completes as the cancel arrives) and waits again still ends: the
    agent's main loop or the link's session (``link_publisher``) cancels it again."""
    swallowed = asyncio.Event()

    async def loses_one_cancel(*_args: object) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.Event().wait()

    async with Agent(_fast_reconnect_config(broker, tmp_path)) as agent:
        if where == "capacity_loop":
            agent._capacity_loop = loses_one_cancel  # type: ignore[method-assign]
        else:
            agent.link._drain_outbox = loses_one_cancel  # type: ignore[method-assign]
        runner = asyncio.create_task(agent.run())
        async with asyncio.timeout(10):
            await agent.link.connected.wait()
        agent.stop()
        done, _ = await asyncio.wait({runner}, timeout=15)
        if not done:
            runner.cancel()  # the failure below, not a hung teardown
        assert done, "the agent did not stop"
        assert swallowed.is_set()
        runner.result()
