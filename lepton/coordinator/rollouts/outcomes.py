"""What a device's reports mean for its place in a rollout. Pure functions, no I/O.

Agent releases: the ``install`` task only *stages* (its output says ``staged``, ``refused`` or
``already_running``); the device's update status (its ``UpdateStatus``, ingested by the
releases feature) says how it ended: ``committed`` on the target version is success;
``refused``, ``install_failed`` and ``rolled_back`` for the target are failures with the
device's reason. Models: the ``deploy`` task's success, then (with a probe) an ``infer``
no worse than the baseline by the plan's margins.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lepton.coordinator.rollouts.engine import DeviceState

Verdict = tuple[DeviceState, str]


def update_verdict(
    *, version: str, outcome: str, target: str | None, reason: str, wanted: str
) -> Verdict | None:
    """The device state an update status means for a rollout to ``wanted`` (None: no news).

    ``version``: what runs; ``target``: the version the last attempt was for."""
    if outcome == "committed" and version == wanted:
        return ("succeeded", f"committed {wanted}")
    if target != wanted:
        return None
    if outcome in ("refused", "install_failed"):
        return ("failed", f"{outcome}: {reason}" if reason else outcome)
    if outcome == "rolled_back":
        return ("rolled_back", reason or "rolled back")
    if outcome in ("staged", "installing", "trial"):
        return ("staged", outcome)
    return None


def revert_verdict(*, version: str, outcome: str, reason: str, wanted: str) -> Verdict | None:
    """The device state an update status means for a revert to ``wanted``."""
    if version == wanted and outcome in ("reverted", "committed", "rolled_back"):
        return ("reverted", f"back on {wanted}")
    if outcome in ("refused", "install_failed"):
        return ("failed", f"revert {outcome}: {reason}" if reason else f"revert {outcome}")
    return None


def install_verdict(output: Mapping[str, Any], wanted: str) -> Verdict:
    """The device state an ``install`` task's output means (``staged`` waits for the update
    status)."""
    outcome = output.get("outcome")
    reason = str(output.get("reason") or "")
    if outcome == "already_running" and output.get("running_version") == wanted:
        return ("succeeded", f"already running {wanted}")
    if outcome == "staged":
        return ("staged", "staged")
    return ("failed", f"refused: {reason}" if reason else f"install {outcome}")


def revert_task_verdict(output: Mapping[str, Any], wanted: str) -> Verdict:
    outcome = output.get("outcome")
    if outcome == "already_running" and output.get("running_version") == wanted:
        return ("reverted", f"already running {wanted}")
    if outcome == "staged":
        return ("reverting", "revert staged")
    reason = str(output.get("reason") or "")
    return ("failed", f"revert refused: {reason}" if reason else f"revert {outcome}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Measurement:
    """An ``infer`` run's accuracy (None: unlabelled data) and per-sample p50 latency (ms)."""

    accuracy: float | None
    p50_ms: float | None

    @classmethod
    def of(cls, output: Mapping[str, Any]) -> Measurement:
        """From an ``infer`` task's output (:class:`~lepton.protocol.tasks.InferOutput`)."""
        latency = output.get("latency_ms") or {}
        sample = latency.get("sample") or {} if isinstance(latency, Mapping) else {}
        accuracy = output.get("accuracy")
        p50 = sample.get("p50") if isinstance(sample, Mapping) else None
        return cls(
            accuracy=float(accuracy) if isinstance(accuracy, (int, float)) else None,
            p50_ms=float(p50) if isinstance(p50, (int, float)) else None,
        )

    def to_dict(self) -> dict[str, float | None]:
        return {"accuracy": self.accuracy, "p50_ms": self.p50_ms}


def fleet_baseline(measured: Sequence[Measurement]) -> Measurement | None:
    """The median of the baselines measured so far (None: none yet)."""
    acc = [m.accuracy for m in measured if m.accuracy is not None]
    p50 = [m.p50_ms for m in measured if m.p50_ms is not None]
    if not acc and not p50:
        return None
    return Measurement(
        accuracy=statistics.median(acc) if acc else None,
        p50_ms=statistics.median(p50) if p50 else None,
    )


def judge_probe(
    candidate: Measurement,
    baseline: Measurement | None,
    *,
    max_accuracy_drop: float,
    max_latency_increase: float,
) -> Verdict:
    """``succeeded`` unless the new version's accuracy fell by more than
    ``max_accuracy_drop`` (absolute) or its p50 latency rose by more than
    ``max_latency_increase`` (a fraction of the baseline's). Without a baseline the probe
    only has to have run."""
    if baseline is None:
        return ("succeeded", "probe ran (no baseline to compare)")
    if baseline.accuracy is not None:
        if candidate.accuracy is None:
            return ("failed", "probe: no accuracy measured")
        drop = baseline.accuracy - candidate.accuracy
        if drop > max_accuracy_drop + 1e-12:
            return (
                "failed",
                f"accuracy {candidate.accuracy:.4f} vs {baseline.accuracy:.4f} "
                f"(drop {drop:.4f} > {max_accuracy_drop:g})",
            )
    if baseline.p50_ms is not None and candidate.p50_ms is not None and baseline.p50_ms > 0:
        rise = candidate.p50_ms / baseline.p50_ms - 1.0
        if rise > max_latency_increase + 1e-12:
            return (
                "failed",
                f"p50 {candidate.p50_ms:.3f} ms vs {baseline.p50_ms:.3f} ms "
                f"(+{rise:.0%} > {max_latency_increase:.0%})",
            )
    return ("succeeded", "probe within margins")
