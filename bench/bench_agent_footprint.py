"""Idle footprint of the agent daemon: RSS and CPU over a window with capacity reporting on,
against a bare MQTT client process (aiomqtt, connected, idle) measured in the same run.

    python -m bench.bench_agent_footprint [--seconds 60] [--interval 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil

from bench import _common
from tests.support.agents import write_agent_config

BARE_CLIENT = textwrap.dedent(
    """
    import asyncio, sys, aiomqtt
    async def main():
        async with aiomqtt.Client("127.0.0.1", int(sys.argv[1]), identifier="bare", keepalive=30):
            await asyncio.sleep(3600)
    asyncio.run(main())
    """
)


def _measure(
    proc: subprocess.Popen[bytes], warmup: float, seconds: float
) -> tuple[float, float, float]:
    """(RSS MiB at the end, peak RSS MiB, CPU % of one core over the window)."""
    p = psutil.Process(proc.pid)
    time.sleep(warmup)
    cpu0 = p.cpu_times()
    t0 = time.monotonic()
    peak = 0.0
    while time.monotonic() - t0 < seconds:
        peak = max(peak, p.memory_info().rss / 2**20)
        time.sleep(min(1.0, seconds))
    cpu1 = p.cpu_times()
    elapsed = time.monotonic() - t0
    cpu = (cpu1.user - cpu0.user + cpu1.system - cpu0.system) / elapsed * 100
    rss = p.memory_info().rss / 2**20
    return rss, max(peak, rss), cpu


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=5.0, help="capacity report interval")
    parser.add_argument("--warmup", type=float, default=8.0, help="includes the start-up probe")
    args = parser.parse_args(argv)

    env = {k: v for k, v in os.environ.items() if not k.startswith("LEPTON_")}
    env["PYTHONPATH"] = str(_common.REPO)
    with _common.private_broker() as broker, tempfile.TemporaryDirectory() as tmp:
        cfg = write_agent_config(
            Path(tmp) / "agent.toml",
            device_id="footprint",
            port=broker.port,
            state_dir=Path(tmp) / "state",
            agent={"capacity_interval_s": args.interval, "probe": True, "log_level": "WARNING"},
        )
        agent = subprocess.Popen(
            [sys.executable, "-m", "lepton.agent", "run", "--config", str(cfg)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        bare = subprocess.Popen(
            [sys.executable, "-c", BARE_CLIENT, str(broker.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # Measured side by side over the same window.
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                fa = pool.submit(_measure, agent, args.warmup, args.seconds)
                fb = pool.submit(_measure, bare, args.warmup, args.seconds)
                a_rss, a_peak, a_cpu = fa.result()
                b_rss, b_peak, b_cpu = fb.result()
            assert agent.poll() is None, "agent exited during the benchmark"
        finally:
            for p in (agent, bare):
                p.terminate()
                p.wait(timeout=30)
    print(
        _common.table(
            [
                ("process", "RSS MiB", "peak MiB", "CPU % of a core"),
                ("lepton-agent (idle, reporting)", f"{a_rss:.1f}", f"{a_peak:.1f}", f"{a_cpu:.2f}"),
                ("bare aiomqtt client (idle)", f"{b_rss:.1f}", f"{b_peak:.1f}", f"{b_cpu:.2f}"),
                ("ratio agent / bare", f"{a_rss / b_rss:.2f}x", f"{a_peak / b_peak:.2f}x", ""),
            ]
        )
    )
    print(
        f"window {args.seconds:.0f} s, capacity every {args.interval:.0f} s; "
        "targets: RSS <= 60 MB, CPU < 1 %"
    )
    return {"rss_mib": a_rss, "peak_mib": a_peak, "cpu_pct": a_cpu, "bare_rss_mib": b_rss}


if __name__ == "__main__":
    main()
