"""Coordinator ingest: capacity reports applied per second against a bare paho subscriber on
the same stream, and registry lag with a simulated fleet, in one run.

    python -m bench.bench_ingest [--reports 50000] [--devices 2000] [--interval 5]
                                 [--duration 30] [--db-url URL] [--no-aiomqtt]

1. Throughput. One publisher process sends ``--reports`` capacity reports (QoS 0, 200
   device topics) as fast as it can. Two subscribers receive the same stream at once: the
   coordinator's ingest (a real :class:`~lepton.coordinator.service.Coordinator` in this process:
   paho network thread, validation through ``lepton.protocol.codec``, registry buffer, batched
   SQLite writes) and a bare paho subscriber in its own process that only counts. Rates are
   messages over the time from each subscriber's first to last message. Target: >= 0.5x.
2. The decision evidence: a bare aiomqtt subscriber (``async for message in
   client.messages``) against bare paho on another stream of the same size.
3. Fleet. ``--devices`` simulated devices (paho clients in a separate process, 100 device
   topics per connection) report every ``--interval`` seconds, phases spread evenly, for
   ``--duration`` seconds. Registry lag = commit time of the batch holding a report minus the
   report's own timestamp (set when published). Target: p99 <= 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import statistics
import tempfile
import threading
import time
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench import _common
from lepton.protocol import codec, topics
from lepton.protocol.messages import (
    Bench,
    CapacityReport,
    Cpu,
    Disk,
    Memory,
    Network,
    Slots,
    Thermal,
)

FILTER = "lepton/v1/default/device/+/capacity"
PHASES = ("throughput", "transport", "fleet")


def make_report(i: int, interval_s: float = 5.0) -> CapacityReport:
    """A report shaped like a Raspberry Pi agent's."""
    return CapacityReport(
        device_model="Raspberry Pi 4 Model B Rev 1.5",
        device_class="rpi4",
        cpu=Cpu(count=4, percent=12.5 + i % 50, load1=0.4, freq_mhz=[1500.0] * 4, arch="aarch64"),
        memory=Memory(total=4 << 30, available=(2 << 30) + i),
        disk=Disk(total=32 << 30, free=20 << 30),
        network=Network(bytes_sent=10_000 + i, bytes_recv=20_000 + i, tx_rate=120.0, rx_rate=300.0),
        thermal=Thermal(temperature_c=48.0 + i % 10, source="thermal_zone0"),
        runtimes=["onnxruntime", "tflite"],
        bench=Bench(fp32_gflops=13.5, int8_gops=27.0, runtime="onnxruntime"),
        slots=Slots(total=2, busy=i % 3 // 2),
        interval_s=interval_s,
        uptime_s=3600.0 + i,
        counters={"tasks.accepted": i, "results.sent": i},
        tags=["lab"],
    )


# ---------------------------------------------------------------- child processes


def bare_paho(port: int, expected: int, ready: MpEvent, out: Any) -> None:
    """Count messages on the capacity filter; report (count, rate)."""
    state = {"n": 0, "t0": 0.0, "t1": 0.0}
    done = threading.Event()

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        now = time.perf_counter()
        if state["n"] == 0:
            state["t0"] = now
        state["n"] += 1
        state["t1"] = now
        if state["n"] >= expected:
            done.set()

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare-paho", protocol=paho.MQTTv5)
    c.on_message = on_message
    c.on_subscribe = lambda *_a: ready.set()
    c.connect("127.0.0.1", port)
    c.subscribe(FILTER, qos=0)
    c.loop_start()
    done.wait(timeout=600)
    time.sleep(0.5)  # stragglers
    c.loop_stop()
    n, span = state["n"], state["t1"] - state["t0"]
    out.put(("bare paho", n, n / span if span > 0 else 0.0))


def bare_aiomqtt(port: int, expected: int, ready: MpEvent, out: Any) -> None:
    import aiomqtt

    async def run() -> None:
        n, t0, t1 = 0, 0.0, 0.0
        async with aiomqtt.Client(
            "127.0.0.1", port, identifier="bench-aiomqtt", protocol=aiomqtt.ProtocolVersion.V5
        ) as c:
            await c.subscribe(FILTER, qos=0)
            ready.set()
            try:
                async with asyncio.timeout(600):
                    async for _m in c.messages:
                        now = time.perf_counter()
                        if n == 0:
                            t0 = now
                        n += 1
                        t1 = now
                        if n >= expected:
                            break
            except TimeoutError:
                pass
        out.put(("bare aiomqtt", n, n / (t1 - t0) if t1 > t0 else 0.0))

    asyncio.run(run())


def burst_publisher(port: int, n: int, go: MpEvent, out: Any) -> None:
    payloads = [
        (topics.device_topic("default", f"burst-{i:04d}", "capacity"), codec.encode(make_report(i)))
        for i in range(200)
    ]
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=paho.MQTTv5)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    go.wait(60)
    t0 = time.perf_counter()
    for i in range(n):
        topic, payload = payloads[i % len(payloads)]
        c.publish(topic, payload, qos=0)
    c.publish("lepton/v1/default/bench/flush", b"", qos=1).wait_for_publish(120)
    out.put(("publisher", n, n / (time.perf_counter() - t0)))
    c.disconnect()
    c.loop_stop()


def fleet_publisher(
    port: int,
    devices: int,
    interval: float,
    duration: float,
    ready: MpEvent,
    go: MpEvent,
    out: Any,
) -> None:
    """``devices`` reporting every ``interval`` s, phases spread evenly, 100 per connection."""
    per_conn = 100
    clients = []
    for k in range(0, devices, per_conn):
        c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bench-fleet-{k}", protocol=paho.MQTTv5
        )
        c.max_queued_messages_set(0)
        c.connect("127.0.0.1", port)
        c.loop_start()
        clients.append(c)
    templates = [make_report(i, interval) for i in range(devices)]
    names = [topics.device_topic("default", f"sim-{i:05d}", "capacity") for i in range(devices)]
    ready.set()
    go.wait(60)
    start = time.time()
    sent = 0
    late: list[float] = []
    while True:
        now = time.time()
        elapsed = now - start
        if elapsed >= duration:
            break
        # Every device whose next slot has come publishes one report.
        due = int(elapsed / interval * devices) + 1
        while sent < due:
            i = sent % devices
            scheduled = start + sent * interval / devices
            late.append(time.time() - scheduled)
            report = templates[i]
            stamped = msgspec.structs.replace(report, ts=time.time(), id=f"r{sent:012d}")
            payload = codec.encode(stamped)
            clients[i // per_conn].publish(names[i], payload, qos=0)
            sent += 1
        time.sleep(0.002)
    for c in clients:
        c.disconnect()
        c.loop_stop()
    out.put(("fleet", sent, max(late) if late else 0.0))


# ---------------------------------------------------------------- the coordinator side


def coordinator_config(tmp: Path, port: int, db_url: str | None) -> Any:
    # Imported here, not at the top: the publisher and subscriber processes (spawned) import
    # this module too and need none of it.
    from lepton.coordinator.config import load as load_config

    overrides: dict[str, Any] = {
        "instance_id": "bench",
        "data_dir": str(tmp),
        "mqtt.port": port,
        "http.enabled": False,
        "scheduler.batch_interval_s": 5.0,
    }
    if db_url:
        overrides["database.url"] = db_url
    return load_config(env={}, overrides=overrides)


async def throughput(port: int, n: int, tmp: Path, db_url: str | None) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out, ready, go = ctx.Queue(), ctx.Event(), ctx.Event()
    sub = ctx.Process(target=bare_paho, args=(port, n, ready, out))
    pub = ctx.Process(target=burst_publisher, args=(port, n, go, out))
    sub.start()
    pub.start()
    from lepton.coordinator.service import Coordinator

    seen = {"n": 0, "t0": 0.0, "t1": 0.0}
    done = threading.Event()
    async with Coordinator(coordinator_config(tmp, port, db_url)) as c:
        assert await c.link.wait_connected(20)
        original = c.ingest.on_capacity

        def counting(device_id: str, report: CapacityReport, received_at: float) -> None:
            original(device_id, report, received_at)
            now = time.perf_counter()
            if seen["n"] == 0:
                seen["t0"] = now
            seen["n"] += 1
            seen["t1"] = now
            if seen["n"] >= n:
                done.set()

        c.ingest.on_capacity = counting
        await asyncio.to_thread(ready.wait, 30)
        await asyncio.sleep(0.5)
        go.set()
        await asyncio.to_thread(done.wait, 600)
        await c.registry.flush()
        written = c.store.devices.count_devices()["online"]
    results = {
        name: (count, rate) for name, count, rate in (out.get(timeout=600) for _ in range(2))
    }
    sub.join(30)
    pub.join(30)
    span = seen["t1"] - seen["t0"]
    results["coordinator ingest"] = (seen["n"], seen["n"] / span if span > 0 else 0.0)
    results["registry rows written"] = (written, 0.0)
    return results


def aiomqtt_vs_paho(port: int, n: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out, go = ctx.Queue(), ctx.Event()
    r1, r2 = ctx.Event(), ctx.Event()
    procs = [
        ctx.Process(target=bare_paho, args=(port, n, r1, out)),
        ctx.Process(target=bare_aiomqtt, args=(port, n, r2, out)),
        ctx.Process(target=burst_publisher, args=(port, n, go, out)),
    ]
    for p in procs:
        p.start()
    r1.wait(30)
    r2.wait(30)
    time.sleep(0.5)
    go.set()
    results = {
        name: (count, rate) for name, count, rate in (out.get(timeout=900) for _ in range(3))
    }
    for p in procs:
        p.join(30)
    return results


async def fleet(
    port: int, devices: int, interval: float, duration: float, tmp: Path, db_url: str | None
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out, ready, go = ctx.Queue(), ctx.Event(), ctx.Event()
    lags: list[float] = []
    arrivals: list[float] = []
    warmup_until = [0.0]

    def on_flush(batch: Any, committed: float) -> None:
        if committed < warmup_until[0]:
            return
        for _device, report, received_at in batch:
            lags.append(committed - report.ts)
            arrivals.append(committed - received_at)

    pub = ctx.Process(
        target=fleet_publisher, args=(port, devices, interval, duration, ready, go, out)
    )
    pub.start()
    from lepton.coordinator.service import Coordinator

    async with Coordinator(coordinator_config(tmp, port, db_url), on_flush=on_flush) as c:
        assert await c.link.wait_connected(20)
        await asyncio.to_thread(ready.wait, 60)
        await asyncio.sleep(0.5)
        go.set()
        t0 = time.time()
        warmup_until[0] = t0 + interval + 1.0  # first round creates the rows
        _, sent, publisher_late = await asyncio.to_thread(out.get, True, duration + 120)
        await asyncio.sleep(1.0)
        await c.registry.flush()
        online = c.store.devices.count_devices()["online"]
        flushes = c.registry.flushes
    pub.join(30)
    lags.sort()
    arrivals.sort()

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {
        "sent": sent,
        "measured": len(lags),
        "online": online,
        "flushes": flushes,
        "rate": sent / duration,
        "lag_p50": pct(lags, 0.50),
        "lag_p99": pct(lags, 0.99),
        "lag_max": lags[-1] if lags else float("nan"),
        "arrival_to_commit_p99": pct(arrivals, 0.99),
        "publisher_late_max": publisher_late,
        "mean_lag": statistics.fmean(lags) if lags else float("nan"),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {}
    phases = set(args.only or PHASES)
    if args.no_aiomqtt:
        phases.discard("transport")
    with tempfile.TemporaryDirectory(prefix="lepton-bench-ingest-") as tmp:
        if "throughput" in phases:
            with _common.private_broker() as broker:
                report["throughput"] = await throughput(
                    broker.port, args.reports, Path(tmp) / "a", args.db_url
                )
        if "transport" in phases:
            with _common.private_broker() as broker:
                report["aiomqtt_vs_paho"] = aiomqtt_vs_paho(broker.port, args.reports)
        if "fleet" not in phases:
            return report
        with _common.private_broker() as broker:
            report["fleet"] = await fleet(
                broker.port,
                args.devices,
                args.interval,
                args.duration,
                Path(tmp) / "b",
                args.db_url,
            )
    return report


def render(r: dict[str, Any], args: argparse.Namespace) -> str:
    lines: list[str] = []
    if "throughput" in r:
        lines += _render_throughput(r["throughput"], args)
    if "aiomqtt_vs_paho" in r:
        lines += _render_transport(r["aiomqtt_vs_paho"])
    if "fleet" in r:
        lines += _render_fleet(r["fleet"], args)
    return "\n".join(lines)


def _render_throughput(t: dict[str, Any], args: argparse.Namespace) -> list[str]:
    bare = t["bare paho"][1]
    rows: list[tuple[str, ...]] = [("subscriber (same stream)", "received", "per second", "ratio")]
    for name in ("bare paho", "coordinator ingest"):
        count, rate = t[name]
        rows.append((name, f"{count:,}", f"{rate:,.0f}", f"{rate / bare:.2f}x"))
    return [
        f"1. Throughput: {args.reports:,} capacity reports, QoS 0,"
        f" publisher at {t['publisher'][1]:,.0f}/s",
        _common.table(rows),
        f"   registry rows written: {t['registry rows written'][0]}",
        "",
    ]


def _render_transport(a: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, ...]] = [("subscriber (same stream)", "received", "per second", "ratio")]
    for name in ("bare paho", "bare aiomqtt"):
        count, rate = a[name]
        rows.append((name, f"{count:,}", f"{rate:,.0f}", f"{rate / a['bare paho'][1]:.2f}x"))
    return ["2. Transport: aiomqtt message iterator vs paho callback", _common.table(rows), ""]


def _render_fleet(f: dict[str, Any], args: argparse.Namespace) -> list[str]:
    ms = 1000.0
    return [
        f"3. Fleet: {args.devices} devices every {args.interval:g}s for {args.duration:g}s "
        f"({f['rate']:.0f} reports/s, {f['sent']:,} sent,"
        f" {f['measured']:,} measured after warm-up)",
        _common.table(
            [
                ("registry lag", "p50", "p99", "max"),
                (
                    "report ts -> committed",
                    f"{f['lag_p50'] * ms:.0f} ms",
                    f"{f['lag_p99'] * ms:.0f} ms",
                    f"{f['lag_max'] * ms:.0f} ms",
                ),
            ]
        ),
        f"   arrival -> committed p99: {f['arrival_to_commit_p99'] * ms:.0f} ms; "
        f"{f['flushes']} batches; devices online at the end: {f['online']}; "
        f"publisher worst lateness {f['publisher_late_max'] * ms:.0f} ms",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reports", type=int, default=50_000)
    p.add_argument("--devices", type=int, default=2000)
    p.add_argument("--interval", type=float, default=5.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--db-url", default=None, help="default: SQLite in a temporary directory")
    p.add_argument("--no-aiomqtt", action="store_true", help="skip the transport comparison")
    p.add_argument("--only", action="append", choices=PHASES, help="run only these phases")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    result = asyncio.run(main_async(args))
    print(json.dumps(result, indent=2) if args.json else render(result, args))


if __name__ == "__main__":
    main()
