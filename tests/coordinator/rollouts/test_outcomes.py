"""What device reports mean for a rollout: update statuses, install and revert outputs,
probe judgements against a device's or the rollout's baseline."""

from __future__ import annotations

import pytest

from lepton.coordinator.rollouts.outcomes import (
    Measurement,
    fleet_baseline,
    install_verdict,
    judge_probe,
    revert_task_verdict,
    revert_verdict,
    update_verdict,
)


@pytest.mark.parametrize(
    ("version", "outcome", "target", "reason", "expected"),
    [
        ("1.4.0", "committed", "1.4.0", "", ("succeeded", "committed 1.4.0")),
        ("1.3.0", "refused", "1.4.0", "bad_signature", ("failed", "refused: bad_signature")),
        ("1.3.0", "install_failed", "1.4.0", "", ("failed", "install_failed")),
        ("1.3.0", "rolled_back", "1.4.0", "crash loop", ("rolled_back", "crash loop")),
        ("1.3.0", "trial", "1.4.0", "", ("staged", "trial")),
        ("1.3.0", "refused", "1.5.0", "x", None),  # another rollout's attempt
        ("1.3.0", "committed", "1.3.0", "", None),  # still the old version
    ],
)
def test_update_verdict(
    version: str, outcome: str, target: str, reason: str, expected: object
) -> None:
    got = update_verdict(
        version=version, outcome=outcome, target=target, reason=reason, wanted="1.4.0"
    )
    assert got == expected


def test_install_and_revert_outputs() -> None:
    assert install_verdict({"outcome": "staged"}, "1.4.0") == ("staged", "staged")
    assert (
        install_verdict({"outcome": "already_running", "running_version": "1.4.0"}, "1.4.0")[0]
        == "succeeded"
    )
    assert install_verdict({"outcome": "refused", "reason": "rollback"}, "1.4.0") == (
        "failed",
        "refused: rollback",
    )
    assert revert_task_verdict({"outcome": "staged"}, "1.3.0")[0] == "reverting"
    assert revert_task_verdict({"outcome": "refused", "reason": "below_floor"}, "1.3.0") == (
        "failed",
        "revert refused: below_floor",
    )
    assert revert_verdict(version="1.3.0", outcome="reverted", reason="", wanted="1.3.0") == (
        "reverted",
        "back on 1.3.0",
    )
    assert revert_verdict(version="1.4.0", outcome="trial", reason="", wanted="1.3.0") is None


def test_probe_margins() -> None:
    base = Measurement(accuracy=0.95, p50_ms=2.0)
    margins = {"max_accuracy_drop": 0.02, "max_latency_increase": 0.5}
    assert judge_probe(Measurement(accuracy=0.93, p50_ms=3.0), base, **margins)[0] == "succeeded"
    drop = judge_probe(Measurement(accuracy=0.92, p50_ms=2.0), base, **margins)
    assert drop[0] == "failed"
    assert "drop 0.0300" in drop[1]
    slow = judge_probe(Measurement(accuracy=0.95, p50_ms=3.2), base, **margins)
    assert slow[0] == "failed"
    assert "+60%" in slow[1]
    assert judge_probe(Measurement(accuracy=None, p50_ms=1.0), base, **margins)[0] == "failed"
    assert judge_probe(Measurement(accuracy=0.1, p50_ms=9.0), None, **margins)[0] == "succeeded"


def test_measurements_and_the_fleet_baseline() -> None:
    m = Measurement.of({"accuracy": 0.9, "latency_ms": {"sample": {"p50": 1.5}}})
    assert m == Measurement(accuracy=0.9, p50_ms=1.5)
    assert Measurement.of({"accuracy": "x", "latency_ms": []}) == Measurement(
        accuracy=None, p50_ms=None
    )
    assert fleet_baseline([]) is None
    assert fleet_baseline([m, Measurement(accuracy=0.8, p50_ms=None), m]) == Measurement(
        accuracy=0.9, p50_ms=1.5
    )
