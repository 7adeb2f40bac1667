"""Central DP: clipping and noise, and the RDP accountant against exact and known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from lepton.coordinator.fl.kernels import accountant
from lepton.coordinator.fl.kernels.strategies import (
    CentralDP,
    ClientUpdate,
    FedAdam,
    FedAvg,
    Median,
)


def updates(vectors: list[list[float]], n: int = 1) -> list[ClientUpdate]:
    return [
        ClientUpdate(device_id=f"d{i}", delta={"x": np.array(v)}, num_examples=n)
        for i, v in enumerate(vectors)
    ]


def test_without_noise_it_is_the_unweighted_mean_of_clipped_updates() -> None:
    g = {"x": np.zeros(2)}
    ups = updates([[3.0, 4.0], [0.6, 0.8]])
    ups[0] = ClientUpdate(device_id="d0", delta=ups[0].delta, num_examples=1000)
    result = CentralDP(clip_norm=1.0, noise_multiplier=0.0).aggregate(g, ups)
    np.testing.assert_allclose(result.update["x"], [0.6, 0.8])  # both clipped/kept to norm 1
    assert result.metrics["dp.clip_fraction"] == 0.5
    fixed = CentralDP(clip_norm=1.0, noise_multiplier=0.0, expected_clients=4).aggregate(g, ups)
    np.testing.assert_allclose(fixed.update["x"], [0.3, 0.4])  # sum / 4


def test_noise_has_the_calibrated_spread() -> None:
    g = {"x": np.zeros(200_000)}
    ups = [
        ClientUpdate(device_id=f"d{i}", delta={"x": np.zeros(200_000)}, num_examples=1)
        for i in range(10)
    ]
    dp = CentralDP(clip_norm=2.0, noise_multiplier=1.5, rng=np.random.default_rng(0))
    result = dp.aggregate(g, ups)
    assert result.metrics["dp.noise_std"] == pytest.approx(1.5 * 2.0 / 10)
    assert float(np.std(result.update["x"])) == pytest.approx(0.3, rel=0.01)
    assert abs(float(np.mean(result.update["x"]))) < 0.005
    again = CentralDP(clip_norm=2.0, noise_multiplier=1.5, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(again.aggregate(g, ups).update["x"], result.update["x"])


def test_server_optimizer_runs_on_the_private_mean() -> None:
    g = {"x": np.zeros(1)}
    dp = CentralDP(FedAdam(server_lr=0.1), clip_norm=10.0, noise_multiplier=0.0)
    plain = FedAdam(server_lr=0.1)
    ups = updates([[1.0]])
    np.testing.assert_allclose(
        dp.aggregate(g, ups).weights["x"], plain.aggregate(g, ups).weights["x"]
    )


def test_only_mean_based_strategies_can_be_wrapped() -> None:
    with pytest.raises(ValueError, match="mean-based"):
        CentralDP(Median(), clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="clip_norm"):
        CentralDP(clip_norm=0.0, noise_multiplier=1.0)


def test_epsilon_grows_with_rounds_and_survives_a_restart() -> None:
    g = {"x": np.zeros(1)}
    dp = CentralDP(FedAvg(), clip_norm=1.0, noise_multiplier=1.0, rng=np.random.default_rng(1))
    assert dp.epsilon(delta=1e-5, sampling_rate=0.1) == 0.0
    eps = []
    for _ in range(3):
        g = dp.aggregate(g, updates([[0.1]])).weights
        eps.append(dp.epsilon(delta=1e-5, sampling_rate=0.1))
    assert eps[0] < eps[1] < eps[2]
    assert eps[2] == accountant.epsilon(
        noise_multiplier=1.0, sampling_rate=0.1, steps=3, delta=1e-5
    )
    restored = CentralDP(FedAvg(), clip_norm=1.0, noise_multiplier=1.0)
    restored.load_state(dp.state())
    assert restored.rounds == 3
    assert restored.epsilon(delta=1e-5, sampling_rate=0.1) == eps[2]


# ---------------------------------------------------------------- accountant


def _rdp_by_integration(q: float, sigma: float, alpha: float) -> float:
    """RDP of the sampled Gaussian mechanism straight from its definition (Mironov et al.)."""

    def integrand(z: float) -> float:
        log_ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
        return math.exp(float(stats.norm.logpdf(z, 0, sigma)) + alpha * float(log_ratio))

    value, _ = integrate.quad(
        integrand, -60 * sigma, 60 * sigma, limit=2000, epsabs=0, epsrel=1e-12, points=[0, 0.5, 2]
    )
    return math.log(value) / (alpha - 1)


@pytest.mark.parametrize(
    ("q", "sigma", "alpha"),
    [
        (0.1, 1.0, 1.6),
        (0.1, 1.0, 2.5),
        (0.1, 1.0, 4.0),
        (0.1, 1.0, 5.5),
        (0.3, 1.3, 1.5),
        (0.01, 0.8, 1.3),
        (0.05, 2.0, 32.0),
    ],
)
def test_rdp_matches_the_defining_integral(q: float, sigma: float, alpha: float) -> None:
    got = accountant.rdp_sampled_gaussian(q, sigma, 1, [alpha])[0]
    assert got == pytest.approx(_rdp_by_integration(q, sigma, alpha), rel=1e-7)


def test_full_participation_is_the_plain_gaussian_mechanism() -> None:
    orders = [2.0, 4.0, 8.0, 16.0]
    rdp = accountant.rdp_sampled_gaussian(1.0, 5.0, 10, orders)
    np.testing.assert_allclose(rdp, [10 * a / 50 for a in orders])


@pytest.mark.parametrize(
    ("q", "sigma", "steps", "delta", "expected"),
    [
        # Google's dp-accounting 0.6 RdpAccountant, same orders; here the best order is an
        # integer, where both compute the same finite sum. The first is the DP-SGD MNIST
        # setting of Abadi et al. (batch 256 of 60,000, sigma 1.1, 60 epochs).
        (256 / 60000, 1.1, 14062, 1e-5, 2.5965558697943036),
        (0.05, 2.0, 500, 1e-5, 2.7685845622392886),
        (0.01, 1.0, 1000, 1e-5, 2.101366525420273),
        (1.0, 5.0, 10, 1e-5, 2.8136532471298397),
    ],
)
def test_epsilon_matches_known_values(
    q: float, sigma: float, steps: int, delta: float, expected: float
) -> None:
    eps = accountant.epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=delta)
    assert eps == pytest.approx(expected, rel=1e-5)
    # A plain float: round metrics are stored as JSON, which has no numpy scalars.
    assert type(eps) is float


def test_epsilon_edge_cases_and_monotonicity() -> None:
    kw = {"sampling_rate": 0.1, "delta": 1e-5}
    assert accountant.epsilon(noise_multiplier=1.0, steps=0, **kw) == 0.0
    assert accountant.epsilon(noise_multiplier=0.0, steps=1, **kw) == math.inf
    assert accountant.epsilon(noise_multiplier=1.0, steps=10, **kw) < accountant.epsilon(
        noise_multiplier=1.0, steps=20, **kw
    )
    assert accountant.epsilon(noise_multiplier=2.0, steps=10, **kw) < accountant.epsilon(
        noise_multiplier=1.0, steps=10, **kw
    )
    with pytest.raises(ValueError, match="delta"):
        accountant.epsilon(noise_multiplier=1.0, steps=1, sampling_rate=0.1, delta=0.0)


def test_noise_multiplier_for_a_budget() -> None:
    z = accountant.noise_multiplier_for(
        target_epsilon=3.0, sampling_rate=0.05, steps=200, delta=1e-5
    )
    eps = accountant.epsilon(noise_multiplier=z, sampling_rate=0.05, steps=200, delta=1e-5)
    assert eps <= 3.0
    assert (
        accountant.epsilon(noise_multiplier=z - 0.02, sampling_rate=0.05, steps=200, delta=1e-5)
        > 3.0
    )
