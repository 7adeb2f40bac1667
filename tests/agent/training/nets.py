"""Model factories the training tests name by import path, as a job would."""

from __future__ import annotations

import torch
from torch import nn


def digits_mlp() -> nn.Module:
    """64 -> 256 -> 10 on flattened 8x8 digits: fan-ins of 64 and 256 (per-channel INT8)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))


def with_batchnorm() -> nn.Module:
    """Has integer and float buffers besides parameters."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)
    )


def not_a_module() -> object:
    return object()


class _NanNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * float("nan")


def nan_net() -> nn.Module:
    """Its outputs are NaN: training it must fail as diverged, not upload garbage."""
    return _NanNet()
