"""Fault tests with real processes: broker outages, agent kills, dead connections.

Each asserts that nothing was lost and nothing was applied twice.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lepton.protocol.messages import Result
from tests.support.agents import AgentProcess, Sink, write_agent_config
from tests.support.broker import Broker

pytestmark = pytest.mark.slow


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    procs: list[AgentProcess] = []

    def make(mqtt: Broker, device_id: str = "dev-1", **sections: dict[str, object]) -> AgentProcess:
        state = tmp_path / f"state-{device_id}"
        cfg = write_agent_config(
            tmp_path / f"{device_id}.toml",
            device_id=device_id,
            port=mqtt.port,
            state_dir=state,
            **sections,
        )
        p = AgentProcess(config_path=cfg, log_path=tmp_path / f"{device_id}.log")
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.kill()


def outbox_rows(state_dir: Path) -> int:
    conn = sqlite3.connect(state_dir / "agent.db")
    try:
        return int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_broker_outage_loses_nothing(
    broker: Broker, agent_factory: Callable[..., AgentProcess], how: str
) -> None:
    """>= 1,000 results made while the broker is down for 10+ s all arrive, each applied once."""
    n_tasks, outage_s = 2500, 11.0
    agent = agent_factory(broker, agent={"slots": 4, "queue_limit": 5000})
    agent.start()
    async with Sink(broker.port) as sink:
        await sink.wait(lambda: sink.state_of("dev-1") == "online", 20, "agent online")
        tasks = await sink.send_tasks("dev-1", n_tasks, sleep_s=0.03)
        ids = {t.task_id for t in tasks}
        await sink.wait(
            lambda: len(ids & sink.task_acks.keys()) == n_tasks, 30, "all tasks accepted"
        )
        assert all(sink.task_acks[i].accepted for i in ids)

        down_at = time.time()
        broker.stop() if how == "sigterm" else broker.kill()
        await asyncio.sleep(outage_s)
        up_at = time.time()
        broker.start()

        await sink.wait(
            lambda: len(sink.results_for(ids)) == n_tasks, 90, f"{n_tasks} results after recovery"
        )
        results = [r for r in sink.applied.values() if r.task_id in ids]
        produced_offline = sum(
            1 for r in results if r.finished_at and down_at <= r.finished_at <= up_at
        )
        # Every task has exactly one applied result (results are keyed by id; one id per task).
        assert len(results) == n_tasks
        assert len({r.task_id for r in results}) == n_tasks
        assert all(r.status == "succeeded" for r in results)
        assert produced_offline >= 1000, (
            f"only {produced_offline} results were produced during the outage"
        )
        print(
            f"\n{how}: {produced_offline} results produced offline; deliveries {sink.deliveries} "
            f"for {len(sink.applied)} results "
            f"({sink.deliveries - len(sink.applied)} duplicates, applied once)"
        )
        await sink.wait(
            lambda: outbox_rows(agent.config_path.parent / "state-dev-1") == 0,
            60,
            "outbox emptied by acks",
        )


async def test_agent_sigkill_with_unacked_results_resends_after_restart(
    broker: Broker, agent_factory: Callable[..., AgentProcess]
) -> None:
    agent = agent_factory(broker, agent={"slots": 2})
    agent.start()
    # A coordinator that is not acknowledging (e.g. down): results pile up in the outbox.
    async with Sink(broker.port, ack=False, client_id="mute") as mute:
        await mute.wait(lambda: mute.state_of("dev-1") == "online", 20, "agent online")
        # Long enough that the kill lands mid-run even on a loaded machine (300 x 0.06 s / 2 slots).
        tasks = await mute.send_tasks("dev-1", 300, sleep_s=0.06)
        ids = {t.task_id for t in tasks}
        await mute.wait(
            lambda: len(mute.results_for(ids)) >= 100, 30, "100 results delivered, unacked"
        )
        agent.signal(signal.SIGKILL)
        agent.wait()
        before_restart = len(mute.results_for(ids))
    state_dir = agent.config_path.parent / "state-dev-1"
    pending = outbox_rows(state_dir)
    assert pending >= before_restart >= 100  # nothing acknowledged, so nothing deleted
    assert before_restart < 300  # killed mid-run: some tasks were still queued or running

    agent.start()
    async with Sink(broker.port, ack=True, client_id="acker") as sink:
        await sink.wait(
            lambda: len(sink.results_for(ids)) == 300, 60, "all 300 results after restart"
        )
        results = [r for r in sink.applied.values() if r.task_id in ids]
        assert len(results) == 300  # one applied result per task: none lost, none doubled
        await sink.wait(lambda: outbox_rows(state_dir) == 0, 30, "outbox emptied")


@pytest.mark.parametrize("how", ["sigstop", "sigkill"])
async def test_dead_connection_turns_state_offline_within_keepalive(
    broker: Broker, agent_factory: Callable[..., AgentProcess], how: str
) -> None:
    keepalive = 4
    agent = agent_factory(broker, broker={"keepalive_s": keepalive})
    agent.start()
    async with Sink(broker.port) as sink:
        await sink.wait(lambda: sink.state_of("dev-1") == "online", 20, "agent online")
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        agent.signal(signal.SIGSTOP if how == "sigstop" else signal.SIGKILL)
        await sink.wait(lambda: sink.state_of("dev-1") == "offline", 4 * keepalive, "will message")
        elapsed = sink.states["dev-1"][-1][0] - t0
        # A killed process closes its socket: the broker sends the will at once. A frozen one
        # (SIGSTOP, like a hung device or a cut link) is caught by the broker's keepalive check:
        # MQTT says 1.5 x keepalive after the last packet, but Mosquitto 2.0.11 (Debian 12)
        # took 2.25-2.65 x here, also with the agent publishing every 0.5 s up to the stop,
        # and 2.8 x on a loaded machine: 3 x is the bound this broker meets.
        bound = 1.5 * keepalive if how == "sigkill" else 3.0 * keepalive
        assert elapsed <= bound, f"offline after {elapsed:.2f} s"
        assert sink.states["dev-1"][-1][1].reason == "connection lost"
        print(
            f"\n{how}: retained state offline {elapsed:.2f} s after the connection died "
            f"(keepalive {keepalive} s)"
        )
    # A late subscriber sees the retained offline state.
    async with Sink(broker.port, client_id="late") as late:
        await late.wait(lambda: late.state_of("dev-1") == "offline", 5, "retained offline")


async def test_sigterm_drains_running_tasks_and_exits_cleanly(
    broker: Broker, agent_factory: Callable[..., AgentProcess]
) -> None:
    agent = agent_factory(broker, agent={"slots": 2})
    agent.start()
    async with Sink(broker.port) as sink:
        await sink.wait(lambda: sink.state_of("dev-1") == "online", 20, "agent online")
        running = [await sink.send_task("dev-1", sleep_s=1.5) for _ in range(2)]
        queued = [await sink.send_task("dev-1", sleep_s=0.1) for _ in range(3)]
        await sink.wait(
            lambda: all(t.task_id in sink.task_acks for t in running + queued), 10, "acks"
        )
        await asyncio.sleep(0.3)  # the first two are running now
        agent.signal(signal.SIGTERM)
        assert await asyncio.to_thread(agent.wait, 30) == 0
        ids = {t.task_id for t in running}
        await sink.wait(
            lambda: len(sink.results_for(ids)) == 2, 10, "running tasks finished before exit"
        )
        assert all(
            isinstance(r, Result) and r.status == "succeeded"
            for r in sink.results_for(ids).values()
        )
        await sink.wait(lambda: sink.state_of("dev-1") == "offline", 5, "offline state")
        assert sink.states["dev-1"][-1][1].reason == "shutdown"
        # Queued tasks were not started; they resume on the next start.
        agent.start()
        qids = {t.task_id for t in queued}
        await sink.wait(
            lambda: len(sink.results_for(qids)) == 3, 20, "queued tasks resumed after restart"
        )
