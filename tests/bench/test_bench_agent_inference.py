"""The inference benchmarks run end to end on tiny sizes (figures are checked in bench/)."""

from __future__ import annotations

import pytest

from bench import bench_agent_inference

pytestmark = pytest.mark.slow


def test_inference_benchmark_runs() -> None:
    figures = bench_agent_inference.main(["--samples", "200", "--requests", "30", "--rounds", "2"])
    assert figures["handler_b1_ratio"] > 0
    assert figures["endpoint_msgpack_b1_rps"] > 0
    assert figures["endpoint_json_b32_rps"] > 0


def test_spinning_benchmark_runs() -> None:
    from bench import bench_spinning

    tiny = "--iters 4 --warmup 1 --blocks 2 --requests 4 --gap-ms 2 --resolution 32 --width 0.35"
    figures = bench_spinning.main([*tiny.split(), "--threads", "2"])
    assert set(figures["methods"]) == {
        f"{method}, spinning {state}"
        for method in ("round-robin", "one session at a time")
        for state in ("on", "off")
    }
    for model in ("digits INT8", "MobileNetV2 INT8"):
        assert all(v > 0 for v in figures["agent"][model].values())
