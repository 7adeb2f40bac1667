"""Screening a round's updates before aggregation: pure code, no I/O.

A device reports its own example count, and mean-based rules weight its update by it: a
forged count of 10^9 once made one update the whole FedAvg average (finding 4 of the
hardening review). Before the strategy sees them:

1. each claimed count is clamped to the job's cap (``max_examples_per_update``, else the
   coordinator's ``fl.max_examples_per_update``, and the job's ``max_examples``: a device
   trains on at most that many), and to the size of the job's data source the device
   reported before the round, when it reported one (a device trains on at most the data it
   holds; reason ``above_reported_size``);
2. then to ``examples_ratio`` times the round's median claim, so no single update outweighs
   ``examples_ratio`` typical ones whatever it claims;
3. an update whose L2 norm is above ``norm_ratio`` times the round's median norm is refused
   (with at least three updates, so the median is one an attacker does not set alone).

Refusals and clamped counts are reported (the round's ``rejected_updates`` and
``clamped_examples``, and the ``lepton_fl_updates_screened_total`` counter by reason).
Byzantine-robust strategies (median, trimmed mean, Krum, clipping) remain the defence
against updates that pass these bounds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from lepton.coordinator.fl.kernels.aggregate import global_norm
from lepton.coordinator.fl.kernels.strategies import ClientUpdate

#: Fewest updates for the norm screen: below it the median is too easy to set.
MIN_FOR_NORM_SCREEN = 3
#: Why a count was clamped: above the device's own reported data size, or above a cap or
#: the round's median bound.
ABOVE_REPORTED_SIZE = "above_reported_size"
EXAMPLES_CLAMPED = "examples_clamped"


@dataclass(frozen=True, slots=True)
class Screened:
    """What screening kept (counts clamped), refused (id -> reason) and clamped
    (id -> (claimed, used)), and why each clamp (id -> :data:`ABOVE_REPORTED_SIZE` when the
    claim was above the device's reported size, else :data:`EXAMPLES_CLAMPED`)."""

    kept: list[ClientUpdate]
    refused: dict[str, str] = field(default_factory=dict)
    clamped: dict[str, tuple[int, int]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)


def screen(
    updates: Sequence[ClientUpdate],
    *,
    max_examples: int,
    examples_ratio: float | None,
    norm_ratio: float | None,
    reported: Mapping[str, int] | None = None,
) -> Screened:
    """Clamp example counts and refuse norm outliers (see the module docstring).

    ``reported``: update id -> the sample count its device reported for the job's data
    source before the round; updates without one get the other bounds only.
    """
    if max_examples < 1:
        raise ValueError("max_examples must be >= 1")
    refused: dict[str, str] = {}
    if norm_ratio is not None and len(updates) >= MIN_FOR_NORM_SCREEN:
        norms = {u.device_id: global_norm(u.delta) for u in updates}
        median = float(np.median(list(norms.values())))
        for u in updates:
            n = norms[u.device_id]
            if not math.isfinite(n) or (median > 0 and n > norm_ratio * median):
                refused[u.device_id] = f"norm {n:.4g} > {norm_ratio:g} x the median {median:.4g}"
    kept = [u for u in updates if u.device_id not in refused]
    sizes = reported or {}
    # At least one example: a device that reported an empty source still weighs something,
    # and a zero weight would leave a mean-based rule with nothing to divide by.
    above = {
        u.device_id
        for u in kept
        if u.device_id in sizes and u.num_examples > max(1, sizes[u.device_id])
    }
    caps = [
        min(u.num_examples, max_examples, max(1, sizes.get(u.device_id, max_examples)))
        for u in kept
    ]
    if examples_ratio is not None and caps:
        bound = max(1, int(examples_ratio * float(np.median(caps))))
        caps = [min(c, bound) for c in caps]
    clamped: dict[str, tuple[int, int]] = {}
    reasons: dict[str, str] = {}
    out: list[ClientUpdate] = []
    for u, used in zip(kept, caps, strict=True):
        if used != u.num_examples:
            clamped[u.device_id] = (u.num_examples, used)
            reasons[u.device_id] = ABOVE_REPORTED_SIZE if u.device_id in above else EXAMPLES_CLAMPED
            u = dataclasses.replace(u, num_examples=used)  # noqa: PLW2901 - the clamped copy
        out.append(u)
    return Screened(kept=out, refused=refused, clamped=clamped, reasons=reasons)
