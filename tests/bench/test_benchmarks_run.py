"""The benchmarks run end to end on tiny sizes (figures are not checked here: see bench/)."""

from __future__ import annotations

import pytest

from bench import bench_agent_footprint, bench_outbox

pytestmark = pytest.mark.slow


def test_outbox_benchmark_runs() -> None:
    figures = bench_outbox.main(["--n", "300"])
    assert set(figures) == {"raw", "full", "normal"}
    assert all(v > 0 for v in figures.values())


def test_footprint_benchmark_runs() -> None:
    figures = bench_agent_footprint.main(["--seconds", "1", "--warmup", "2", "--interval", "1"])
    assert figures["rss_mib"] > 0
    assert figures["bare_rss_mib"] > 0
