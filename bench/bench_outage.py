"""Broker outage: queued work across a broker SIGKILL (finding 6 of the hardening review).

    python -m bench.bench_outage [--devices 50] [--tasks 1000] [--outages 3,100]
                                 [--interval 1] [--sleep 2] [--tiny] [--write-docs]

Each scenario runs a fresh stack, every part in its own process as in production:
mosquitto (persistence saved every second), the coordinator (``lepton coordinator run``,
SQLite) and ``--devices`` simulated devices (``lepton-sim``: real agents) reporting
every ``--interval`` seconds, so a device's liveness deadline is 3 intervals. ``--tasks``
``echo`` tasks (``--sleep`` seconds each, the default 3 attempts) are committed at once; a
third of the baseline's run time later the broker is killed with SIGKILL and restarted
``outage`` seconds later, on the same port and persistence directory.

Reported per scenario: tasks succeeded / failed / expired, tasks whose result was applied
more than once (from the coordinator's ``results`` table), tasks that needed more than one
attempt, and the time from commit to the last task settled. Baseline, measured in the same
run: the same scenario without an outage; the ratio is the total time with the outage
against it, and "lost" is the time added beyond the outage itself.

``--tiny`` (10 devices, 100 tasks, a 3 s outage) is what the test suite runs.
``--write-docs`` replaces the ``## Broker outage`` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import _common
from bench.bench_fleet import wait_until
from lepton.demo.broker import MosquittoBroker
from lepton.demo.stack import Stack, StackSpec

SECTION = "## Broker outage"
SETTLED = ("succeeded", "failed", "expired")


def insert_tasks(database_url: str, n: int, sleep_s: float) -> float:
    """``n`` pending echo tasks in one transaction; returns the commit time."""
    from dataclasses import asdict

    from sqlalchemy.orm import Session

    from lepton.coordinator.config import load
    from lepton.coordinator.store.connection import make_engines
    from lepton.coordinator.store.schema import TaskRow
    from lepton.coordinator.tasks.request import TaskRequest
    from lepton.coordinator.tasks.submit import build_task
    from lepton.protocol.tasks import ECHO, EchoParams, encode_params

    cfg = load(env={}, overrides={})
    now = time.time()
    rows = [
        TaskRow(
            **asdict(
                build_task(
                    cfg,
                    TaskRequest(
                        kind=ECHO,
                        params=encode_params(ECHO, EchoParams(payload=i, sleep_s=sleep_s)),
                    ),
                    now=now,
                )
            ),
            state="pending",
            attempt=0,
            next_attempt_at=now,
            updated_at=now,
        )
        for i in range(n)
    ]
    engines = make_engines(database_url)
    try:
        with Session(engines.write) as session, session.begin():
            session.add_all(rows)
        return time.time()
    finally:
        engines.dispose()


def tally(db: Path) -> dict[str, Any]:
    """Settled states, double-applied results and retried tasks, from the database."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        states = dict(conn.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall())
        (twice,) = conn.execute(
            "SELECT count(*) FROM (SELECT task_id FROM results WHERE applied "
            "GROUP BY task_id HAVING count(*) > 1)"
        ).fetchone()
        (retried,) = conn.execute("SELECT count(*) FROM tasks WHERE attempt > 1").fetchone()
        ended = conn.execute(
            "SELECT outcome, acked_at IS NOT NULL, count(*) FROM task_attempts "
            "WHERE outcome != 'succeeded' GROUP BY 1, 2"
        ).fetchall()
    out: dict[str, Any] = {s: int(states.get(s, 0)) for s in SETTLED}
    # Attempts that did not succeed, by how they ended and whether the device had taken them.
    out["other_attempts"] = {f"{o} ({'acked' if a else 'not acked'})": n for o, a, n in ended}
    out["applied_twice"] = int(twice)
    out["retried"] = int(retried)
    return out


def scenario(
    args: argparse.Namespace, outage_s: float | None = None, kill_after_s: float | None = None
) -> dict[str, Any]:
    """One fresh stack; the broker is killed ``kill_after_s`` after the tasks were committed
    and restarted ``outage_s`` later (None: no outage, the baseline)."""
    with tempfile.TemporaryDirectory(prefix="lepton-bench-outage-") as tmp:
        spec = StackSpec(
            workdir=Path(tmp),
            devices=args.devices,
            broker="mosquitto",
            capacity_interval_s=args.interval,
            data=None,
        )
        with Stack(spec) as stack, contextlib.ExitStack() as scope:
            stack.start_broker()
            stack.start_coordinator()
            stack.start_fleet()
            # HTTPS verified with the stack's fleet CA, with its operator token.
            api = scope.enter_context(
                httpx.Client(
                    base_url=stack.api_url, timeout=10, headers=stack.headers, verify=stack.verify
                )
            )

            def health() -> dict[str, Any]:
                return dict(api.get("/v1/health").json())

            wait_until(
                lambda: health()["devices"].get("online", 0) >= args.devices,
                120,
                "every device online",
                interval=0.2,
            )
            t0 = insert_tasks(stack.database_url, args.tasks, args.sleep)
            killed_at = None
            if outage_s is not None and kill_after_s is not None:
                time.sleep(max(0.0, t0 + kill_after_s - time.time()))
                broker = stack.broker
                assert isinstance(broker, MosquittoBroker)
                broker.kill()
                killed_at = time.time()
                time.sleep(outage_s)
                broker.start()

            def settled() -> bool:
                try:
                    tasks = health()["tasks"]
                except httpx.TransportError:
                    return False
                return sum(int(tasks.get(s, 0)) for s in SETTLED) >= int(args.tasks)

            t1 = wait_until(settled, args.timeout + (outage_s or 0), "every task settled", 0.2)
            stack.check_alive()
            out: dict[str, Any] = tally(stack.data_dir / "coordinator.db")
    out.update(outage_s=outage_s, total_s=t1 - t0, killed_after_s=(killed_at or t0) - t0)
    return out


def rows(base: dict[str, Any], runs: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    head = ("outage", "succeeded", "failed", "expired", "applied twice", "retried", "total",
            "vs. no outage", "lost beyond the outage")  # fmt: skip
    out: list[tuple[str, ...]] = [head]
    for r in [base, *runs]:
        o = r["outage_s"]
        out.append(
            (
                "none (baseline)"
                if o is None
                else f"{o:g} s, killed at {r['killed_after_s']:.1f} s",
                str(r["succeeded"]),
                str(r["failed"]),
                str(r["expired"]),
                str(r["applied_twice"]),
                str(r["retried"]),
                f"{r['total_s']:.1f} s",
                f"{r['total_s'] / base['total_s']:.2f}x",
                "" if o is None else f"{r['total_s'] - base['total_s'] - o:.1f} s",
            )
        )
    return out


def markdown(table: list[tuple[str, ...]], command: str) -> str:
    today = datetime.date.today().isoformat()
    md = [f"| {' | '.join(table[0])} |", "|" + "---|" * len(table[0])]
    md += [f"| {' | '.join(r)} |" for r in table[1:]]
    return "\n".join(
        [
            SECTION,
            "",
            f"`{command}` — {today}, {os.cpu_count()} cores ({platform.machine()}), load "
            f"average {os.getloadavg()[0]:.1f} at the end. Broker killed with SIGKILL a third into "
            "the baseline's run time, restarted after the outage; every count from the "
            "coordinator's database.",
            "",
            *md,
            "",
        ]
    )


def write_docs(section: str, path: Path) -> None:
    """Replace (or append) the ``## Broker outage`` section of ``path``."""
    _common.write_section(SECTION, section, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--outages", default="3,100", help="outage lengths, s, comma-separated")
    parser.add_argument("--interval", type=float, default=1.0, help="capacity report interval, s")
    parser.add_argument("--sleep", type=float, default=2.0, help="seconds each task takes")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--tiny", action="store_true", help="10 devices, 100 tasks, one 3 s outage")
    parser.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.tiny:
        args.devices, args.tasks, args.outages, args.sleep = 10, 100, "3", 0.5
    base = scenario(args)
    # A third into the baseline's run: mid-run, whatever this machine's speed.
    kill_after = base["total_s"] / 3
    runs = [scenario(args, float(o), kill_after) for o in args.outages.split(",") if o.strip()]
    table = rows(base, runs)
    print(_common.table(table))
    figures = {"baseline": base, "outages": runs}
    print(json.dumps(figures, indent=2, sort_keys=True))
    if args.write_docs:
        command = _common.command_line("bench.bench_outage", argv)
        write_docs(markdown(table, command), _common.REPO / "docs" / "BENCHMARKS.md")
    return figures


if __name__ == "__main__":
    main()
