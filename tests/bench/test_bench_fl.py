"""The federated-learning benchmark runs end to end on its tiny size (figures not checked)."""

from __future__ import annotations

import pytest

from bench import bench_fl

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_fl_benchmark_runs_tiny() -> None:
    figures = bench_fl.main(["--tiny", "--log-level", "WARNING"])
    assert set(figures["accuracy"]["finals"]) == {"fedavg", "fedavgm"}
    assert figures["compression"]["ratio"] < 0.35
    assert figures["selection"]["round_s_cost"] > 0
    assert figures["selection"]["round_s_cost_late"] > 0
    assert set(figures["byzantine"]["strategies"]) == {"fedavg", "median"}
    assert len(figures["byzantine"]["adversaries"]) == 1
    assert len(figures["reference"]["accuracy"]) == 2
