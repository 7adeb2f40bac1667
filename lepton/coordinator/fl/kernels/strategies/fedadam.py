"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

The example-weighted mean update ``Delta_t`` is a pseudo-gradient for an Adam step on the
server, per coordinate::

    m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t
    v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t ** 2
    w_{t+1} = w_t + server_lr * m_t / (sqrt(v_t) + tau)

with ``m_{-1} = 0`` and ``v_{-1} = tau ** 2`` as in the paper. The paper has no bias
correction; ``bias_correction=True`` adds Adam's (``server_lr * sqrt(1 - beta2^t) /
(1 - beta1^t)``), as Flower's FedAdam does. ``tau`` bounds the step where updates are
small: each coordinate moves by at most about ``server_lr * (1 - beta1) / (1 - beta2) ** .5``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from lepton.coordinator.fl.kernels.aggregate import F64, apply_delta
from lepton.coordinator.fl.kernels.strategies.base import Weights
from lepton.coordinator.fl.kernels.strategies.fedavg import FedAvg

_M, _V, _T = "m.", "v.", "t"


class FedAdam(FedAvg):
    """FedAvg's mean update fed to a server-side Adam; moments and step count are state."""

    name: ClassVar[str] = "fedadam"

    def __init__(
        self,
        *,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        bias_correction: bool = False,
    ) -> None:
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError("server_lr must be > 0")
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError("tau must be > 0")
        self.server_lr = float(server_lr)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.tau = float(tau)
        self.bias_correction = bias_correction
        self._m: dict[str, F64] = {}
        self._v: dict[str, F64] = {}
        self._t = 0

    def step(
        self, global_weights: Weights, delta: Mapping[str, F64]
    ) -> dict[str, npt.NDArray[np.generic]]:
        t = self._t + 1
        lr = self.server_lr
        if self.bias_correction:
            lr *= math.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)
        m: dict[str, F64] = {}
        v: dict[str, F64] = {}
        move: dict[str, F64] = {}
        for name, d in delta.items():
            m_prev = self._m.get(name, np.zeros_like(d))
            v_prev = self._v.get(name, np.full_like(d, self.tau**2))
            m[name] = self.beta1 * m_prev + (1.0 - self.beta1) * d
            v[name] = self.beta2 * v_prev + (1.0 - self.beta2) * np.square(d)
            move[name] = lr * m[name] / (np.sqrt(v[name]) + self.tau)
        weights = apply_delta(global_weights, move)
        self._m, self._v, self._t = m, v, t
        return weights

    def state(self) -> dict[str, npt.NDArray[np.generic]]:
        out: dict[str, npt.NDArray[np.generic]] = {_T: np.array(self._t, dtype=np.int64)}
        out.update({_M + k: a.copy() for k, a in self._m.items()})
        out.update({_V + k: a.copy() for k, a in self._v.items()})
        return out

    def load_state(self, state: Mapping[str, npt.NDArray[np.generic]]) -> None:
        unknown = [k for k in state if k != _T and not k.startswith((_M, _V))]
        if unknown:
            raise ValueError(f"not FedAdam state: {unknown[:5]}")
        self._t = int(np.asarray(state.get(_T, 0)))
        self._m = {
            k.removeprefix(_M): np.array(a, dtype=np.float64)
            for k, a in state.items()
            if k.startswith(_M)
        }
        self._v = {
            k.removeprefix(_V): np.array(a, dtype=np.float64)
            for k, a in state.items()
            if k.startswith(_V)
        }
