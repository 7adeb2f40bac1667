"""Adversarial clients for federated-learning experiments on a simulated fleet.

An attack is an ``update_transform`` (see :mod:`agent.training`): a function from the
honest update a device computed to the update it sends. Byzantine-robust aggregation is
measured against these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Arrays = dict[str, npt.NDArray[np.generic]]

ATTACKS: Final = ("sign_flip",)


def sign_flip(scale: float = 10.0) -> Callable[[Arrays], Arrays]:
    """Send ``-scale`` times the honest update (float tensors; counters unchanged)."""

    def attack(delta: Arrays) -> Arrays:
        import numpy as np

        out: dict[str, Any] = {}
        for name, value in delta.items():
            if value.dtype.kind == "f":
                out[name] = (np.asarray(value, dtype=np.float64) * -scale).astype(value.dtype)
            else:
                out[name] = value
        return out

    return attack


def make(name: str, scale: float) -> Callable[[Arrays], Arrays]:
    """The attack ``name`` (one of :data:`ATTACKS`); ``ValueError`` for an unknown one."""
    if name == "sign_flip":
        return sign_flip(scale)
    raise ValueError(f"unknown attack {name!r} (known: {', '.join(ATTACKS)})")
