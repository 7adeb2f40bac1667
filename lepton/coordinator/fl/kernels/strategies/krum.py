"""Krum (Blanchard et al. 2017) and Multi-Krum (El Mhamdi et al. 2018).

With ``f`` the number of Byzantine clients to tolerate, each update is scored by the sum of
its squared distances to its ``n - f - 2`` nearest other updates; outliers sit far from
everyone and score high. Krum applies the single lowest-scoring update; Multi-Krum averages
the ``keep`` lowest (default ``n - f``), trading a little robustness for the variance
reduction of averaging. The guarantee needs ``n >= 2 f + 3`` usable updates, which is what
:meth:`Krum.min_updates` asks for. The average is unweighted, so a client cannot buy
influence by over-reporting ``num_examples``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from lepton.coordinator.fl.kernels.aggregate import krum_scores, mean
from lepton.coordinator.fl.kernels.strategies.base import (
    ClientUpdate,
    Combined,
    Strategy,
    Weights,
    delta_of,
)


class Krum(Strategy):
    """Apply the update(s) closest to their neighbours; ``keep`` > 1 is Multi-Krum."""

    robust = True
    name: ClassVar[str] = "krum"

    def __init__(self, *, num_byzantine: int, keep: int | None = 1) -> None:
        if num_byzantine < 0:
            raise ValueError("num_byzantine must be >= 0")
        if keep is not None and keep < 1:
            raise ValueError("keep must be >= 1 (or None: n - num_byzantine)")
        self.num_byzantine = num_byzantine
        self.keep = keep

    def min_updates(self) -> int:
        return 2 * self.num_byzantine + 3

    def combine(self, global_weights: Weights, updates: Sequence[ClientUpdate]) -> Combined:
        del global_weights
        deltas = [delta_of(u) for u in updates]
        scores = krum_scores(deltas, self.num_byzantine)
        keep = len(updates) - self.num_byzantine if self.keep is None else self.keep
        keep = min(keep, len(updates))
        # Stable sort: ties go to the earlier update, so a result is reproducible.
        chosen = sorted(np.argsort(scores, kind="stable")[:keep].tolist())
        return Combined(
            delta=mean([deltas[i] for i in chosen]),
            contributors=[updates[i].device_id for i in chosen],
            metrics={"krum.selected": float(keep)},
        )


class MultiKrum(Krum):
    """Multi-Krum: the mean of the ``keep`` best-scored updates (default ``n - f``)."""

    name: ClassVar[str] = "multikrum"

    def __init__(self, *, num_byzantine: int, keep: int | None = None) -> None:
        super().__init__(num_byzantine=num_byzantine, keep=keep)
