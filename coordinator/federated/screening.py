"""Screening a round's updates before aggregation: pure code, no I/O.

A device reports its own example count, and mean-based rules weight its update by it: a
forged count of 10^9 once made one update the whole FedAvg average (finding 4 of the
hardening review). Before the strategy sees them:

1. each claimed count is clamped to the job's cap (``max_examples_per_update``, else the
   coordinator's ``fl.max_examples_per_update``, and the job's ``max_examples``: a device
   trains on at most that many);
2. then to ``examples_ratio`` times the round's median claim, so no single update outweighs
   ``examples_ratio`` typical ones whatever it claims;
3. an update whose L2 norm is above ``norm_ratio`` times the round's median norm is refused
   (with at least three updates, so the median is one an attacker does not set alone).

Clamped counts and refusals are reported (the round's ``rejected_updates`` and the
``lepton_fl_updates_screened_total`` counter). Byzantine-robust strategies (median,
trimmed mean, Krum, clipping) remain the defence against updates that pass these bounds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from coordinator.federated.kernels import global_norm
from coordinator.federated.strategies import ClientUpdate

#: Fewest updates for the norm screen: below it the median is too easy to set.
MIN_FOR_NORM_SCREEN = 3


@dataclass(frozen=True, slots=True)
class Screened:
    """What screening kept (counts clamped), refused (id -> reason) and clamped
    (id -> (claimed, used))."""

    kept: list[ClientUpdate]
    refused: dict[str, str] = field(default_factory=dict)
    clamped: dict[str, tuple[int, int]] = field(default_factory=dict)


def screen(
    updates: Sequence[ClientUpdate],
    *,
    max_examples: int,
    examples_ratio: float | None,
    norm_ratio: float | None,
) -> Screened:
    """Clamp example counts and refuse norm outliers (see the module docstring)."""
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
    caps = [min(u.num_examples, max_examples) for u in kept]
    if examples_ratio is not None and caps:
        bound = max(1, int(examples_ratio * float(np.median(caps))))
        caps = [min(c, bound) for c in caps]
    clamped: dict[str, tuple[int, int]] = {}
    out: list[ClientUpdate] = []
    for u, used in zip(kept, caps, strict=True):
        if used != u.num_examples:
            clamped[u.device_id] = (u.num_examples, used)
            u = dataclasses.replace(u, num_examples=used)  # noqa: PLW2901 - the clamped copy
        out.append(u)
    return Screened(kept=out, refused=refused, clamped=clamped)
