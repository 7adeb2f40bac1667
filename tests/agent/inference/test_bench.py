"""The inference benchmark runs end to end on tiny sizes (figures are checked in bench/)."""

from __future__ import annotations

import pytest

from bench import bench_agent_inference

pytestmark = pytest.mark.slow


def test_inference_benchmark_runs() -> None:
    figures = bench_agent_inference.main(["--samples", "200", "--requests", "30", "--rounds", "2"])
    assert figures["handler_b1_ratio"] > 0
    assert figures["endpoint_msgpack_b1_rps"] > 0
    assert figures["endpoint_json_b32_rps"] > 0
