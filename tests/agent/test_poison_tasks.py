"""Finding 2 of the hardening review: one task crash-looped an agent.

A task whose handler takes the process down is counted at each start; after
``agent.crash_limit`` deaths it is failed as ``crashed_agent`` instead of being run again,
and the agent stays up. A model factory the device does not allow is refused without
being imported. Real agent processes against a real broker.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.agents import AgentProcess, Sink, write_agent_config
from tests.support.broker import Broker

pytestmark = pytest.mark.slow


@pytest.fixture
def poison_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    procs: list[AgentProcess] = []

    def make(mqtt: Broker, **agent: object) -> AgentProcess:
        cfg = write_agent_config(
            tmp_path / "dev-1.toml",
            device_id="dev-1",
            port=mqtt.port,
            state_dir=tmp_path / "state",
            agent=dict(agent),
        )
        p = AgentProcess(
            config_path=cfg, log_path=tmp_path / "dev-1.log", module="tests.support.poison_agent"
        )
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.kill()


def inbox_starts(state_dir: Path, task_id: str) -> int | None:
    conn = sqlite3.connect(state_dir / "agent.db")
    try:
        row = conn.execute("SELECT starts FROM inbox WHERE task_id = ?", (task_id,)).fetchone()
        return None if row is None else int(row[0])
    finally:
        conn.close()


async def test_a_task_that_kills_the_agent_is_quarantined_after_two_deaths(
    broker: Broker, poison_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agent = poison_agent(broker, crash_limit=2)
    agent.start()
    async with Sink(broker.port) as sink:
        await sink.wait(lambda: sink.state_of("dev-1") == "online", 20, "agent online")
        poison = await sink.send_task("dev-1", "abort")
        for deaths in (1, 2):  # the first run, then once more after a restart
            rc = await asyncio.to_thread(agent.wait, 30)
            assert rc == -signal.SIGABRT, agent.log()[-2000:]
            assert inbox_starts(tmp_path / "state", poison.task_id) == deaths
            agent.start()
        # Third start: the task is retired, not run, and the agent stays up.
        await sink.wait(
            lambda: poison.task_id in {r.task_id for r in sink.applied.values()},
            30,
            "the poison task's result",
        )
        (result,) = sink.results_for({poison.task_id}).values()
        assert result.status == "failed"
        assert result.error is not None
        assert result.error.startswith("crashed_agent: the agent died 2 times")
        assert result.reason == "crashed_agent"
        assert inbox_starts(tmp_path / "state", poison.task_id) is None  # retired
        echo = await sink.send_task("dev-1", "echo", payload="still here")
        await sink.wait(lambda: echo.task_id in sink.task_acks, 10, "echo accepted")
        await sink.wait(lambda: bool(sink.results_for({echo.task_id})), 10, "echo result")
        assert sink.results_for({echo.task_id})[echo.task_id].output["echo"] == "still here"
        assert agent.proc is not None
        assert agent.proc.poll() is None
        await sink.wait(
            lambda: sink.capacity["dev-1"].counters.get("tasks.crashed_agent") == 1,
            10,
            "the quarantine counted in the capacity report",
        )


async def test_a_task_interrupted_by_a_shutdown_does_not_count_as_a_crash(
    broker: Broker, poison_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agent = poison_agent(broker, drain_timeout_s=0.5)
    agent.start()
    async with Sink(broker.port) as sink:
        await sink.wait(lambda: sink.state_of("dev-1") == "online", 20, "agent online")
        long = await sink.send_task("dev-1", "echo", sleep_s=60)
        await sink.wait(
            lambda: "dev-1" in sink.capacity and sink.capacity["dev-1"].slots.busy == 1,
            10,
            "the task running",
        )
        agent.signal(signal.SIGTERM)
        assert await asyncio.to_thread(agent.wait, 30) == 0
        assert inbox_starts(tmp_path / "state", long.task_id) == 0


async def test_an_os_abort_model_is_refused_by_the_allowlist(
    broker: Broker, poison_agent: Callable[..., AgentProcess]
) -> None:
    """``os:abort`` as a train task's model killed the agent; now it is refused unimported."""
    agent = poison_agent(broker)
    agent.start()
    async with Sink(broker.port) as sink:
        await sink.wait(lambda: sink.state_of("dev-1") == "online", 20, "agent online")
        weights = {"digest": "0" * 64, "size": 10, "url": "http://127.0.0.1:9/w"}
        task = await sink.send_task(
            "dev-1",
            "train",
            job="j",
            round=0,
            model="os:abort",
            weights=weights,
            data="digits",
            upload={"url": "http://127.0.0.1:9/u"},
        )
        await sink.wait(lambda: bool(sink.results_for({task.task_id})), 20, "the train result")
        result = sink.results_for({task.task_id})[task.task_id]
        assert result.status == "failed"
        assert result.error is not None
        assert "'os:abort' is not in the allowed imports (lepton.models.*" in result.error
        assert agent.proc is not None
        assert agent.proc.poll() is None
