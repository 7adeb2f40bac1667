"""Task cancellation on a real agent process over a real broker (the sink plays the
coordinator): a queued task leaves at once, a running one stops at its handler's next check,
each with a ``cancelled`` result; a queued task's cancel holds across a restart; an unknown
id is ignored but remembered, so its task is refused if it comes after the cancel. A running
benchmark stops measuring; a deploy cancelled during its download is not swapped in."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lepton.protocol import topics
from lepton.protocol.codec import encode
from lepton.protocol.messages import Task
from lepton.protocol.tasks import BENCHMARK, DEPLOY, DeployParams, encode_params
from tests.support.agents import AgentProcess, Sink, write_agent_config
from tests.support.broker import Broker
from tests.support.httpserver import Fault, HttpServer

pytestmark = pytest.mark.slow


@pytest.fixture
def agent(tmp_path: Path, broker: Broker) -> Iterator[Callable[..., AgentProcess]]:
    procs: list[AgentProcess] = []

    def make(**agent: object) -> AgentProcess:
        cfg = write_agent_config(
            tmp_path / "dev-1.toml",
            device_id="dev-1",
            port=broker.port,
            state_dir=tmp_path / "state",
            agent={"slots": 1, **agent},
        )
        p = AgentProcess(config_path=cfg, log_path=tmp_path / "dev-1.log")
        p.start()
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.kill()


def inbox_ids(state_dir: Path) -> set[str]:
    conn = sqlite3.connect(state_dir / "agent.db")
    try:
        return {row[0] for row in conn.execute("SELECT task_id FROM inbox")}
    finally:
        conn.close()


def counter(sink: Sink, name: str) -> int:
    report = sink.capacity.get("dev-1")
    return 0 if report is None else report.counters.get(name, 0)


async def test_queued_and_running_tasks_are_cancelled(
    broker: Broker, agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    proc = agent()
    async with Sink(broker.port) as sink:
        await sink.wait(lambda: sink.state_of("dev-1") == "online", 20, "agent online")
        running = await sink.send_task("dev-1", "echo", sleep_s=60, payload="long")
        queued = await sink.send_task("dev-1", "echo", payload="never")
        await sink.wait(
            lambda: queued.task_id in sink.task_acks and running.task_id in sink.task_acks,
            10,
            "both tasks accepted",
        )
        assert sink.task_acks[queued.task_id].accepted
        # One slot: the long task runs, the other waits in the queue.
        await sink.wait(
            lambda: "dev-1" in sink.capacity and sink.capacity["dev-1"].slots.queued == 1,
            10,
            "one task queued",
        )
        await sink.send_cancel("dev-1", [queued.task_id], reason="user")
        await sink.wait(lambda: bool(sink.results_for({queued.task_id})), 10, "queued cancelled")
        result = sink.results_for({queued.task_id})[queued.task_id]
        assert (result.status, result.error) == ("cancelled", "cancelled: user")
        assert result.output == {}
        assert queued.task_id not in inbox_ids(tmp_path / "state")
        assert sink.results_for({running.task_id}) == {}  # the other one still runs

        started = time.monotonic()
        await sink.send_cancel("dev-1", [running.task_id], reason="user")
        await sink.wait(lambda: bool(sink.results_for({running.task_id})), 10, "running cancelled")
        assert time.monotonic() - started < 5  # not the 60 s the task would have slept
        result = sink.results_for({running.task_id})[running.task_id]
        assert (result.status, result.error) == ("cancelled", "cancelled: user")
        assert inbox_ids(tmp_path / "state") == set()

        # Idempotent: a second cancel of both changes nothing and is counted as ignored.
        await sink.send_cancel("dev-1", [queued.task_id, running.task_id], reason="again")
        await sink.wait(
            lambda: counter(sink, "tasks.cancel.ignored") == 2, 10, "repeat cancels counted"
        )
        assert counter(sink, "tasks.cancel.queued") == 1
        assert counter(sink, "tasks.cancel.running") == 1
        assert counter(sink, "tasks.cancelled") == 2
        assert len(sink.results_for({queued.task_id, running.task_id})) == 2
        assert proc.proc is not None
        assert proc.proc.poll() is None


async def test_a_cancel_before_its_task_refuses_the_task(
    broker: Broker, agent: Callable[..., AgentProcess]
) -> None:
    agent()
    async with Sink(broker.port) as sink:
        await sink.wait(lambda: sink.state_of("dev-1") == "online", 20, "agent online")
        await sink.send_cancel("dev-1", ["t-early"], reason="round_closed")
        await sink.wait(lambda: counter(sink, "tasks.cancel.ignored") == 1, 10, "cancel ignored")
        await sink.send(
            "dev-1", encode(Task(task_id="t-early", kind="echo", expires_at=time.time() + 60))
        )
        await sink.wait(lambda: "t-early" in sink.task_acks, 10, "the task answered")
        ack = sink.task_acks["t-early"]
        assert (ack.accepted, ack.reason) == (False, "cancelled")
        # A cancel that is not one is rejected with its reason and counted; the agent goes on.
        await sink.send_raw(topics.cmd_topic("default", "dev-1", topics.CANCEL), b"\xc1garbage")
        await sink.wait(
            lambda: counter(sink, "rejected.malformed") >= 1, 10, "the garbage cancel counted"
        )
        echo = await sink.send_task("dev-1", "echo", payload="alive")
        await sink.wait(lambda: bool(sink.results_for({echo.task_id})), 10, "echo result")


async def test_a_queued_tasks_cancel_holds_across_a_restart(
    broker: Broker, agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    proc = agent()
    async with Sink(broker.port) as sink:
        await sink.wait(lambda: sink.state_of("dev-1") == "online", 20, "agent online")
        running = await sink.send_task("dev-1", "echo", sleep_s=60, payload="long")
        queued = await sink.send_task("dev-1", "echo", payload="never")
        await sink.wait(
            lambda: "dev-1" in sink.capacity and sink.capacity["dev-1"].slots.queued == 1,
            10,
            "one task queued",
        )
        await sink.send_cancel("dev-1", [queued.task_id])
        await sink.wait(lambda: bool(sink.results_for({queued.task_id})), 10, "queued cancelled")
        # Killed outright: the running task stays in the inbox, the cancelled one does not.
        proc.signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        assert inbox_ids(tmp_path / "state") == {running.task_id}
        proc.start()
        await sink.wait(
            lambda: counter(sink, "tasks.accepted") == 1 and sink.state_of("dev-1") == "online",
            20,
            "the restarted agent resumed one task",
        )
        await sink.send_cancel("dev-1", [running.task_id])
        await sink.wait(lambda: bool(sink.results_for({running.task_id})), 10, "running cancelled")
        assert sink.results_for({running.task_id})[running.task_id].status == "cancelled"
        # The cancelled queued task never ran: its one result is the cancel's.
        assert [r.status for r in sink.applied.values() if r.task_id == queued.task_id] == [
            "cancelled"
        ]


async def test_a_running_benchmark_is_cancelled_before_it_measures(
    broker: Broker, agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """The benchmark's measuring process is stopped by the cancel: a cancelled result, and
    no figures cached."""
    agent()
    async with Sink(broker.port) as sink:
        await sink.wait(lambda: sink.state_of("dev-1") == "online", 20, "agent online")
        bench = await sink.send_task("dev-1", BENCHMARK)
        await sink.wait(lambda: bench.task_id in sink.task_acks, 10, "the benchmark accepted")
        await sink.send_cancel("dev-1", [bench.task_id], reason="user")
        await sink.wait(lambda: bool(sink.results_for({bench.task_id})), 10, "cancelled")
        result = sink.results_for({bench.task_id})[bench.task_id]
        assert (result.status, result.error) == ("cancelled", "cancelled: user")
        assert not (tmp_path / "state" / "probe.json").exists()


async def test_a_deploy_cancelled_during_its_download_is_not_served(
    broker: Broker, agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """The model arrives, but the cancel came first: the deploy ends before the swap and the
    agent's model index does not name it."""
    from tests.agent.inference.conftest import make_linear

    model = make_linear(3, n_in=512, n_out=64, n=50).onnx  # ~130 kB: 1 KiB pieces, 10 ms apart
    with HttpServer() as blobs:
        digest = blobs.add(model)
        blobs.fault(digest, Fault("slow", delay=0.01))
        cfg = write_agent_config(
            tmp_path / "dev-1.toml",
            device_id="dev-1",
            port=broker.port,
            state_dir=tmp_path / "state",
            agent={"slots": 1},
            fetch={"origins": [f"http://127.0.0.1:{blobs.port}"]},
        )
        proc = AgentProcess(config_path=cfg, log_path=tmp_path / "dev-1.log")
        proc.start()
        try:
            async with Sink(broker.port) as sink:
                await sink.wait(lambda: sink.state_of("dev-1") == "online", 20, "agent online")
                params = DeployParams(
                    name="clf", digest=digest, size=len(model), url=blobs.url(digest), format="onnx"
                )
                task = await sink.send_task("dev-1", DEPLOY, **encode_params(DEPLOY, params))
                await sink.wait(
                    lambda: any(r.path.endswith(digest) for r in blobs.requests),
                    10,
                    "the download started",
                )
                await sink.send_cancel("dev-1", [task.task_id], reason="user")
                await sink.wait(lambda: bool(sink.results_for({task.task_id})), 20, "a result")
                result = sink.results_for({task.task_id})[task.task_id]
                assert result.status == "cancelled"
                assert "cancelled" in (result.error or "")
                index = tmp_path / "state" / "models" / "index.json"
                assert not index.exists() or "clf" not in json.loads(index.read_text())
        finally:
            proc.kill()
