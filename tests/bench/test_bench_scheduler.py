from __future__ import annotations

from bench.bench_scheduler import main


def test_tiny_benchmark_runs() -> None:
    large, exact = main(["--tiny"])
    assert large
    assert exact
    for big in large:
        assert big.lp_bound <= big.makespan * (1 + 1e-9)
    for small in exact:
        assert small.exact <= small.fast * (1 + 1e-9)
