"""Coordinate-wise median (Yin et al. 2018): robust to a minority of arbitrary updates.

Each coordinate of the aggregated update is the median of the clients' values for it, so
fewer than half of the clients, however extreme, cannot drag it outside the honest range.
Unweighted: ``num_examples`` is client-reported and would be the easiest thing to lie about.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from lepton.coordinator.fl.kernels.aggregate import coordinate_median
from lepton.coordinator.fl.kernels.strategies.base import (
    ClientUpdate,
    Combined,
    Strategy,
    Weights,
    delta_of,
)


class Median(Strategy):
    """New weights = global + coordinate-wise median of the updates."""

    robust = True
    name: ClassVar[str] = "median"

    def combine(self, global_weights: Weights, updates: Sequence[ClientUpdate]) -> Combined:
        del global_weights
        delta = coordinate_median([delta_of(u) for u in updates])
        return Combined(delta=delta, contributors=[u.device_id for u in updates])
