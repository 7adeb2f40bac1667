"""Adversarial clients for federated-learning experiments on a simulated fleet.

An attack is an ``update_transform`` (see :mod:`lepton.agent.training.tasks`): a function from the
honest update a device computed to the update it sends (``none``: the honest update, for a
device whose only lie is its example count, see :func:`forge_examples`). Byzantine-robust
aggregation and the coordinator's update screening are measured against these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Arrays = dict[str, npt.NDArray[np.generic]]

ATTACKS: Final = ("sign_flip", "none")


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


def make(name: str, scale: float) -> Callable[[Arrays], Arrays] | None:
    """The attack ``name`` (one of :data:`ATTACKS`; None for ``none``); ``ValueError`` for
    an unknown one."""
    if name == "sign_flip":
        return sign_flip(scale)
    if name == "none":
        return None
    raise ValueError(f"unknown attack {name!r} (known: {', '.join(ATTACKS)})")


def forge_examples(output: dict[str, Any], claim: int) -> dict[str, Any]:
    """A successful ``train`` result's output claiming ``claim`` local examples (the
    update it names is unchanged): a weight the device's data does not back."""
    return {**output, "examples": claim} if "examples" in output else output
