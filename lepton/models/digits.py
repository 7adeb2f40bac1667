"""A small CNN for sklearn's 8x8 digits: about 7k parameters, ~98 % test accuracy.

Input: float32 ``[N, 1, 8, 8]`` scaled to ``[0, 1]``; output: ``[N, 10]`` logits. The layers
are plain Conv/ReLU/MaxPool/Linear (no batch norm), so the same weights can be re-expressed
in other frameworks (``scripts/build_tflite.py`` does so for Keras) without folding anything.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INPUT_SHAPE = (1, 8, 8)
N_CLASSES = 10


class DigitsCNN(nn.Module):
    """conv(8) -> conv(16) -> pool -> conv(32) -> pool -> linear(10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
        )
        self.classifier = nn.Linear(32 * 2 * 2, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(torch.flatten(self.features(x), 1))
        return out


def build_digits_cnn(seed: int = 0) -> DigitsCNN:
    """A freshly initialised :class:`DigitsCNN`; the same seed gives the same weights."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return DigitsCNN()
    finally:
        torch.random.set_rng_state(gen_state)
