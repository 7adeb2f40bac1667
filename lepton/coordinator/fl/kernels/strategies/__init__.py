"""Aggregation strategies, one per module, behind :class:`~.base.Strategy`.

================= =============================================== ==================
name              rule                                            robust
================= =============================================== ==================
fedavg            example-weighted mean                           no
fedprox           fedavg; clients add a proximal term (``mu``)    no
fedavgm           fedavg + server momentum                        no
fedadam           fedavg + server Adam (Reddi et al. 2021)        no
median            coordinate-wise median                          yes (< n/2)
trimmed_mean      coordinate-wise ``beta``-trimmed mean           yes (<= beta n)
krum              the update closest to its neighbours            yes (f, n >= 2f+3)
multikrum         mean of the ``keep`` best Krum scores           yes (f, n >= 2f+3)
centered_clipping last aggregate + mean of clipped offsets        bounds influence
clipping          any strategy over norm-clipped updates          bounds influence
dp                clipped mean + Gaussian noise, accounted in RDP bounds influence
momentum          any rule + FedAvgM's server momentum step       as the rule
================= =============================================== ==================

:func:`build` makes one from a name and keyword knobs (what a job's config holds).
"""

from __future__ import annotations

from typing import Any, Final

from lepton.coordinator.fl.kernels.strategies.base import (
    AggregateResult,
    AggregationError,
    ClientUpdate,
    Combined,
    Strategy,
    screen_updates,
)
from lepton.coordinator.fl.kernels.strategies.centered_clip import CenteredClipping
from lepton.coordinator.fl.kernels.strategies.clipping import Clipping
from lepton.coordinator.fl.kernels.strategies.dp import CentralDP
from lepton.coordinator.fl.kernels.strategies.fedadam import FedAdam
from lepton.coordinator.fl.kernels.strategies.fedavg import FedAvg
from lepton.coordinator.fl.kernels.strategies.fedavgm import FedAvgM
from lepton.coordinator.fl.kernels.strategies.fedprox import FedProx
from lepton.coordinator.fl.kernels.strategies.krum import Krum, MultiKrum
from lepton.coordinator.fl.kernels.strategies.median import Median
from lepton.coordinator.fl.kernels.strategies.momentum import ServerMomentum
from lepton.coordinator.fl.kernels.strategies.trimmed_mean import TrimmedMean

#: Strategies that stand alone, by name (the wrappers take an inner strategy).
STRATEGIES: Final[dict[str, type[Strategy]]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedProx,
        FedAvgM,
        FedAdam,
        Median,
        TrimmedMean,
        Krum,
        MultiKrum,
        CenteredClipping,
    )
}


def build(
    name: str,
    *,
    clip_norm: float | None = None,
    clip_median_multiplier: float | None = None,
    dp_noise_multiplier: float | None = None,
    dp_expected_clients: int | None = None,
    server_momentum: float | None = None,
    **knobs: Any,
) -> Strategy:
    """The strategy ``name`` with ``knobs`` (e.g. ``build("fedprox", mu=0.01)``), wrapped:

    - in :class:`CentralDP` when ``dp_noise_multiplier`` is given (``clip_norm`` required);
    - else in :class:`Clipping` when ``clip_norm`` or ``clip_median_multiplier`` is given;
    - then in :class:`ServerMomentum` when ``server_momentum`` is given (e.g.
      ``build("multikrum", num_byzantine=2, server_momentum=0.9)``).

    ``ValueError`` for an unknown name or knob.
    """
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ValueError(f"unknown strategy {name!r} (known: {', '.join(sorted(STRATEGIES))})")
    try:
        strategy = cls(**knobs)
    except TypeError as exc:
        raise ValueError(f"bad knobs for {name}: {exc}") from exc
    if dp_noise_multiplier is not None:
        if clip_norm is None:
            raise ValueError("central DP needs clip_norm")
        strategy = CentralDP(
            strategy,
            clip_norm=clip_norm,
            noise_multiplier=dp_noise_multiplier,
            expected_clients=dp_expected_clients,
        )
    elif clip_norm is not None or clip_median_multiplier is not None:
        strategy = Clipping(strategy, max_norm=clip_norm, median_multiplier=clip_median_multiplier)
    if server_momentum is not None:
        if cls in (FedAvgM, FedAdam):
            raise ValueError(f"{name} has its own server optimizer; server_momentum is for others")
        strategy = ServerMomentum(strategy, momentum=server_momentum)
    return strategy


__all__ = [
    "STRATEGIES",
    "AggregateResult",
    "AggregationError",
    "CenteredClipping",
    "CentralDP",
    "ClientUpdate",
    "Clipping",
    "Combined",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "Krum",
    "Median",
    "MultiKrum",
    "ServerMomentum",
    "Strategy",
    "TrimmedMean",
    "build",
    "screen_updates",
]
