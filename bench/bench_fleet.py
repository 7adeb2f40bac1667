"""Fleet scale: 1,000 virtual devices (real agents) against one coordinator on this machine.

    python -m bench.bench_fleet [--devices 1000] [--processes 4] [--interval 5] [--window 30]
                                [--tasks 1000] [--broker mosquitto|embedded] [--tiny]
                                [--write-docs]

Everything runs as it would in production, each in its own process: mosquitto, the
coordinator (``lepton coordinator run``, SQLite with its default settings) and the fleet
(``lepton-sim``, split over ``--processes`` processes with ``--first-index``). Beside
them, a bare paho subscriber that only timestamps what the broker delivers: the baseline
for what the coordinator adds.

1. Registration: from starting the simulators until the coordinator's registry counts
   every device online (``GET /v1/health``), against the moment the bare subscriber had
   seen every device's retained birth message.
2. Report lag in steady state, over ``--window`` seconds: a capacity report's sent time
   (``ts``, stamped by the agent) against the registry's ``last_seen`` for it (the
   ``received_at`` of its capacity history row), p50/p99/max; and from the registry's write
   to the database (``lepton_registry_lag_seconds``, arrival to commit). Baseline: the same
   reports' sent time against their arrival at the bare subscriber.
3. Scheduler round: ``--tasks`` unpinned ``echo`` tasks committed in one transaction; time
   until all are placed and dispatched (the scheduler's next cycle: load devices, cost
   matrix, solve, explanations, assignment, publish) and until all results are recorded;
   solver time and batch sizes from the coordinator's metrics.

``--tiny`` (20 devices, 1 process, short windows) is what the test suite runs.
``--write-docs`` replaces the ``## Fleet scale`` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import resource
import sqlite3
import tempfile
import time
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench import _common
from lepton.demo.stack import Stack, StackSpec

SECTION = "## Fleet scale"


# ---------------------------------------------------------------- baseline subscriber


def bare_watcher(port: int, ready: MpEvent, stop: MpEvent, out: Any) -> None:
    """Timestamp births and capacity reports as the broker delivers them."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from lepton.protocol import codec
    from lepton.protocol.messages import CapacityReport, State

    online_at: dict[str, float] = {}
    lags: list[tuple[float, float]] = []

    def on_message(_c: Any, _u: Any, m: Any) -> None:
        now = time.time()
        device = m.topic.split("/")[4]
        try:
            if m.topic.endswith("/state"):
                state = codec.decode(m.payload, State)
                if state.state == "online":
                    online_at.setdefault(device, now)
            elif m.topic.endswith("/capacity"):
                report = codec.decode(m.payload, CapacityReport)
                lags.append((report.ts, now - report.ts))
        except Exception:  # a baseline counts what decodes
            pass

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-fleet-watcher")
    c.on_message = on_message
    c.on_subscribe = lambda *_a: ready.set()
    c.connect("127.0.0.1", port)
    c.subscribe(
        [("lepton/v1/default/device/+/state", 1), ("lepton/v1/default/device/+/capacity", 0)]
    )
    c.loop_start()
    stop.wait(timeout=3600)
    c.loop_stop()
    out.put({"online_at": online_at, "lags": lags})


# ---------------------------------------------------------------- helpers


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def metrics(api: httpx.Client) -> dict[str, list[tuple[dict[str, str], float, str]]]:
    """Samples by metric family name: (labels, value, sample name)."""
    out: dict[str, list[tuple[dict[str, str], float, str]]] = {}
    for fam in text_string_to_metric_families(api.get("/metrics").text):
        out[fam.name] = [(dict(s.labels), s.value, s.name) for s in fam.samples]
    return out


def hist(m: dict[str, Any], name: str) -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative buckets (le, count), sum, count) of a histogram."""
    samples = m.get(name, [])
    buckets = sorted((float(lb["le"]), v) for lb, v, sn in samples if sn.endswith("_bucket"))
    total = next((v for _, v, sn in samples if sn.endswith("_sum")), 0.0)
    count = next((v for _, v, sn in samples if sn.endswith("_count")), 0.0)
    return buckets, total, count


def hist_quantile(before: Any, after: Any, q: float) -> float:
    """Upper bound of the bucket holding quantile ``q`` of what was observed between two
    scrapes of a histogram."""
    (b0, _, c0), (b1, _, c1) = before, after
    n = c1 - c0
    if n <= 0:
        return math.nan
    prev = dict(b0)
    for le, cum in b1:
        if cum - prev.get(le, 0.0) >= q * n:
            return le
    return math.inf


def health(api: httpx.Client) -> dict[str, Any]:
    return dict(api.get("/v1/health").json())


def insert_echo_tasks(database_url: str, n: int) -> float:
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
    rows = []
    for i in range(n):
        params = encode_params(ECHO, EchoParams(payload=i))
        task = build_task(cfg, TaskRequest(kind=ECHO, params=params, demand_gops=0.5), now=now)
        rows.append(
            TaskRow(
                **asdict(task),
                state="pending",
                attempt=0,
                next_attempt_at=now,
                updated_at=now,
            )
        )
    engines = make_engines(database_url)
    try:
        with Session(engines.write) as session, session.begin():
            session.add_all(rows)
        return time.time()
    finally:
        engines.dispose()


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.05) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.time()
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * args.devices + 1024
    if soft < want:  # mosquitto inherits it: one descriptor per connected device
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, want), hard))
    ctx = mp.get_context("spawn")
    figures: dict[str, Any] = {"devices": args.devices, "processes": args.processes}
    with tempfile.TemporaryDirectory(prefix="lepton-bench-fleet-") as tmp:
        spec = StackSpec(
            workdir=Path(tmp),
            devices=args.devices,
            broker=args.broker,
            capacity_interval_s=args.interval,
            data=None,
            fleet_processes=args.processes,
            tuned=False,
            host_gflops=50.0,
            # The bare subscriber below is the baseline: an anonymous observer of every
            # device's topics, which a broker with an account per client would refuse.
            broker_accounts=False,
        )
        with Stack(spec) as stack, contextlib.ExitStack() as scope:
            stack.start_broker()
            stack.start_coordinator()
            # HTTPS verified with the stack's fleet CA, with its operator token.
            api = scope.enter_context(
                httpx.Client(
                    base_url=stack.api_url, timeout=30, headers=stack.headers, verify=stack.verify
                )
            )
            assert stack.broker is not None
            ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
            watcher = ctx.Process(target=bare_watcher, args=(stack.broker.port, ready, stop, out))
            watcher.start()
            ready.wait(30)
            coord = psutil.Process(stack.pids()["coordinator"])

            # 1. registration
            t0 = time.time()
            stack.start_fleet()
            t_reg = wait_until(
                lambda: (stack.check_alive(), health(api)["devices"]["online"])[1] >= args.devices,
                args.timeout,
                "every device online in the registry",
                interval=0.25,
            )
            devices = api.get("/v1/devices", params={"limit": 10_000}).json()
            t_rep = wait_until(
                lambda: all(
                    d["capacity"] is not None
                    for d in api.get("/v1/devices", params={"limit": 10_000}).json()
                ),
                args.timeout,
                "a capacity report from every device",
                interval=0.5,
            )
            figures["registration_s"] = t_reg - t0
            figures["all_reporting_s"] = t_rep - t0
            figures["registered"] = len(devices)

            # 2. steady-state report lag
            time.sleep(args.interval)
            m0 = metrics(api)
            coord.cpu_percent(None)
            fleet_procs = [
                psutil.Process(p) for k, p in stack.pids().items() if k.startswith("fleet")
            ]
            for p in fleet_procs:
                p.cpu_percent(None)
            w0 = time.time()
            time.sleep(args.window)
            w1 = time.time()
            figures["coordinator_cpu_pct"] = coord.cpu_percent(None)
            figures["fleet_cpu_pct"] = sum(p.cpu_percent(None) for p in fleet_procs)
            m1 = metrics(api)
            db = stack.data_dir / "coordinator.db"
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                rows = conn.execute(
                    "SELECT received_at - ts FROM capacity_history WHERE ts >= ? AND ts < ?",
                    (w0, w1),
                ).fetchall()
            lags = [float(r[0]) for r in rows]
            figures["window_s"] = w1 - w0
            figures["reports"] = len(lags)
            figures["lag_p50_s"] = pct(lags, 50)
            figures["lag_p99_s"] = pct(lags, 99)
            figures["lag_max_s"] = max(lags, default=math.nan)
            reg = "lepton_registry_lag_seconds"
            figures["commit_p99_le_s"] = hist_quantile(hist(m0, reg), hist(m1, reg), 0.99)
            _, s0, c0 = hist(m0, reg)
            _, s1, c1 = hist(m1, reg)
            figures["commit_mean_s"] = (s1 - s0) / (c1 - c0) if c1 > c0 else math.nan

            # 3. scheduler round
            before = metrics(api)
            t_commit = insert_echo_tasks(stack.database_url, args.tasks)
            t_placed = wait_until(
                lambda: health(api)["tasks"]["pending"] == 0,
                args.timeout,
                "every task placed",
            )
            t_done = wait_until(
                lambda: health(api)["tasks"]["succeeded"] >= args.tasks,
                args.timeout,
                "every result recorded",
                interval=0.1,
            )
            after = metrics(api)
            _, solve0, n0 = hist(before, "lepton_scheduler_solve_seconds")
            _, solve1, n1 = hist(after, "lepton_scheduler_solve_seconds")
            _, tasks0, _ = hist(before, "lepton_scheduler_batch_tasks")
            _, tasks1, _ = hist(after, "lepton_scheduler_batch_tasks")
            figures["tasks"] = args.tasks
            figures["placed_s"] = t_placed - t_commit
            figures["results_s"] = t_done - t_commit
            figures["batches"] = int(n1 - n0)
            figures["solve_s"] = solve1 - solve0
            figures["planned_tasks"] = int(tasks1 - tasks0)

            stop.set()
            seen = out.get(timeout=60)
            watcher.join(30)
            births = sorted(seen["online_at"].values())
            figures["broker_births_s"] = (
                births[args.devices - 1] - t0 if len(births) >= args.devices else math.nan
            )
            bare = [lag for ts, lag in seen["lags"] if w0 <= ts < w1]
            figures["bare_reports"] = len(bare)
            figures["bare_lag_p50_s"] = pct(bare, 50)
            figures["bare_lag_p99_s"] = pct(bare, 99)
            t_stop = time.time()
        figures["shutdown_s"] = time.time() - t_stop
    return figures


# ---------------------------------------------------------------- output


def rows(f: dict[str, Any]) -> list[tuple[str, str, str]]:
    def s(v: float) -> str:
        return "n/a" if not math.isfinite(v) else f"{v:.2f} s" if v >= 1 else f"{v * 1000:.0f} ms"

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b and math.isfinite(a) and math.isfinite(b) else ""

    return [
        ("figure", "coordinator", "bare subscriber (baseline)"),
        (
            "all devices online (start -> registry / broker)",
            s(f["registration_s"]),
            s(f["broker_births_s"]),
        ),
        ("  ratio", ratio(f["registration_s"], f["broker_births_s"]), "1.00x"),
        ("all devices reporting capacity", s(f["all_reporting_s"]), ""),
        (
            f"report lag p50 (sent -> last_seen), {f['reports']:,} reports",
            s(f["lag_p50_s"]),
            s(f["bare_lag_p50_s"]),
        ),
        ("report lag p99", s(f["lag_p99_s"]), s(f["bare_lag_p99_s"])),
        ("  ratio", ratio(f["lag_p99_s"], f["bare_lag_p99_s"]), "1.00x"),
        ("report lag max", s(f["lag_max_s"]), ""),
        (
            "arrival -> commit (mean; p99 bucket bound)",
            f"{s(f['commit_mean_s'])}; <= {s(f['commit_p99_le_s'])}",
            "",
        ),
        (f"scheduler: {f['tasks']:,} tasks committed -> all placed and sent", s(f["placed_s"]), ""),
        (f"  in {f['batches']} batch(es), solver time", s(f["solve_s"]), ""),
        ("  -> all results recorded", s(f["results_s"]), ""),
        (
            "coordinator CPU during the window (% of one core)",
            f"{f['coordinator_cpu_pct']:.0f} %",
            "",
        ),
        ("fleet processes CPU during the window", f"{f['fleet_cpu_pct']:.0f} %", ""),
    ]


def markdown(f: dict[str, Any], command: str) -> str:
    lines = [
        SECTION,
        "",
        _common.run_line(command),
        "",
        f"{f['devices']:,} virtual devices (each a real agent: its own MQTT connection, outbox "
        f"and capacity reports every {f['interval']:g} s) in {f['processes']} simulator "
        "processes, one mosquitto, one coordinator process on SQLite with its default "
        "settings, all on this machine. A bare paho subscriber on the same broker is the "
        "baseline: what the broker delivers, without validation or database work.",
        "",
        "| figure | coordinator | bare subscriber |",
        "|---|---|---|",
    ]
    for name, a, b in rows(f)[1:]:
        lines.append(f"| {name.strip()} | {a} | {b} |")
    lines.append("")
    return "\n".join(lines)


def write_docs(section: str, path: Path) -> None:
    """Replace (or append) the ``## Fleet scale`` section of ``path``."""
    _common.write_section(SECTION, section, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4, help="simulator processes")
    parser.add_argument("--interval", type=float, default=5.0, help="capacity report interval, s")
    parser.add_argument("--window", type=float, default=30.0, help="steady-state window, s")
    parser.add_argument("--tasks", type=int, default=1000, help="tasks in the scheduler batch")
    parser.add_argument("--broker", choices=("mosquitto", "embedded"), default="mosquitto")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--tiny", action="store_true", help="20 devices, short windows (tests)")
    parser.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.tiny:
        args.devices, args.processes, args.interval, args.window, args.tasks = 20, 1, 1.0, 3.0, 50
    figures = run(args)
    figures["interval"] = args.interval
    print(_common.table(rows(figures)))
    print(json.dumps(figures, indent=2, sort_keys=True, default=str))
    if args.write_docs:
        command = _common.command_line("bench.bench_fleet", argv)
        write_docs(markdown(figures, command), _common.REPO / "docs" / "BENCHMARKS.md")
    return figures


if __name__ == "__main__":
    main()
