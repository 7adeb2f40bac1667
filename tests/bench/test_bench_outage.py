"""The broker-outage benchmark runs end to end in its tiny mode (figures are not judged here,
beyond the counts adding up)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import bench_outage

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_outage_benchmark_runs_tiny() -> None:
    figures = bench_outage.main(["--tiny"])
    for run in [figures["baseline"], *figures["outages"]]:
        assert run["succeeded"] + run["failed"] + run["expired"] == 100
        assert run["total_s"] > 0
    assert [r["outage_s"] for r in figures["outages"]] == [3.0]


def test_docs_section_is_replaced_and_the_rest_kept(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## A\nkeep\n\n## Broker outage\nold\n\n## B\nkeep too\n")
    bench_outage.write_docs("## Broker outage\n\nnew\n", doc)
    assert doc.read_text() == (
        "# Benchmarks\n\n## A\nkeep\n\n## Broker outage\n\nnew\n\n## B\nkeep too\n"
    )
