"""Shared fixtures of the scheduler tests."""

from __future__ import annotations

import pytest

from lepton.coordinator.scheduler import CostModel, CostWeights, ThroughputEstimator


@pytest.fixture
def model() -> CostModel:
    return CostModel(CostWeights(), ThroughputEstimator())
