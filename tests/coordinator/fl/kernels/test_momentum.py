"""Server momentum around another aggregation rule."""

from __future__ import annotations

import numpy as np
import pytest

from lepton.coordinator.fl.kernels.strategies import (
    ClientUpdate,
    Clipping,
    MultiKrum,
    ServerMomentum,
    TrimmedMean,
    build,
)

W = {"w": np.zeros(4, dtype=np.float32), "n": np.array(0, dtype=np.int64)}


def updates(value: float, n: int = 5) -> list[ClientUpdate]:
    return [
        ClientUpdate(
            device_id=f"d{i}",
            delta={"w": np.full(4, value, dtype=np.float32), "n": np.array(1, dtype=np.int64)},
            num_examples=10,
        )
        for i in range(n)
    ]


def test_momentum_accumulates_the_rules_update_and_survives_a_restart() -> None:
    s = ServerMomentum(TrimmedMean(beta=0.2), momentum=0.5)
    first = s.aggregate(W, updates(1.0))
    np.testing.assert_allclose(first.weights["w"], 1.0)
    assert int(first.weights["n"]) == 1
    second = s.aggregate(first.weights, updates(1.0))
    np.testing.assert_allclose(second.weights["w"], 1.0 + 1.5)  # v = 0.5 * 1 + 1
    restored = ServerMomentum(TrimmedMean(beta=0.2), momentum=0.5)
    restored.load_state(second.state)
    third_a = s.aggregate(second.weights, updates(0.0))
    third_b = restored.aggregate(second.weights, updates(0.0))
    np.testing.assert_allclose(third_a.weights["w"], third_b.weights["w"])
    np.testing.assert_allclose(third_a.weights["w"], 2.5 + 0.75)


def test_zero_momentum_is_the_rule_itself() -> None:
    plain = MultiKrum(num_byzantine=1).aggregate(W, updates(0.3))
    wrapped = ServerMomentum(MultiKrum(num_byzantine=1), momentum=0.0).aggregate(W, updates(0.3))
    np.testing.assert_allclose(plain.weights["w"], wrapped.weights["w"])
    assert wrapped.contributors == plain.contributors


def test_build_wraps_outermost_and_refuses_server_optimizers() -> None:
    s = build("trimmed_mean", beta=0.1, clip_median_multiplier=2.0, server_momentum=0.9)
    assert isinstance(s, ServerMomentum)
    assert isinstance(s.inner, Clipping)
    assert s.min_updates() == s.inner.min_updates()
    for name in ("fedavgm", "fedadam"):
        with pytest.raises(ValueError, match="server optimizer"):
            build(name, server_momentum=0.9)
    with pytest.raises(ValueError, match="momentum"):
        build("median", server_momentum=1.0)
