"""Aggregation kernels on named-tensor updates: pure numpy, no state, no I/O.

An update is a mapping of tensor name to array (client weights minus global weights). Every
kernel works tensor by tensor, so memory stays at ``clients x largest tensor`` however big
the model is, and computes in float64. These are the same kernels Flower ships in
``flwr.server.strategy.aggregate`` (weighted mean, coordinate-wise median, trimmed mean,
Krum scores), written over named tensors instead of lists of arrays; see
``coordinator/federated/__init__.py`` for why they are not imported from ``flwr``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
Arrays = Mapping[str, npt.NDArray[np.generic]]


def _stack(updates: Sequence[Arrays], name: str) -> F64:
    return np.stack([np.asarray(u[name], dtype=np.float64) for u in updates])


def weighted_mean(updates: Sequence[Arrays], weights: Sequence[float]) -> dict[str, F64]:
    """``sum_i w_i u_i / sum_i w_i`` per tensor; weights must be non-negative, not all zero."""
    if not updates:
        raise ValueError("no updates")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(updates),) or np.any(w < 0) or not np.isfinite(w).all():
        raise ValueError("one non-negative finite weight per update is needed")
    total = float(w.sum())
    if total <= 0:
        raise ValueError("weights sum to zero")
    w = w / total
    return {name: np.tensordot(w, _stack(updates, name), axes=1) for name in updates[0]}


def mean(updates: Sequence[Arrays]) -> dict[str, F64]:
    """Unweighted mean per tensor."""
    return weighted_mean(updates, [1.0] * len(updates))


def coordinate_median(updates: Sequence[Arrays]) -> dict[str, F64]:
    """Coordinate-wise median (Yin et al. 2018); an even count averages the middle two."""
    if not updates:
        raise ValueError("no updates")
    return {name: np.median(_stack(updates, name), axis=0) for name in updates[0]}


def trimmed_mean(updates: Sequence[Arrays], trim: int) -> dict[str, F64]:
    """Coordinate-wise mean after dropping the ``trim`` largest and ``trim`` smallest values."""
    n = len(updates)
    if trim < 0 or 2 * trim >= n:
        raise ValueError(f"cannot trim {trim} from each end of {n} updates")
    out: dict[str, F64] = {}
    for name in updates[0]:
        stacked = np.sort(_stack(updates, name), axis=0)
        out[name] = stacked[trim : n - trim].mean(axis=0)
    return out


def pairwise_sq_distances(updates: Sequence[Arrays]) -> F64:
    """``D[i, j] = ||u_i - u_j||^2`` over all tensors, accumulated tensor by tensor."""
    n = len(updates)
    dist = np.zeros((n, n))
    for name in updates[0]:
        flat = _stack(updates, name).reshape(n, -1)
        sq = np.einsum("ij,ij->i", flat, flat)
        dist += sq[:, None] + sq[None, :] - 2.0 * (flat @ flat.T)
    np.fill_diagonal(dist, 0.0)
    return np.maximum(dist, 0.0)  # rounding can leave tiny negatives


def krum_scores(updates: Sequence[Arrays], num_byzantine: int) -> F64:
    """Krum score of each update (Blanchard et al. 2017): the sum of squared distances to
    its ``n - f - 2`` nearest other updates (at least one)."""
    n = len(updates)
    closest = max(1, n - num_byzantine - 2)
    dist = pairwise_sq_distances(updates)
    scores = np.empty(n)
    for i in range(n):
        others = np.delete(dist[i], i)
        scores[i] = np.sort(others)[: min(closest, len(others))].sum()
    return scores


def global_norm(update: Arrays) -> float:
    """L2 norm of an update over all of its tensors."""
    return math.sqrt(
        sum(float(np.sum(np.square(np.asarray(a, dtype=np.float64)))) for a in update.values())
    )


def clip(update: Arrays, max_norm: float) -> tuple[dict[str, F64], float]:
    """The update scaled to an L2 norm of at most ``max_norm``, and its norm before clipping."""
    if not max_norm > 0:
        raise ValueError("max_norm must be > 0")
    norm = global_norm(update)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: np.asarray(v, dtype=np.float64) * scale for k, v in update.items()}, norm


def apply_delta(weights: Arrays, delta: Mapping[str, F64]) -> dict[str, npt.NDArray[np.generic]]:
    """``weights + delta`` in each tensor's own dtype (integers rounded, bools unchanged)."""
    out: dict[str, npt.NDArray[np.generic]] = {}
    for name, w in weights.items():
        arr = np.asarray(w)
        if arr.dtype.kind == "b":
            out[name] = arr.copy()
            continue
        new = arr.astype(np.float64) + delta[name]
        if arr.dtype.kind in "iu":
            info = np.iinfo(arr.dtype.name)
            new = np.clip(np.rint(new), info.min, info.max)
        out[name] = new.astype(arr.dtype)
    return out
