"""A digits CNN trained once per test session (a few seconds on one CPU thread)."""

from __future__ import annotations

import pytest

from lepton.models.data import DigitsSplits, digits_splits
from lepton.models.train_digits import TrainResult, train_digits


@pytest.fixture(scope="session")
def splits() -> DigitsSplits:
    return digits_splits()


@pytest.fixture(scope="session")
def trained(splits: DigitsSplits) -> TrainResult:
    return train_digits(splits)
