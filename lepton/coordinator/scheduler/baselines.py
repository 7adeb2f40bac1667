"""Baselines: how federated and batch frameworks commonly pick devices today.

Both respect the hard filters (they only choose among feasible devices) but ignore cost:
``random`` draws a feasible device uniformly per task; ``round_robin`` walks the device list
in order, each task taking the next feasible device after the previous pick.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


def random_assign(feasible: BoolArray, rng: np.random.Generator) -> IntArray:
    """A uniformly random feasible device per row (every row needs one)."""
    n = feasible.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    count = feasible.sum(axis=1)
    pick = np.floor(rng.random(n) * count).astype(np.int64)
    # Index of the (pick + 1)-th True in each row.
    csum = np.cumsum(feasible, axis=1, dtype=np.int32)
    out: IntArray = np.argmax(csum > pick[:, None], axis=1).astype(np.int64)
    return out


def round_robin(feasible: BoolArray) -> IntArray:
    """Each row takes the first feasible device after the previous row's device, cyclically."""
    n, m = feasible.shape
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    if feasible.all():
        out[:] = np.arange(n) % m
        return out
    cursor = 0
    for j in range(n):
        options = np.flatnonzero(feasible[j])
        at = int(np.searchsorted(options, cursor))
        i = int(options[at]) if at < len(options) else int(options[0])
        out[j] = i
        cursor = i + 1
    return out
