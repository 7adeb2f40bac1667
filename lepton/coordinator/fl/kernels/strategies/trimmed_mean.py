"""Coordinate-wise trimmed mean (Yin et al. 2018).

Per coordinate, the ``floor(beta * n)`` largest and as many smallest client values are
dropped and the rest averaged (unweighted). It tolerates up to ``floor(beta * n)``
arbitrary clients and, unlike the median, still averages away the honest clients' noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

from lepton.coordinator.fl.kernels.aggregate import trimmed_mean
from lepton.coordinator.fl.kernels.strategies.base import (
    ClientUpdate,
    Combined,
    Strategy,
    Weights,
    delta_of,
)


class TrimmedMean(Strategy):
    """New weights = global + coordinate-wise ``beta``-trimmed mean of the updates."""

    robust = True
    name: ClassVar[str] = "trimmed_mean"

    def __init__(self, *, beta: float = 0.2) -> None:
        if not 0.0 <= beta < 0.5:
            raise ValueError("beta (the share trimmed from each end) must be in [0, 0.5)")
        self.beta = float(beta)

    def combine(self, global_weights: Weights, updates: Sequence[ClientUpdate]) -> Combined:
        del global_weights
        trim = math.floor(self.beta * len(updates))
        delta = trimmed_mean([delta_of(u) for u in updates], trim)
        return Combined(
            delta=delta,
            contributors=[u.device_id for u in updates],
            metrics={"trimmed_mean.trimmed": float(trim)},
        )
