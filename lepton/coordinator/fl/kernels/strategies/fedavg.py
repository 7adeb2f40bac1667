"""FedAvg (McMahan et al. 2017): the example-weighted mean of the client updates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from lepton.coordinator.fl.kernels.aggregate import weighted_mean
from lepton.coordinator.fl.kernels.strategies.base import (
    ClientUpdate,
    Combined,
    Strategy,
    Weights,
    delta_of,
)


class FedAvg(Strategy):
    """New weights = global + sum_i n_i delta_i / sum_i n_i, with n_i the client's examples
    (times its ``weight``, below 1 only for late updates).

    Not robust: one client sending a large update moves the model as far as it likes.
    """

    name: ClassVar[str] = "fedavg"
    by_mean: ClassVar[bool] = True

    def combine(self, global_weights: Weights, updates: Sequence[ClientUpdate]) -> Combined:
        del global_weights
        delta = weighted_mean(
            [delta_of(u) for u in updates], [u.num_examples * u.weight for u in updates]
        )
        return Combined(delta=delta, contributors=[u.device_id for u in updates])
