"""Data source plugins used by the tests (``tests.agent.training.plugin_data:pairs``)."""

from __future__ import annotations

from typing import Any

import numpy as np


def pairs() -> tuple[Any, Any]:
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    return x, np.array([0, 1, 0, 1, 0, 1])


def only_x() -> Any:
    return np.zeros((3, 2), dtype=np.float32)


def broken() -> Any:
    raise RuntimeError("sensor offline")


def mismatched() -> tuple[Any, Any]:
    return np.zeros((3, 2)), np.zeros(2)


NOT_CALLABLE = 3


def torch_dataset() -> Any:
    """A real ``torch.utils.data.TensorDataset``: items are (x tensor, label tensor)."""
    import torch

    x = torch.arange(40, dtype=torch.float32).reshape(10, 1, 2, 2)
    return torch.utils.data.TensorDataset(x, torch.arange(10) % 3)


class _Samples:
    """A map-style dataset without torch: ``len`` and ``[i] -> (x, y)``."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def samples() -> Any:
    return _Samples([(np.full(3, i, dtype=np.float32), i % 2) for i in range(5)])


def ragged_samples() -> Any:
    return _Samples([(np.zeros(3), 0), (np.zeros(4), 1)])


def not_pairs() -> Any:
    return _Samples([np.zeros(3)])


def short_labels() -> tuple[Any, Any]:
    """Six samples, four labels: a load cut to three cannot tell how many pairs there are."""
    return np.zeros((6, 2), dtype=np.float32), np.zeros(4)
