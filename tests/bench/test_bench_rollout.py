"""The staged-rollout benchmark runs end to end on a small fleet, and its verdict holds there:
the phased and one-shot rollouts complete, the bad release stops at its canary and every
device ends on the good version."""

from __future__ import annotations

import pytest

from bench import bench_rollout

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_rollout_benchmark_runs_small_and_its_verdict_holds() -> None:
    # Half the devices fail the bad release. At 20 devices its canary (25) is the whole fleet:
    # this checks that the benchmark runs end to end and that its own checks hold.
    figures = bench_rollout.main(
        ["--devices", "20", "--processes", "1", "--fail-share", "0.5", "--timeout", "120"]
    )
    assert figures["verdict"] == []
    assert figures["phased_succeeded"] == figures["oneshot_succeeded"] == 20
    assert figures["bad_state"] == "aborted"
    assert figures["bad_phase"] == 0
    assert 0 < figures["bad_touched"] <= bench_rollout.CANARY
    assert figures["bad_rolled_back"] + figures["bad_reverted"] == figures["bad_touched"]
    assert figures["final_versions"] == {bench_rollout.ONE_SHOT: 20}


def test_the_verdict_names_what_does_not_hold() -> None:
    good = {
        "devices": 200,
        "phased_state": "completed",
        "phased_succeeded": 200,
        "oneshot_state": "completed",
        "oneshot_succeeded": 200,
        "bad_state": "aborted",
        "bad_phase": 0,
        "bad_canary_failing": 2,
        "bad_touched": 10,
        "final_versions": {bench_rollout.ONE_SHOT: 200},
    }
    assert bench_rollout.verdict(good) == []
    escaped = {**good, "bad_state": "completed", "bad_phase": 3, "bad_touched": 100}
    assert len(bench_rollout.verdict(escaped)) == 3
    stuck = {**good, "final_versions": {bench_rollout.ONE_SHOT: 199, bench_rollout.BAD: 1}}
    assert "not all on" in bench_rollout.verdict(stuck)[0]
