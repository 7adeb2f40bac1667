"""Centered clipping (Karimireddy, He and Jaggi 2021, "Learning from History for Byzantine
Robust Optimization").

Starting from the last round's aggregate ``v`` (history: consecutive rounds' updates point
the same way), each of ``iterations`` steps moves ``v`` by the mean of the updates' offsets
from it, each offset clipped to a radius ``tau``::

    v <- v + (1/n) * sum_i clip(Delta_i - v, tau)

An update, however large, moves ``v`` by at most ``tau / n``, and updates near ``v`` count
in full, so the rule is the plain mean when every update is within ``tau`` of the centre.
Unlike the coordinate-wise median and trimmed mean, it acts on whole vectors: an
attacker's pull is bounded in norm whatever direction it takes. ``tau`` is fixed, or
(default) ``tau_multiplier`` times the median distance of this round's updates from the
centre, which follows the updates' scale as training progresses; with strongly skewed
data that distance is wide, so is the bound (docs/BENCHMARKS.md measures the cost). The
centre is server state, persisted with the weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from lepton.coordinator.fl.kernels.aggregate import F64, clip, global_norm, mean
from lepton.coordinator.fl.kernels.strategies.base import (
    ClientUpdate,
    Combined,
    Strategy,
    Weights,
    delta_of,
)

_PREFIX = "center."


class CenteredClipping(Strategy):
    """New weights = global + the centred-clipping aggregate (see module doc)."""

    robust = True
    name: ClassVar[str] = "centered_clipping"

    def __init__(
        self, *, tau: float | None = None, tau_multiplier: float = 1.0, iterations: int = 3
    ) -> None:
        if tau is not None and not (math.isfinite(tau) and tau > 0):
            raise ValueError("tau must be > 0 (or None: adaptive)")
        if not (math.isfinite(tau_multiplier) and tau_multiplier > 0):
            raise ValueError("tau_multiplier must be > 0")
        if not 1 <= iterations <= 100:
            raise ValueError("iterations must be in [1, 100]")
        self.tau = tau
        self.tau_multiplier = float(tau_multiplier)
        self.iterations = iterations
        self._center: dict[str, F64] = {}

    def combine(self, global_weights: Weights, updates: Sequence[ClientUpdate]) -> Combined:
        del global_weights
        deltas = [delta_of(u) for u in updates]
        center = {k: self._center.get(k, np.zeros_like(v)) for k, v in deltas[0].items()}
        offsets = [{k: d[k] - center[k] for k in center} for d in deltas]
        distances = [global_norm(o) for o in offsets]
        radius = self.tau
        if radius is None:
            radius = self.tau_multiplier * float(np.median(distances))
        clipped = sum(dist > radius for dist in distances)
        if radius > 0:
            for _ in range(self.iterations):
                step = mean(
                    [clip({k: d[k] - center[k] for k in center}, radius)[0] for d in deltas]
                )
                center = {k: center[k] + step[k] for k in center}
        self._center = center
        return Combined(
            delta={k: v.copy() for k, v in center.items()},
            contributors=[u.device_id for u in updates],
            metrics={"cc.radius": radius, "cc.clipped": float(clipped)},
        )

    def state(self) -> dict[str, npt.NDArray[np.generic]]:
        return {_PREFIX + k: v.copy() for k, v in self._center.items()}

    def load_state(self, state: Mapping[str, npt.NDArray[np.generic]]) -> None:
        unknown = [k for k in state if not k.startswith(_PREFIX)]
        if unknown:
            raise ValueError(f"{self.name} keeps only its centre, got {sorted(unknown)[:5]}")
        self._center = {
            k.removeprefix(_PREFIX): np.array(v, dtype=np.float64) for k, v in state.items()
        }
