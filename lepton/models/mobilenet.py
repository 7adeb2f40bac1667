"""A MobileNetV2-shaped network (Sandler et al. 2018) for speed measurement at 224x224x3.

Randomly initialised: it exists to time FP32 against INT8 on a realistic mix of pointwise,
depthwise and strided convolutions (about 3.5 M parameters, 0.6 GFLOPs), not to classify.
:func:`build_mobilenet_v2` re-estimates the batch-norm statistics on random images so
activations have the spread of a trained network, which keeps calibration meaningful.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (3, 224, 224)
# (expansion t, output channels c, repeats n, first stride s), as in the paper's table 2.
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _divisible(v: float, divisor: int = 8) -> int:
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


def _conv_bn(
    cin: int, cout: int, kernel: int, stride: int, *, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear project, with a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1, 1))
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, cout, 1, 1, act=False),
        ]
        self.block = nn.Sequential(*layers)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.block(x)
        return x + out if self.skip else out


class MobileNetV2(nn.Module):
    """Input float32 ``[N, 3, 224, 224]``, output ``[N, n_classes]`` logits."""

    def __init__(self, n_classes: int = 1000, width: float = 1.0) -> None:
        super().__init__()
        cin = _divisible(32 * width)
        last = _divisible(1280 * max(1.0, width))
        layers: list[nn.Module] = [_conv_bn(3, cin, 3, 2)]
        for t, c, n, s in SETTINGS:
            cout = _divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn(cin, last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
        out: torch.Tensor = self.classifier(pooled)
        return out


def build_mobilenet_v2(
    seed: int = 0,
    *,
    n_classes: int = 1000,
    width: float = 1.0,
    settle_batches: int = 2,
) -> MobileNetV2:
    """A seeded, randomly initialised :class:`MobileNetV2` in eval mode.

    Batch-norm statistics are averaged over ``settle_batches`` batches of 4 random images
    (0 keeps the identity statistics of a fresh layer).
    """
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = MobileNetV2(n_classes=n_classes, width=width)
        if settle_batches:
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.momentum = None  # cumulative average over the settling batches
            model.train()
            with torch.no_grad():
                for _ in range(settle_batches):
                    model(torch.rand(4, *INPUT_SHAPE))
    finally:
        torch.random.set_rng_state(state)
    return model.eval()
