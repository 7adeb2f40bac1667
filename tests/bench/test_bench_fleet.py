"""The fleet-scale benchmark runs end to end in its tiny mode (figures are not judged here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import bench_fleet

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_fleet_benchmark_runs_tiny() -> None:
    figures = bench_fleet.main(["--tiny"])
    assert figures["registered"] == figures["devices"] == 20
    assert figures["reports"] > 0
    assert figures["bare_reports"] > 0
    assert figures["lag_p99_s"] >= 0
    assert figures["planned_tasks"] == figures["tasks"] == 50
    assert figures["results_s"] >= figures["placed_s"] > 0


def test_docs_section_is_replaced_and_the_rest_kept(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## A\nkeep\n\n## Fleet scale\nold\n\n## B\nkeep too\n")
    bench_fleet.write_docs("## Fleet scale\n\nnew\n", doc)
    expected = "# Benchmarks\n\n## A\nkeep\n\n## Fleet scale\n\nnew\n\n## B\nkeep too\n"
    assert doc.read_text() == expected
    doc.write_text("# Benchmarks\n")
    bench_fleet.write_docs("## Fleet scale\n\nnew\n", doc)
    assert doc.read_text() == "# Benchmarks\n\n## Fleet scale\n\nnew\n"
