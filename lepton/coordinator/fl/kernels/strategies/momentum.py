"""Server momentum around any strategy: FedAvgM's server step on another aggregation rule.

The inner strategy's rule (a median, a trimmed mean, Multi-Krum...) gives the round's
aggregated update ``Delta_t``; the server step is FedAvgM's (Hsu et al. 2019)::

    v_t = momentum * v_{t-1} + Delta_t
    w_{t+1} = w_t + server_lr * v_t

Robust rules discard or down-weight part of every round's information, so they converge
more slowly than FedAvg on skewed data; momentum recovers much of that speed. It does not
weaken the rule's robustness: the momentum only accumulates what the rule let through.
The inner strategy's own server step is replaced, so wrap rules whose step is plain
addition (everything but FedAvgM and FedAdam, which have their own server optimizer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from lepton.coordinator.fl.kernels.aggregate import F64, apply_delta
from lepton.coordinator.fl.kernels.strategies.base import ClientUpdate, Combined, Strategy, Weights

_PREFIX = "server_momentum."


class MomentumStep:
    """FedAvgM's server step, ``v_t = momentum * v_{t-1} + Delta_t; w += server_lr * v_t``,
    with its velocity; shared by :class:`~.fedavgm.FedAvgM` and :class:`ServerMomentum`."""

    def __init__(self, *, momentum: float, server_lr: float) -> None:
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError("server_lr must be > 0")
        if not 0.0 <= momentum < 1.0:
            raise ValueError("momentum must be in [0, 1)")
        self.momentum = float(momentum)
        self.server_lr = float(server_lr)
        self.velocity: dict[str, F64] = {}

    def apply(
        self, global_weights: Mapping[str, npt.NDArray[np.generic]], delta: Mapping[str, F64]
    ) -> dict[str, npt.NDArray[np.generic]]:
        velocity = {
            name: self.momentum * self.velocity.get(name, np.zeros_like(d)) + d
            for name, d in delta.items()
        }
        weights = apply_delta(global_weights, {k: self.server_lr * v for k, v in velocity.items()})
        self.velocity = velocity
        return weights

    def state(self, prefix: str) -> dict[str, npt.NDArray[np.generic]]:
        return {prefix + k: v.copy() for k, v in self.velocity.items()}

    def load(self, state: Mapping[str, npt.NDArray[np.generic]], prefix: str) -> None:
        """The velocity from ``state``'s keys that start with ``prefix`` (others ignored)."""
        self.velocity = {
            k.removeprefix(prefix): np.array(v, dtype=np.float64)
            for k, v in state.items()
            if k.startswith(prefix)
        }


class ServerMomentum(Strategy):
    """``inner``'s aggregation rule with a server momentum step (see module doc)."""

    name: ClassVar[str] = "server_momentum"

    def __init__(self, inner: Strategy, *, momentum: float = 0.9, server_lr: float = 1.0) -> None:
        self._step = MomentumStep(momentum=momentum, server_lr=server_lr)
        if inner.name in ("fedavgm", "fedadam"):
            raise ValueError(f"{inner.name} has its own server optimizer")
        self.inner = inner
        self.momentum = self._step.momentum
        self.server_lr = self._step.server_lr

    def bounds_influence(self) -> bool:
        return self.inner.bounds_influence()

    def min_updates(self) -> int:
        return self.inner.min_updates()

    def configure_fit(self, round_no: int) -> dict[str, Any]:
        return self.inner.configure_fit(round_no)

    def combine(self, global_weights: Weights, updates: Sequence[ClientUpdate]) -> Combined:
        return self.inner.combine(global_weights, updates)

    def step(
        self, global_weights: Weights, delta: Mapping[str, F64]
    ) -> dict[str, npt.NDArray[np.generic]]:
        return self._step.apply(global_weights, delta)

    def state(self) -> dict[str, npt.NDArray[np.generic]]:
        return {**self.inner.state(), **self._step.state(_PREFIX)}

    def load_state(self, state: Mapping[str, npt.NDArray[np.generic]]) -> None:
        self._step.load(state, _PREFIX)
        self.inner.load_state({k: v for k, v in state.items() if not k.startswith(_PREFIX)})
