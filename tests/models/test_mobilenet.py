from __future__ import annotations

import torch

from lepton.models.mobilenet import build_mobilenet_v2


def test_mobilenet_v2_shape_and_size() -> None:
    model = build_mobilenet_v2(settle_batches=1)
    assert sum(p.numel() for p in model.parameters()) == 3_504_872  # as in the paper
    with torch.no_grad():
        out = model(torch.rand(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()
    assert not model.training
