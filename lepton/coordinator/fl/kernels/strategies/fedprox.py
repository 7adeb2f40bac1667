"""FedProx (Li et al. 2020): FedAvg aggregation, plus a proximal term on the clients.

Each client minimises ``loss(w) + mu / 2 * ||w - w_global||^2`` so that heterogeneous
clients (different data, different amounts of work) drift less from the global model. The
server side is FedAvg; the strategy's only difference is the ``prox_mu`` it asks clients
to use, through :meth:`FedProx.configure_fit`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from lepton.coordinator.fl.kernels.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg whose clients train with the proximal term ``mu``."""

    name: ClassVar[str] = "fedprox"

    def __init__(self, *, mu: float = 0.01) -> None:
        if not (math.isfinite(mu) and mu >= 0):
            raise ValueError("mu must be a finite number >= 0")
        self.mu = float(mu)

    def configure_fit(self, round_no: int) -> dict[str, Any]:
        del round_no
        return {"prox_mu": self.mu}
