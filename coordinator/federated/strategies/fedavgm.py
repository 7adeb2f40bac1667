"""FedAvgM (Hsu et al. 2019): server momentum on the FedAvg pseudo-gradient.

With ``Delta_t`` the example-weighted mean update of round ``t``::

    v_t = momentum * v_{t-1} + Delta_t
    w_{t+1} = w_t + server_lr * v_t

``momentum=0, server_lr=1`` is FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from coordinator.federated.kernels import F64, apply_delta
from coordinator.federated.strategies.base import Weights
from coordinator.federated.strategies.fedavg import FedAvg

_PREFIX = "momentum."


class FedAvgM(FedAvg):
    """FedAvg with server-side momentum; the momentum buffer is the strategy's state."""

    name: ClassVar[str] = "fedavgm"

    def __init__(self, *, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError("server_lr must be > 0")
        if not 0.0 <= momentum < 1.0:
            raise ValueError("momentum must be in [0, 1)")
        self.server_lr = float(server_lr)
        self.momentum = float(momentum)
        self._velocity: dict[str, F64] = {}

    def step(
        self, global_weights: Weights, delta: Mapping[str, F64]
    ) -> dict[str, npt.NDArray[np.generic]]:
        velocity = {
            name: self.momentum * self._velocity.get(name, np.zeros_like(d)) + d
            for name, d in delta.items()
        }
        weights = apply_delta(global_weights, {k: self.server_lr * v for k, v in velocity.items()})
        self._velocity = velocity
        return weights

    def state(self) -> dict[str, npt.NDArray[np.generic]]:
        return {_PREFIX + k: v.copy() for k, v in self._velocity.items()}

    def load_state(self, state: Mapping[str, npt.NDArray[np.generic]]) -> None:
        unknown = [k for k in state if not k.startswith(_PREFIX)]
        if unknown:
            raise ValueError(f"not FedAvgM state: {unknown[:5]}")
        self._velocity = {
            k.removeprefix(_PREFIX): np.array(v, dtype=np.float64) for k, v in state.items()
        }
