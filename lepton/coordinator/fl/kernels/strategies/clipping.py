"""Update-norm clipping around any strategy: bound how far one client can move the model.

Each update is scaled down to an L2 norm (over all its tensors) of at most a threshold
before the inner strategy sees it. The threshold is fixed (``max_norm``) or relative to the
round (``median_multiplier`` times the median update norm, which adapts as updates shrink
during training and needs no tuning per model). Clipping alone limits a Byzantine client's
pull to the threshold; around a robust rule (median, Krum) it also evens out scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from lepton.coordinator.fl.kernels.aggregate import F64, clip, global_norm
from lepton.coordinator.fl.kernels.strategies.base import ClientUpdate, Combined, Strategy, Weights


class Clipping(Strategy):
    """``inner`` applied to clipped updates; every other behaviour is ``inner``'s."""

    name: ClassVar[str] = "clipping"

    def __init__(
        self,
        inner: Strategy,
        *,
        max_norm: float | None = None,
        median_multiplier: float | None = None,
    ) -> None:
        if (max_norm is None) == (median_multiplier is None):
            raise ValueError("give exactly one of max_norm and median_multiplier")
        for value in (max_norm, median_multiplier):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError("the clipping threshold must be a finite number > 0")
        self.inner = inner
        self.max_norm = max_norm
        self.median_multiplier = median_multiplier

    def bounds_influence(self) -> bool:
        return True

    def min_updates(self) -> int:
        return self.inner.min_updates()

    def configure_fit(self, round_no: int) -> dict[str, Any]:
        return self.inner.configure_fit(round_no)

    def combine(self, global_weights: Weights, updates: Sequence[ClientUpdate]) -> Combined:
        norms = [global_norm(u.delta) for u in updates]
        median = float(np.median(norms))
        if self.max_norm is not None:
            threshold = self.max_norm
        else:
            assert self.median_multiplier is not None
            threshold = self.median_multiplier * median
        if threshold > 0:
            clipped = [replace(u, delta=clip(u.delta, threshold)[0]) for u in updates]
        else:  # every update is zero (or most are): nothing to clip
            clipped = list(updates)
        inner = self.inner.combine(global_weights, clipped)
        metrics = {
            "clip.norm": threshold,
            "clip.fraction": sum(n > threshold for n in norms) / len(norms),
            "clip.median_norm": median,
        }
        return Combined(
            delta=inner.delta, contributors=inner.contributors, metrics={**inner.metrics, **metrics}
        )

    def step(
        self, global_weights: Weights, delta: Mapping[str, F64]
    ) -> dict[str, npt.NDArray[np.generic]]:
        return self.inner.step(global_weights, delta)

    def state(self) -> dict[str, npt.NDArray[np.generic]]:
        return self.inner.state()

    def load_state(self, state: Mapping[str, npt.NDArray[np.generic]]) -> None:
        self.inner.load_state(state)
