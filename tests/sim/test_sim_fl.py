"""Simulated devices for federated jobs: the torch runtime, adversarial devices."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lepton.sim.attacks import make, sign_flip
from lepton.sim.fleet import FleetSpec, build_devices
from lepton.sim.profiles import PROFILES


def test_profiles_advertise_torch_when_it_is_installed() -> None:
    has_torch = importlib.util.find_spec("torch") is not None
    for profile in PROFILES.values():
        assert ("torch" in profile.runtimes) == has_torch


def test_adversarial_devices_are_chosen_by_seed(tmp_path: Path) -> None:
    spec = FleetSpec(devices=6, state_root=tmp_path, adversarial=2, seed=3, data="digits")
    devices = build_devices(spec)
    bad = [d.config.device.id for d in devices if d.update_transform is not None]
    assert len(bad) == 2
    again = build_devices(FleetSpec(devices=6, state_root=tmp_path / "b", adversarial=2, seed=3))
    assert [d.config.device.id for d in again if d.update_transform is not None] == bad
    assert all(d.train_threads == 1 for d in devices)
    with pytest.raises(ValueError, match="adversarial"):
        build_devices(FleetSpec(devices=2, state_root=tmp_path / "c", adversarial=3))


def test_sign_flip_scales_floats_only() -> None:
    delta: dict[str, Any] = {"w": np.ones(3, dtype=np.float32), "n": np.array(2, dtype=np.int64)}
    out = sign_flip(10.0)(delta)
    np.testing.assert_array_equal(out["w"], -10.0 * np.ones(3))
    assert out["w"].dtype == np.float32
    assert out["n"] == 2
    with pytest.raises(ValueError, match="unknown attack"):
        make("gaussian", 1.0)
