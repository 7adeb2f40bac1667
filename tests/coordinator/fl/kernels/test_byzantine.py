"""2 of 10 clients are Byzantine: they send their honest update sign-flipped and scaled 10x.

Robust rules must land close to what they give without the attack; FedAvg and the
server-optimizer strategies built on its mean must not (that is what the attack does to
them); clipping and central DP bound the damage.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from lepton.coordinator.fl.kernels.aggregate import global_norm
from lepton.coordinator.fl.kernels.strategies import (
    CenteredClipping,
    CentralDP,
    ClientUpdate,
    Clipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    Krum,
    Median,
    MultiKrum,
    Strategy,
    TrimmedMean,
)

SHAPES = {"conv.weight": (8, 1, 3, 3), "conv.bias": (8,), "fc.weight": (10, 32), "fc.bias": (10,)}
N_CLIENTS, N_BYZANTINE = 10, 2


def scenario() -> tuple[dict[str, np.ndarray], list[ClientUpdate], list[ClientUpdate]]:
    """Global weights, the clean updates, and the same round with two attackers."""
    rng = np.random.default_rng(7)
    global_weights = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    true_step = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    clean = [
        ClientUpdate(
            device_id=f"dev{i}",
            delta={
                k: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32)
                for k, v in true_step.items()
            },
            num_examples=int(rng.integers(50, 150)),
        )
        for i in range(N_CLIENTS)
    ]
    attacked = [
        u
        if i < N_CLIENTS - N_BYZANTINE
        else ClientUpdate(
            device_id=u.device_id,
            delta={k: -10.0 * v for k, v in u.delta.items()},
            num_examples=u.num_examples,
        )
        for i, u in enumerate(clean)
    ]
    return global_weights, clean, attacked


def deviation(make: Callable[[], Strategy]) -> float:
    """||attacked - clean|| / ||clean - global||, each from a fresh strategy."""
    g, clean, attacked = scenario()
    clean_w = make().aggregate(g, clean).weights
    attacked_w = make().aggregate(g, attacked).weights
    moved = {k: clean_w[k].astype(np.float64) - g[k] for k in g}
    off = {k: attacked_w[k].astype(np.float64) - clean_w[k] for k in g}
    return global_norm(off) / global_norm(moved)


ROBUST: dict[str, Callable[[], Strategy]] = {
    "median": Median,
    "trimmed_mean": lambda: TrimmedMean(beta=0.2),
    "krum": lambda: Krum(num_byzantine=N_BYZANTINE),
    "multikrum": lambda: MultiKrum(num_byzantine=N_BYZANTINE),
    "clipped_median": lambda: Clipping(Median(), median_multiplier=1.0),
}
NOT_ROBUST: dict[str, Callable[[], Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": lambda: FedProx(mu=0.1),
    "fedavgm": lambda: FedAvgM(momentum=0.9),
    "fedadam": lambda: FedAdam(server_lr=0.1),
}


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_robust_strategies_stay_close_to_the_clean_aggregate(name: str) -> None:
    assert deviation(ROBUST[name]) < 0.2


@pytest.mark.parametrize("name", sorted(NOT_ROBUST))
def test_mean_based_strategies_are_dragged_away(name: str) -> None:
    assert deviation(NOT_ROBUST[name]) > 1.0


def test_krum_picks_only_honest_updates() -> None:
    g, _, attacked = scenario()
    result = MultiKrum(num_byzantine=N_BYZANTINE).aggregate(g, attacked)
    assert set(result.contributors) == {f"dev{i}" for i in range(N_CLIENTS - N_BYZANTINE)}


@pytest.mark.parametrize(
    "make",
    [
        lambda: Clipping(FedAvg(), median_multiplier=1.0),
        lambda: CentralDP(FedAvg(), clip_norm=20.0, noise_multiplier=0.0),
    ],
    ids=["clipping", "dp"],
)
def test_clipping_bounds_the_damage(make: Callable[[], Strategy]) -> None:
    # Each attacker's pull is cut to the honest norm: (8 - 2) / 10 of the honest step
    # instead of (8 - 20) / 10, so a deviation near 0.4 instead of 2.2.
    assert deviation(make) < 0.5 < 1.5 < deviation(FedAvg)


def test_centered_clipping_with_history_stays_close() -> None:
    """Centred clipping starts from the last round's aggregate: after one clean round, the
    attacked round lands near the clean one. Without history (first round) each attacker
    still pulls by up to ``tau / n``, like clipping."""
    g, clean, attacked = scenario()

    def after_history(updates: list[ClientUpdate]) -> dict[str, np.ndarray]:
        strategy = CenteredClipping()
        history = strategy.aggregate(g, clean)
        resumed = CenteredClipping()
        resumed.load_state(history.state)
        return resumed.aggregate(g, updates).weights

    clean_w, attacked_w = after_history(clean), after_history(attacked)
    moved = {k: clean_w[k].astype(np.float64) - g[k] for k in g}
    off = {k: attacked_w[k].astype(np.float64) - clean_w[k] for k in g}
    assert global_norm(off) / global_norm(moved) < 0.1
    assert deviation(CenteredClipping) < 0.5 < 1.5 < deviation(FedAvg)
