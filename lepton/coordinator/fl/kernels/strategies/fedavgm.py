"""FedAvgM (Hsu et al. 2019): server momentum on the FedAvg pseudo-gradient.

With ``Delta_t`` the example-weighted mean update of round ``t``::

    v_t = momentum * v_{t-1} + Delta_t
    w_{t+1} = w_t + server_lr * v_t

``momentum=0, server_lr=1`` is FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from lepton.coordinator.fl.kernels.aggregate import F64
from lepton.coordinator.fl.kernels.strategies.base import Weights
from lepton.coordinator.fl.kernels.strategies.fedavg import FedAvg
from lepton.coordinator.fl.kernels.strategies.momentum import MomentumStep

_PREFIX = "momentum."


class FedAvgM(FedAvg):
    """FedAvg with server-side momentum; the momentum buffer is the strategy's state."""

    name: ClassVar[str] = "fedavgm"

    def __init__(self, *, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        self._step = MomentumStep(momentum=momentum, server_lr=server_lr)
        self.server_lr = self._step.server_lr
        self.momentum = self._step.momentum

    def step(
        self, global_weights: Weights, delta: Mapping[str, F64]
    ) -> dict[str, npt.NDArray[np.generic]]:
        return self._step.apply(global_weights, delta)

    def state(self) -> dict[str, npt.NDArray[np.generic]]:
        return self._step.state(_PREFIX)

    def load_state(self, state: Mapping[str, npt.NDArray[np.generic]]) -> None:
        unknown = [k for k in state if not k.startswith(_PREFIX)]
        if unknown:
            raise ValueError(f"not FedAvgM state: {unknown[:5]}")
        self._step.load(state, _PREFIX)
