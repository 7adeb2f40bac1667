"""What the API's security costs a caller: requests per second with tokens and HTTPS against
the same coordinator with authentication off, measured in one run.

    python -m bench.bench_auth [--reads 2000] [--writes 300] [--tiny] [--write-docs]

Three coordinators are started one after the other, in this process, on one private
mosquitto and each on its own SQLite file: ``--insecure`` over plain HTTP (the baseline),
operator tokens over plain HTTP, and operator tokens over HTTPS (a fleet CA made for the
run, the client verifying it). Each serves ``--reads`` ``GET /v1/tasks?limit=1`` (a read:
the guard looks the token up) and ``--writes`` ``POST /v1/tasks`` (a mutating call: the
guard looks the token up and writes an audit record), one at a time over one keep-alive
connection, after a warm-up. Reported: requests per second and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import ssl
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import _common
from lepton.coordinator.auth import credentials
from lepton.coordinator.auth.cafiles import save_issued
from lepton.coordinator.auth.pki import FleetCA
from lepton.coordinator.auth.store import AuthStore
from lepton.coordinator.config import load
from lepton.coordinator.service import Coordinator

TITLE = "## API security overhead"


async def _measure(
    cfg_overrides: dict[str, Any], *, token: bool, verify: Any, reads: int, writes: int
) -> dict[str, float]:
    cfg = load(env={}, overrides=cfg_overrides)
    async with Coordinator(cfg) as c:
        assert c.api_url is not None
        headers = {}
        if token:
            secret = credentials.new("operator")
            AuthStore(c.store.engine).create_token(
                "bench", credentials.digest(secret), ["admin"], created_by="bench"
            )
            headers["Authorization"] = f"Bearer {secret}"
        async with httpx.AsyncClient(
            base_url=c.api_url, headers=headers, verify=verify, timeout=30
        ) as http:
            for _ in range(50):  # warm-up: connection, caches, the first audit writes
                (await http.get("/v1/tasks", params={"limit": 1})).raise_for_status()
            t0 = time.perf_counter()
            for _ in range(reads):
                (await http.get("/v1/tasks", params={"limit": 1})).raise_for_status()
            read_s = time.perf_counter() - t0
            body = {"kind": "echo", "params": {"payload": 1}, "expires_in_s": 5}
            t0 = time.perf_counter()
            for _ in range(writes):
                (await http.post("/v1/tasks", json=body)).raise_for_status()
            write_s = time.perf_counter() - t0
    return {"reads_per_s": reads / read_s, "writes_per_s": writes / write_s}


async def _run(reads: int, writes: int, rounds: int) -> dict[str, dict[str, float]]:
    with _common.private_broker() as broker, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ca = FleetCA.create()
        ca_file = root / "ca.crt"
        ca_file.write_bytes(ca.cert_pem)
        save_issued(root, "server", ca.issue_server(["127.0.0.1", "localhost"]))
        base = {
            "instance_id": "bench-auth",
            "mqtt.port": broker.port,
            "mqtt.accounts": "none",
            "http.port": 0,
            "database.sqlite_synchronous": "normal",
            "scheduler.batch_interval_s": 3600,  # nothing is placed: only the API is measured
        }
        variants = {
            "insecure, http (baseline)": ({"auth.insecure": True}, False, True),
            "tokens, http": ({}, True, True),
            "tokens, https": (
                {
                    "http.tls_cert_file": str(root / "server.crt"),
                    "http.tls_key_file": str(root / "server.key"),
                },
                True,
                ssl.create_default_context(cafile=str(ca_file)),
            ),
        }
        samples: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
        for r in range(rounds):  # interleaved, so drift on a shared machine hits all alike
            for i, (name, (extra, token, verify)) in enumerate(variants.items()):
                data_dir = root / f"round{r}-variant{i}"
                figures = await _measure(
                    {**base, **extra, "data_dir": str(data_dir)},
                    token=token,
                    verify=verify,
                    reads=reads,
                    writes=writes,
                )
                samples[name].append(figures)
    return {
        name: {k: statistics.median(s[k] for s in runs) for k in runs[0]}
        for name, runs in samples.items()
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(prog="python -m bench.bench_auth")
    p.add_argument("--reads", type=int, default=2000)
    p.add_argument("--writes", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="20 reads, 10 writes, one round")
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.reads, args.writes, args.rounds = 20, 10, 1
    result = asyncio.run(_run(args.reads, args.writes, args.rounds))
    base = result["insecure, http (baseline)"]
    rows = [("variant", "reads/s", "ratio", "writes/s", "ratio")]
    for name, f in result.items():
        rows.append(
            (
                name,
                f"{f['reads_per_s']:.0f}",
                f"{f['reads_per_s'] / base['reads_per_s']:.2f}",
                f"{f['writes_per_s']:.0f}",
                f"{f['writes_per_s'] / base['writes_per_s']:.2f}",
            )
        )
    out = _common.table(rows)
    print(out)
    if args.write_docs:
        today = datetime.date.today().isoformat()
        section = (
            f"{TITLE}\n\n"
            f"`{_common.command_line('bench.bench_auth', argv)}`, {today}, "
            f"{platform.machine()}, Python {platform.python_version()}: median of "
            f"{args.rounds} interleaved rounds; one client, one keep-alive connection, "
            "requests one at a time. Reads: `GET /v1/tasks?limit=1` (one token lookup); "
            "writes: `POST /v1/tasks` (a token lookup, the task insert and an audit "
            "record). The ratio is against the same coordinator with authentication off, "
            "measured in the same run.\n\n```\n" + out + "\n```\n"
        )
        _common.write_section(TITLE, section, _common.REPO / "docs" / "BENCHMARKS.md")
    return result


if __name__ == "__main__":
    main()
