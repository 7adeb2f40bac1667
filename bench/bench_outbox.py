"""Outbox throughput: results persisted (SQLite, group commit) and published with QoS 1,
against raw QoS 1 publishing of the same payloads without the outbox, in one run.

    python -m bench.bench_outbox [--n 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiomqtt

from bench import _common
from lepton.agent.config import load_config
from lepton.agent.link import PUBLISH_BATCH, Link
from lepton.agent.metrics import Counters
from lepton.agent.outbox import Outbox
from lepton.protocol import topics
from lepton.protocol.codec import encode
from lepton.protocol.messages import Result, State


def _payloads(n: int) -> list[tuple[str, bytes]]:
    now = time.time()
    out = []
    for i in range(n):
        r = Result(
            task_id=f"task-{i:08d}",
            status="succeeded",
            output={"echo": i, "label": 3},
            started_at=now,
            finished_at=now,
        )
        out.append((r.id, encode(r)))
    return out


async def raw_publish(port: int, payloads: list[tuple[str, bytes]]) -> float:
    topic = topics.device_topic("default", "raw", topics.RESULT)
    client = aiomqtt.Client("127.0.0.1", port, identifier="raw", max_inflight_messages=100)
    client.pending_calls_threshold = 2 * PUBLISH_BATCH
    async with client:
        t0 = time.perf_counter()
        for i in range(0, len(payloads), PUBLISH_BATCH):
            chunk = payloads[i : i + PUBLISH_BATCH]
            await asyncio.gather(*(client.publish(topic, p, qos=1, timeout=60) for _, p in chunk))
        return time.perf_counter() - t0


async def outbox_publish(
    port: int, payloads: list[tuple[str, bytes]], sync: str, state_dir: Path
) -> float:
    config = load_config(
        None,
        env={},
        overrides={
            "device.id": f"outbox-{sync}",
            "broker.port": port,
            "agent.state_dir": state_dir,
            "outbox.sync": sync,
        },
    )
    counters = Counters()
    async with Outbox(state_dir / "agent.db", sync=sync) as box:  # type: ignore[arg-type]
        link = Link(
            config,
            outbox=box,
            counters=counters,
            birth=lambda: State(state="online"),
            on_message=lambda *a: asyncio.sleep(0),
        )
        runner = asyncio.create_task(link.run())
        await asyncio.wait_for(link.connected.wait(), 10)
        t0 = time.perf_counter()
        # Results arrive from concurrent workers; each is committed before it may be published.
        sem = asyncio.Semaphore(64)

        async def one(msg_id: str, payload: bytes) -> None:
            async with sem:
                await box.put(msg_id, link.result_topic, payload)
                link.wake()

        await asyncio.gather(*(one(i, p) for i, p in payloads))
        ok = await link.flush(timeout=300)
        elapsed = time.perf_counter() - t0
        runner.cancel()
        assert ok, "outbox did not drain"
        assert counters["results.published"] >= len(payloads), counters.snapshot()
        return elapsed


async def main_async(n: int) -> dict[str, float]:
    payloads = _payloads(n)
    with _common.private_broker() as broker, tempfile.TemporaryDirectory() as tmp:
        await raw_publish(broker.port, payloads[: min(n, 1000)])  # warm-up
        raw_s = await raw_publish(broker.port, payloads)
        full_s = await outbox_publish(broker.port, payloads, "full", Path(tmp) / "full")
        normal_s = await outbox_publish(broker.port, payloads, "normal", Path(tmp) / "normal")
    raw_rate, full_rate, normal_rate = n / raw_s, n / full_s, n / normal_s
    print(
        _common.table(
            [
                ("path", "results/s", "ratio vs raw QoS 1"),
                ("raw QoS 1 publish (no outbox)", f"{raw_rate:,.0f}", "1.00x"),
                ("outbox sync=full + publish", f"{full_rate:,.0f}", f"{full_rate / raw_rate:.2f}x"),
                (
                    "outbox sync=normal + publish",
                    f"{normal_rate:,.0f}",
                    f"{normal_rate / raw_rate:.2f}x",
                ),
            ]
        )
    )
    print(f"n={n}; target: outbox (sync=full) >= 0.5x raw")
    return {"raw": raw_rate, "full": full_rate, "normal": normal_rate}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000)
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args.n))


if __name__ == "__main__":
    main()
