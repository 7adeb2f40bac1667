"""The ingest benchmark runs (tiny sizes; the figures live in docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_ingest_benchmark_runs() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench_ingest",
            "--json",
            "--no-aiomqtt",
            "--reports",
            "300",
            "--devices",
            "40",
            "--interval",
            "0.5",
            "--duration",
            "2",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(out.stdout)
    count, rate = result["throughput"]["coordinator ingest"]
    assert count == 300
    assert rate > 0
    assert result["fleet"]["online"] == 40
    assert result["fleet"]["measured"] > 0
