"""Central differential privacy (DP-FedAvg, McMahan et al. 2018): clip, average, add noise.

Each round, every update is clipped to an L2 norm of at most ``clip_norm`` (``C``), the
clipped updates are summed, Gaussian noise of standard deviation ``noise_multiplier * C``
(``z C``) is added to every coordinate of the sum, and the result is divided by the number
of clients (the fixed ``expected_clients`` if given, else the number of updates). The
wrapped strategy's server step (plain addition, momentum, Adam) is then applied to this
private mean, which is post-processing and costs no privacy. Only mean-based strategies can
be wrapped: a median or Krum over clipped updates has no Gaussian-mechanism guarantee.

The guarantee is client-level (adding or removing one device's whole data) and holds for the
coordinator's output, assuming the coordinator itself is trusted. Updates are averaged
unweighted, since weighting by ``num_examples`` would let one client exceed the sensitivity
``C``. Dividing by the actual number of updates, as Flower does, leaks that count; pass
``expected_clients`` (the number sampled per round) for the textbook fixed denominator.

:meth:`CentralDP.epsilon` reports the ``epsilon`` spent so far for a ``delta`` and the
per-round sampling rate (clients sampled / population), from the RDP accountant in
:mod:`lepton.coordinator.fl.kernels.accountant`. The noise comes from numpy's generator, which is
not a cryptographic source; floating-point attacks on Gaussian sampling (Mironov 2012) are
out of scope.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from lepton.coordinator.fl.kernels.accountant import epsilon
from lepton.coordinator.fl.kernels.aggregate import F64, clip
from lepton.coordinator.fl.kernels.strategies.base import ClientUpdate, Combined, Strategy, Weights
from lepton.coordinator.fl.kernels.strategies.fedavg import FedAvg

_ROUNDS = "dp.rounds"


class CentralDP(Strategy):
    """Clipped, noised mean of the updates, then ``inner``'s server step."""

    name: ClassVar[str] = "dp"
    by_mean: ClassVar[bool] = True

    def __init__(
        self,
        inner: Strategy | None = None,
        *,
        clip_norm: float,
        noise_multiplier: float,
        expected_clients: int | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        inner = FedAvg() if inner is None else inner
        if not inner.by_mean:
            raise ValueError(f"central DP needs a mean-based strategy, not {inner.name}")
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError("clip_norm must be a finite number > 0")
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError("noise_multiplier must be a finite number >= 0")
        if expected_clients is not None and expected_clients < 1:
            raise ValueError("expected_clients must be >= 1")
        self.inner = inner
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_clients = expected_clients
        self.rng = rng if rng is not None else np.random.default_rng()
        self.rounds = 0

    def bounds_influence(self) -> bool:
        return True

    def min_updates(self) -> int:
        return self.inner.min_updates()

    def configure_fit(self, round_no: int) -> dict[str, Any]:
        return self.inner.configure_fit(round_no)

    def combine(self, global_weights: Weights, updates: Sequence[ClientUpdate]) -> Combined:
        del global_weights
        clipped = [clip(u.delta, self.clip_norm) for u in updates]
        denominator = self.expected_clients or len(updates)
        sigma = self.noise_multiplier * self.clip_norm
        delta: dict[str, F64] = {}
        for name in clipped[0][0]:
            total = np.sum([c[name] for c, _ in clipped], axis=0)
            noise = self.rng.normal(0.0, sigma, size=total.shape) if sigma > 0 else 0.0
            delta[name] = (total + noise) / denominator
        return Combined(
            delta=delta,
            contributors=[u.device_id for u in updates],
            metrics={
                "dp.noise_std": sigma / denominator,
                "dp.clip_fraction": sum(n > self.clip_norm for _, n in clipped) / len(clipped),
            },
        )

    def step(
        self, global_weights: Weights, delta: Mapping[str, F64]
    ) -> dict[str, npt.NDArray[np.generic]]:
        weights = self.inner.step(global_weights, delta)
        self.rounds += 1
        return weights

    def state(self) -> dict[str, npt.NDArray[np.generic]]:
        return {**self.inner.state(), _ROUNDS: np.array(self.rounds, dtype=np.int64)}

    def load_state(self, state: Mapping[str, npt.NDArray[np.generic]]) -> None:
        self.rounds = int(np.asarray(state.get(_ROUNDS, 0)))
        self.inner.load_state({k: v for k, v in state.items() if k != _ROUNDS})

    def epsilon(self, *, delta: float, sampling_rate: float, rounds: int | None = None) -> float:
        """``epsilon`` spent after ``rounds`` (default: the rounds aggregated so far)."""
        return epsilon(
            noise_multiplier=self.noise_multiplier,
            sampling_rate=sampling_rate,
            steps=self.rounds if rounds is None else rounds,
            delta=delta,
        )
