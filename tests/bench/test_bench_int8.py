"""bench/bench_int8.py runs end to end on tiny sizes (its figures are not checked here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import bench_int8

pytestmark = pytest.mark.slow


def test_int8_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    figures = bench_int8.main(
        [
            "--quick",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--seeds",
            "0",
            "--resolution",
            "64",
            "--width",
            "0.35",
        ]
    )
    mb = figures["mobilenet"]
    assert mb["sizes"]["fp32"] > mb["sizes"]["int8 QDQ U8S8, 7-bit weights (default)"]
    assert all(v > 0 for lat in mb["latency"].values() for v in lat.values())
    assert figures["digits"]["shipped"]["int8"] > 0.9
    assert "## INT8 inference" in capsys.readouterr().out


def test_record_replaces_only_its_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(
        "# Benchmarks\n\n## Agent\nkeep me\n\n## INT8 inference\nold\n\n## Later\nme too\n"
    )
    monkeypatch.setattr(bench_int8, "BENCHMARKS_MD", md)
    bench_int8.record("## INT8 inference\nnew\n")
    assert md.read_text() == (
        "# Benchmarks\n\n## Agent\nkeep me\n\n## INT8 inference\nnew\n\n## Later\nme too\n"
    )
    md.write_text("# Benchmarks\n")
    bench_int8.record("## INT8 inference\nnew\n")
    assert md.read_text() == "# Benchmarks\n\n## INT8 inference\nnew\n"
