"""Data source plugins used by the tests (``tests.agent.inference.plugin_data:pairs``)."""

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
