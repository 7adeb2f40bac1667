"""Each strategy against values computed by hand, plus screening, state and the factory."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from lepton.coordinator.fl.kernels.strategies import (
    STRATEGIES,
    AggregationError,
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
    build,
)

GLOBAL = {
    "w": np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32),
    "b": np.array([0.5], dtype=np.float32),
    "steps": np.array(10, dtype=np.int64),
}


def upd(device: str, w: list[list[float]], b: float, steps: int, n: int = 1) -> ClientUpdate:
    return ClientUpdate(
        device_id=device,
        delta={
            "w": np.array(w, dtype=np.float32),
            "b": np.array([b], dtype=np.float32),
            "steps": np.array(steps, dtype=np.int64),
        },
        num_examples=n,
    )


THREE = [
    upd("a", [[1, 0], [0, 0]], 1.0, 2, n=1),
    upd("b", [[0, 1], [0, 0]], 2.0, 2, n=1),
    upd("c", [[0, 0], [3, 0]], 6.0, 4, n=2),
]


def scalars(values: list[float]) -> tuple[dict[str, np.ndarray], list[ClientUpdate]]:
    """A one-coordinate model and one update per value (equal examples)."""
    updates = [
        ClientUpdate(device_id=f"d{i}", delta={"x": np.array([v])}, num_examples=1)
        for i, v in enumerate(values)
    ]
    return {"x": np.zeros(1)}, updates


def test_fedavg_weights_by_examples_and_keeps_dtypes() -> None:
    result = FedAvg().aggregate(GLOBAL, THREE)
    # (1*a + 1*b + 2*c) / 4
    np.testing.assert_allclose(result.update["w"], [[0.25, 0.25], [1.5, 0.0]])
    np.testing.assert_allclose(result.weights["w"], [[1.25, 2.25], [4.5, 4.0]])
    np.testing.assert_allclose(result.weights["b"], [0.5 + 15 / 4])
    assert result.weights["steps"] == 13  # 10 + (2 + 2 + 8) / 4
    assert {k: v.dtype for k, v in result.weights.items()} == {
        "w": np.float32,
        "b": np.float32,
        "steps": np.int64,
    }
    assert result.contributors == ["a", "b", "c"]
    assert result.num_examples == 4
    assert result.rejected == {}
    assert result.state == {}


def test_a_late_updates_weight_scales_its_share_in_mean_based_rules() -> None:
    from dataclasses import replace

    x0, (a, b) = scalars([1.0, 4.0])
    # b is a late update at half weight: (1*1 + 0.5*4) / 1.5 = 2.
    for strategy in (FedAvg(), FedProx(mu=0.01), FedAvgM(server_lr=1.0, momentum=0.0)):
        result = strategy.aggregate(x0, [a, replace(b, weight=0.5)])
        np.testing.assert_allclose(result.update["x"], [2.0])
    # Robust rules leave weights aside: the median of two is their mean, weight or not.
    np.testing.assert_allclose(
        Median().aggregate(x0, [a, replace(b, weight=0.5)]).update["x"], [2.5]
    )
    for weight in (0.0, 1.5, math.nan):
        result = FedAvg().aggregate(x0, [a, replace(b, weight=weight)])
        assert result.contributors == ["d0"]
        assert "weight" in result.rejected["d1"]


def test_fedprox_aggregates_like_fedavg_and_asks_clients_for_mu() -> None:
    prox = FedProx(mu=0.1)
    assert prox.configure_fit(3) == {"prox_mu": 0.1}
    assert FedAvg().configure_fit(3) == {}
    a, b = prox.aggregate(GLOBAL, THREE), FedAvg().aggregate(GLOBAL, THREE)
    for name in GLOBAL:
        np.testing.assert_array_equal(a.weights[name], b.weights[name])
    with pytest.raises(ValueError, match="mu"):
        FedProx(mu=-1.0)


def test_median_is_coordinatewise_and_unweighted() -> None:
    result = Median().aggregate(GLOBAL, THREE)
    np.testing.assert_allclose(result.update["w"], [[0, 0], [0, 0]])
    np.testing.assert_allclose(result.update["b"], [2.0])  # median(1, 2, 6), examples ignored
    assert result.weights["steps"] == 12
    g, ups = scalars([1.0, 5.0, 2.0, 9.0])
    np.testing.assert_allclose(Median().aggregate(g, ups).update["x"], [3.5])


def test_trimmed_mean_drops_both_tails() -> None:
    g, ups = scalars([100.0, 2.0, 1.0, 4.0, 3.0])
    result = TrimmedMean(beta=0.2).aggregate(g, ups)  # floor(0.2 * 5) = 1 from each end
    np.testing.assert_allclose(result.update["x"], [3.0])
    assert result.metrics["trimmed_mean.trimmed"] == 1.0
    np.testing.assert_allclose(TrimmedMean(beta=0.0).aggregate(g, ups).update["x"], [22.0])
    with pytest.raises(ValueError, match="beta"):
        TrimmedMean(beta=0.5)


def test_krum_and_multikrum_scores() -> None:
    # f = 1, n - f - 2 = 2 closest. Scores: 0 -> 1+4=5, 1 -> 1+1=2, 2 -> 1+1=2, 3 -> 4+1=5,
    # 10 -> 49+64=113. Krum takes the first of the tied best (index 1, value 1).
    g, ups = scalars([0.0, 1.0, 2.0, 3.0, 10.0])
    krum = Krum(num_byzantine=1).aggregate(g, ups)
    np.testing.assert_allclose(krum.update["x"], [1.0])
    assert krum.contributors == ["d1"]
    assert krum.num_examples == 1
    multi = MultiKrum(num_byzantine=1).aggregate(g, ups)  # keeps n - f = 4: 0, 1, 2, 3
    np.testing.assert_allclose(multi.update["x"], [1.5])
    assert multi.contributors == ["d0", "d1", "d2", "d3"]
    two = Krum(num_byzantine=1, keep=2).aggregate(g, ups)
    np.testing.assert_allclose(two.update["x"], [1.5])


def test_krum_needs_2f_plus_3_updates() -> None:
    g, ups = scalars([0.0, 1.0, 2.0, 3.0])
    with pytest.raises(AggregationError) as info:
        Krum(num_byzantine=1).aggregate(g, ups)
    assert info.value.reason == "too_few_updates"


def test_fedavgm_accumulates_momentum() -> None:
    g, ups = scalars([1.0])
    strategy = FedAvgM(server_lr=1.0, momentum=0.5)
    first = strategy.aggregate(g, ups)
    np.testing.assert_allclose(first.weights["x"], [1.0])  # v = 1
    second = strategy.aggregate(first.weights, ups)
    np.testing.assert_allclose(second.weights["x"], [2.5])  # v = 0.5 * 1 + 1
    np.testing.assert_allclose(second.state["momentum.x"], [1.5])
    plain = FedAvgM(server_lr=1.0, momentum=0.0)
    np.testing.assert_allclose(plain.aggregate(g, ups).weights["x"], [1.0])


def test_fedadam_follows_reddi_et_al() -> None:
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    strategy = FedAdam(server_lr=lr, beta1=b1, beta2=b2, tau=tau)
    g, ups = scalars([1.0])
    first = strategy.aggregate(g, ups)
    m1, v1 = (1 - b1) * 1.0, b2 * tau**2 + (1 - b2) * 1.0
    np.testing.assert_allclose(first.weights["x"], [lr * m1 / (math.sqrt(v1) + tau)])
    _, down = scalars([-1.0])
    second = strategy.aggregate(first.weights, down)
    m2, v2 = b1 * m1 - (1 - b1), b2 * v1 + (1 - b2)
    expected = first.weights["x"][0] + lr * m2 / (math.sqrt(v2) + tau)
    np.testing.assert_allclose(second.weights["x"], [expected])
    assert int(second.state["t"]) == 2


def test_fedadam_bias_correction() -> None:
    strategy = FedAdam(server_lr=0.1, bias_correction=True)
    g, ups = scalars([2.0])
    m, v = 0.1 * 2.0, 0.99 * 1e-6 + 0.01 * 4.0
    lr = 0.1 * math.sqrt(1 - 0.99) / (1 - 0.9)
    np.testing.assert_allclose(
        strategy.aggregate(g, ups).weights["x"], [lr * m / (math.sqrt(v) + 1e-3)]
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedAvgM(momentum=0.9),
        FedAdam,
        lambda: CentralDP(FedAdam(), clip_norm=1.0, noise_multiplier=0.0),
        CenteredClipping,
    ],
)
def test_state_round_trip_resumes_identically(make: Callable[[], Strategy]) -> None:
    rng = np.random.default_rng(0)
    g = {"x": np.zeros(3), "y": np.zeros((2, 2))}

    def round_updates() -> list[ClientUpdate]:
        return [
            ClientUpdate(
                device_id=f"d{i}",
                delta={"x": rng.normal(size=3) * 0.1, "y": rng.normal(size=(2, 2)) * 0.1},
                num_examples=i + 1,
            )
            for i in range(3)
        ]

    first, second = round_updates(), round_updates()
    original = make()
    r1 = original.aggregate(g, first)
    restored = make()
    restored.load_state(r1.state)
    a = original.aggregate(r1.weights, second)
    b = restored.aggregate(r1.weights, second)
    for name in g:
        np.testing.assert_array_equal(a.weights[name], b.weights[name])
    assert a.state.keys() == b.state.keys()


def test_stateless_strategies_refuse_foreign_state() -> None:
    with pytest.raises(ValueError, match="no state"):
        FedAvg().load_state({"m.x": np.zeros(1)})
    with pytest.raises(ValueError, match="FedAdam"):
        FedAdam().load_state({"momentum.x": np.zeros(1)})


def test_clipping_scales_large_updates_down() -> None:
    g = {"x": np.zeros(2)}
    ups = [
        ClientUpdate(device_id="big", delta={"x": np.array([3.0, 4.0])}, num_examples=1),
        ClientUpdate(device_id="small", delta={"x": np.array([0.6, 0.8])}, num_examples=1),
    ]
    fixed = Clipping(FedAvg(), max_norm=2.0).aggregate(g, ups)
    np.testing.assert_allclose(fixed.update["x"], [(1.2 + 0.6) / 2, (1.6 + 0.8) / 2])
    assert fixed.metrics["clip.fraction"] == 0.5
    assert fixed.metrics["clip.norm"] == 2.0
    relative = Clipping(FedAvg(), median_multiplier=1.0).aggregate(g, ups)  # median norm 3
    np.testing.assert_allclose(relative.update["x"], [(1.8 + 0.6) / 2, (2.4 + 0.8) / 2])
    assert relative.metrics["clip.median_norm"] == 3.0
    prox = Clipping(FedProx(mu=0.5), max_norm=1.0)
    assert prox.configure_fit(0) == {"prox_mu": 0.5}
    with pytest.raises(ValueError, match="exactly one"):
        Clipping(FedAvg())


def test_centered_clipping_is_the_mean_within_tau_and_bounds_outliers() -> None:
    g, ups = scalars([1.0, 2.0, 3.0])
    plain = CenteredClipping(tau=100.0).aggregate(g, ups)
    np.testing.assert_allclose(plain.update["x"], [2.0])
    assert plain.metrics["cc.clipped"] == 0.0
    # Adaptive radius: the median distance from the centre (0 in the first round), 2.5.
    g, ups = scalars([1.0, 2.0, 3.0, 1000.0])
    first = CenteredClipping(iterations=1).aggregate(g, ups)
    assert first.metrics["cc.radius"] == 2.5
    np.testing.assert_allclose(first.update["x"], [(1.0 + 2.0 + 2.5 + 2.5) / 4])
    assert first.metrics["cc.clipped"] == 2.0
    # Iterating moves the centre only by clipped offsets: it stays among the honest values.
    many = CenteredClipping(iterations=20).aggregate(g, ups)
    assert 2.0 <= float(many.update["x"][0]) <= 4.0
    for bad in ({"tau": 0.0}, {"tau_multiplier": -1.0}, {"iterations": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CenteredClipping(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="centre"):
        CenteredClipping().load_state({"momentum.x": np.zeros(1)})


def test_client_metrics_are_example_weighted() -> None:
    g, _ = scalars([0.0])
    ups = [
        ClientUpdate(
            device_id="a", delta={"x": np.zeros(1)}, num_examples=1, metrics={"loss": 1.0}
        ),
        ClientUpdate(
            device_id="b",
            delta={"x": np.zeros(1)},
            num_examples=3,
            metrics={"loss": 3.0, "acc": 0.5, "tag": "x", "bad": math.nan},  # type: ignore[dict-item]
        ),
    ]
    metrics = FedAvg().aggregate(g, ups).metrics
    assert metrics["client.loss"] == pytest.approx(2.5)
    assert metrics["client.acc"] == pytest.approx(0.5)
    assert "client.tag" not in metrics
    assert "client.bad" not in metrics


def test_bad_updates_are_rejected_with_a_reason_not_fatal() -> None:
    good = THREE[0]
    bad = [
        upd("nan", [[math.nan, 0], [0, 0]], 1.0, 1),
        ClientUpdate(device_id="shape", delta={**good.delta, "w": np.zeros(3)}, num_examples=1),
        ClientUpdate(device_id="missing", delta={"w": good.delta["w"]}, num_examples=1),
        ClientUpdate(device_id="extra", delta={**good.delta, "z": np.zeros(1)}, num_examples=1),
        ClientUpdate(device_id="empty", delta=good.delta, num_examples=0),
        ClientUpdate(device_id="text", delta={**good.delta, "b": np.array(["x"])}, num_examples=1),
    ]
    result = FedAvg().aggregate(GLOBAL, [good, *bad])
    assert result.contributors == ["a"]
    assert set(result.rejected) == {"nan", "shape", "missing", "extra", "empty", "text"}
    assert "non-finite" in result.rejected["nan"]
    assert "shape" in result.rejected["shape"]
    assert "no training examples" in result.rejected["empty"]


def test_a_device_sending_twice_is_left_out() -> None:
    result = FedAvg().aggregate(GLOBAL, [THREE[0], THREE[1], THREE[0]])
    assert result.contributors == ["b"]
    assert "more than one" in result.rejected["a"]


def test_no_usable_update_is_an_aggregation_error() -> None:
    with pytest.raises(AggregationError, match="fedavg needs 1"):
        FedAvg().aggregate(GLOBAL, [upd("nan", [[math.nan, 0], [0, 0]], 1.0, 1)])
    with pytest.raises(ValueError, match="empty"):
        FedAvg().aggregate({}, THREE)


def test_build_by_name() -> None:
    assert set(STRATEGIES) == {
        "fedavg",
        "fedprox",
        "fedavgm",
        "fedadam",
        "median",
        "trimmed_mean",
        "krum",
        "multikrum",
        "centered_clipping",
    }
    assert isinstance(build("centered_clipping", tau_multiplier=2.0), CenteredClipping)
    prox = build("fedprox", mu=0.2)
    assert isinstance(prox, FedProx)
    assert prox.mu == 0.2
    clipped = build("median", clip_norm=1.0)
    assert isinstance(clipped, Clipping)
    assert isinstance(clipped.inner, Median)
    dp = build("fedavgm", clip_norm=1.0, dp_noise_multiplier=1.0, dp_expected_clients=10)
    assert isinstance(dp, CentralDP)
    assert isinstance(dp.inner, FedAvgM)
    with pytest.raises(ValueError, match="unknown strategy"):
        build("nope")
    with pytest.raises(ValueError, match="bad knobs"):
        build("fedavg", mu=1.0)
    with pytest.raises(ValueError, match="clip_norm"):
        build("fedavg", dp_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="mean-based"):
        build("krum", num_byzantine=1, clip_norm=1.0, dp_noise_multiplier=1.0)


@pytest.mark.parametrize(
    ("name", "knobs", "bounds"),
    [
        ("fedavg", {}, False),
        ("fedprox", {"mu": 0.01}, False),
        ("fedavgm", {}, False),
        ("fedadam", {}, False),
        ("fedavg", {"server_momentum": 0.9}, False),
        ("median", {}, True),
        ("trimmed_mean", {"beta": 0.2}, True),
        ("multikrum", {"num_byzantine": 2}, True),
        ("multikrum", {"num_byzantine": 2, "server_momentum": 0.9}, True),
        ("centered_clipping", {}, True),
        ("fedavg", {"clip_norm": 1.0}, True),
        ("fedavg", {"clip_norm": 1.0, "dp_noise_multiplier": 0.5}, True),
    ],
)
def test_which_strategies_bound_each_updates_influence(
    name: str, knobs: dict[str, object], bounds: bool
) -> None:
    # The coordinator's norm screen is applied only where this is False (closing.py): a
    # robust rule losing honest big updates to it could fall below its minimum.
    assert build(name, **knobs).bounds_influence() is bounds
