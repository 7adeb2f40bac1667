"""Why a task went where it went: typed values a CLI or the API can render."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lepton.coordinator.scheduler.costmodel import CostTerms


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One device considered for a task.

    ``terms`` are the costs as if the task were the next one the device starts (comparable
    across devices); ``planned_tasks`` and ``planned_busy_s`` say how much of the same batch
    the plan gave the device, which is why a device that looks cheapest alone may not be
    chosen. ``reason`` is set (and ``terms`` is ``None``) for a filtered-out device.
    """

    device_id: str
    chosen: bool = False
    terms: CostTerms | None = None
    reason: str | None = None
    planned_tasks: int = 0
    planned_busy_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Explanation:
    """A task's placement: the chosen device first, then the next best feasible devices by
    total cost, then filtered-out devices with the filter that removed them."""

    task_id: str
    method: str
    device_id: str | None
    reason: str | None = None
    expected_start_s: float | None = None
    expected_completion_s: float | None = None
    candidates: tuple[Candidate, ...] = ()
    filtered: tuple[Candidate, ...] = ()
    filtered_counts: dict[str, int] = field(default_factory=dict)

    @property
    def chosen(self) -> Candidate | None:
        first = self.candidates[0] if self.candidates else None
        return first if first is not None and first.chosen else None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/msgpack-safe) for the HTTP API."""
        out = asdict(self)
        for group in ("candidates", "filtered"):
            for cand, src in zip(out[group], getattr(self, group), strict=True):
                if src.terms is not None:
                    cand["terms"]["completion_s"] = src.terms.completion_s
        return out

    def render(self) -> str:
        """A small plain-text table, as ``lepton tasks explain ID`` prints it."""
        lines = [f"task {self.task_id}  method={self.method}"]
        if self.device_id is None:
            lines.append(f"  not assigned: {self.reason}")
        else:
            lines.append(
                f"  -> {self.device_id}  start {self.expected_start_s:.3f}s"
                f"  done {self.expected_completion_s:.3f}s"
            )
        header = (
            f"  {'':1} {'device':<24} {'total':>9} {'queue':>8} {'compute':>8} "
            f"{'transfer':>8} {'rtt':>6} {'energy':>8} {'batt':>6} {'planned':>7}"
        )
        if self.candidates:
            lines.append(header)
        for c in self.candidates:
            t = c.terms
            if t is None:
                continue
            lines.append(
                f"  {'*' if c.chosen else ' '} {c.device_id:<24} {t.total:>9.3f} "
                f"{t.queue_s:>8.3f} {t.compute_s:>8.3f} {t.transfer_s:>8.3f} {t.rtt_s:>6.3f} "
                f"{t.energy:>8.2f} {t.battery:>6.2f} {c.planned_tasks:>7d}"
            )
        if self.filtered_counts:
            summary = ", ".join(f"{k} x{v}" for k, v in self.filtered_counts.items())
            lines.append(f"  filtered out: {summary}")
            lines.extend(f"    {c.device_id:<24} {c.reason}" for c in self.filtered)
        return "\n".join(lines)
