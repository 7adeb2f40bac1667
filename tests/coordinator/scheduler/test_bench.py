from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench" / "bench_scheduler.py"


def test_tiny_benchmark_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("bench_scheduler", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_scheduler", module)  # dataclasses look it up
    spec.loader.exec_module(module)
    results = module.main(["--tiny"])
    assert results["large"]
    assert results["exact"]
    for row in results["large"]:
        assert row["lp_bound"] <= row["makespan"] * (1 + 1e-9)
    for row in results["exact"]:
        assert row["exact"] <= row["fast"] * (1 + 1e-9)
