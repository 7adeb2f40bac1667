"""The API security benchmark runs end to end on a tiny size (figures: docs/BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from bench import bench_auth

pytestmark = pytest.mark.slow


def test_auth_benchmark_runs_tiny() -> None:
    figures = bench_auth.main(["--tiny"])
    assert set(figures) == {"insecure, http (baseline)", "tokens, http", "tokens, https"}
    assert all(f["reads_per_s"] > 0 and f["writes_per_s"] > 0 for f in figures.values())
