"""Client selection for a federated round: fast rounds, without starving slow devices.

The coordinator gives each eligible device an expected round time (its cost model's
estimate of download + local training + upload for this job) and its participation record.
:func:`select_clients` picks ``ceil(k * (1 + over_select))`` devices so that the ``k``-th
update (the round needs ``k``; the extra ones absorb stragglers and dropouts) is expected
as early as possible, subject to two fairness rules:

- a **round-robin floor** (``Fairness.max_staleness``): a device left out that many rounds
  in a row (or never chosen) is chosen first, up to ``Fairness.max_forced_share`` of ``k``
  per round, so every device is heard from within a bounded number of rounds;
- a **participation penalty** (``Fairness.penalty``): a device is ranked by
  ``expected_s * (1 + penalty * p / mean_p)``, with ``p`` its participation count and
  ``mean_p`` the candidates' mean (at least 1), so devices that took part more than
  average yield to slower ones that took part less.

With ``Fairness()`` (both off) it is pure speed: the fastest devices, always. Ties are
broken at random by ``rng``. :func:`uniform_random` is the baseline federated frameworks use
by default. Pure code; the coordinator keeps the participation records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """An eligible device. ``rounds_since`` is None if it was never selected for this job."""

    device_id: str
    expected_s: float
    participations: int = 0
    rounds_since: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Fairness:
    """Fairness rules for :func:`select_clients` (see the module docstring)."""

    max_staleness: int | None = None
    max_forced_share: float = 0.25
    penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.max_staleness is not None and self.max_staleness < 1:
            raise ValueError("max_staleness must be >= 1 (or None: no floor)")
        if not 0.0 <= self.max_forced_share <= 1.0:
            raise ValueError("max_forced_share must be in [0, 1]")
        if not (math.isfinite(self.penalty) and self.penalty >= 0):
            raise ValueError("penalty must be a finite number >= 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """The devices chosen for a round.

    ``devices`` (in selection order) holds ``target`` plus the over-selected extras, or
    every candidate when there are fewer (``shortfall`` says how many short of ``target``).
    ``expected_round_s`` is when the ``target``-th update is expected (the slowest chosen
    device if fewer were chosen). ``forced`` lists devices chosen by the staleness floor.
    """

    devices: list[str]
    target: int
    expected_round_s: float
    forced: list[str] = field(default_factory=list)
    shortfall: int = 0


def expected_round_time(times: Sequence[float], k: int) -> float:
    """When the ``k``-th of devices with these expected times finishes (the last, if fewer)."""
    if not times:
        return 0.0
    ordered = sorted(times)
    return ordered[min(k, len(ordered)) - 1]


def _check(candidates: Sequence[Candidate], k: int) -> None:
    if k < 1:
        raise ValueError("k must be >= 1")
    ids = [c.device_id for c in candidates]
    if len(set(ids)) != len(ids):
        raise ValueError("candidate device ids must be unique")
    for c in candidates:
        if not (math.isfinite(c.expected_s) and c.expected_s >= 0):
            raise ValueError(f"{c.device_id}: expected_s must be a finite number >= 0")
        if c.participations < 0 or (c.rounds_since is not None and c.rounds_since < 0):
            raise ValueError(f"{c.device_id}: participation counts must be >= 0")


def _selection(chosen: list[Candidate], k: int, forced: list[Candidate]) -> Selection:
    return Selection(
        devices=[c.device_id for c in chosen],
        target=k,
        expected_round_s=expected_round_time([c.expected_s for c in chosen], k),
        forced=[c.device_id for c in forced],
        shortfall=max(0, k - len(chosen)),
    )


def select_clients(
    candidates: Sequence[Candidate],
    k: int,
    *,
    over_select: float = 0.0,
    fairness: Fairness | None = None,
    rng: np.random.Generator,
) -> Selection:
    """Choose ``ceil(k * (1 + over_select))`` devices for a round that needs ``k`` updates.

    ``ValueError`` for ``k < 1``, a negative ``over_select``, duplicate device ids or
    non-finite expected times.
    """
    _check(candidates, k)
    if not (math.isfinite(over_select) and over_select >= 0):
        raise ValueError("over_select must be a finite number >= 0")
    rules = fairness or Fairness()
    n = min(len(candidates), math.ceil(k * (1.0 + over_select)))
    tiebreak = {
        c.device_id: float(r) for c, r in zip(candidates, rng.random(len(candidates)), strict=True)
    }

    forced: list[Candidate] = []
    if rules.max_staleness is not None:
        limit = rules.max_staleness
        stale = [c for c in candidates if c.rounds_since is None or c.rounds_since >= limit]
        # Longest-waiting first (never chosen counts as longest), then the faster device.
        stale.sort(
            key=lambda c: (
                -(math.inf if c.rounds_since is None else c.rounds_since),
                c.expected_s,
                tiebreak[c.device_id],
            )
        )
        cap = max(1, math.floor(rules.max_forced_share * k)) if rules.max_forced_share else 0
        forced = stale[: min(cap, n)]

    mean_p = max(1.0, sum(c.participations for c in candidates) / max(1, len(candidates)))

    def cost(c: Candidate) -> tuple[float, float]:
        return c.expected_s * (1.0 + rules.penalty * c.participations / mean_p), tiebreak[
            c.device_id
        ]

    taken = {c.device_id for c in forced}
    rest = sorted((c for c in candidates if c.device_id not in taken), key=cost)
    chosen = forced + rest[: n - len(forced)]
    return _selection(chosen, k, forced)


def uniform_random(candidates: Sequence[Candidate], k: int, rng: np.random.Generator) -> Selection:
    """``k`` devices uniformly at random without replacement (all of them if fewer)."""
    _check(candidates, k)
    n = min(k, len(candidates))
    picks = rng.choice(len(candidates), size=n, replace=False).tolist() if n else []
    chosen = [candidates[int(i)] for i in picks]
    return _selection(chosen, k, [])
