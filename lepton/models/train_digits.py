"""Train the digits CNN on CPU (a few seconds) and report its test accuracy.

    python -m lepton.models.train_digits --out DIR

writes ``DIR/digits_cnn.pt`` (the state dict) and prints the test accuracy. Needs the
``train`` extra (torch and scikit-learn). The shipped artifacts are built from it by
``scripts/build_artifacts.py``, which also needs the coordinator's quantization pipeline
(``models`` depends on nothing above it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lepton.models.data import DigitsSplits, Split, digits_splits
from lepton.models.digits import DigitsCNN, build_digits_cnn

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrainResult:
    """A trained model (in eval mode) and its accuracy (fraction) on the test split."""

    model: DigitsCNN
    test_accuracy: float
    epochs: int


def accuracy(model: nn.Module, split: Split) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` on ``split``."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(split.x))
    return float((logits.argmax(dim=1).numpy() == split.y).mean())


def train_digits(
    splits: DigitsSplits | None = None,
    *,
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 5e-3,
    seed: int = 0,
) -> TrainResult:
    """Train :class:`DigitsCNN` with Adam on the train split; deterministic for a given seed.

    Runs on one CPU thread (so the summation order, and the weights, do not depend on the
    machine's core count) and takes a few seconds.
    """
    splits = splits or digits_splits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_digits_cnn(seed)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        x = torch.from_numpy(splits.train.x)
        y = torch.from_numpy(splits.train.y)
        loss_fn = nn.CrossEntropyLoss()
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(y), generator=gen)
            for start in range(0, len(y), batch_size):
                idx = order[start : start + batch_size]
                opt.zero_grad()
                loss = loss_fn(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
            sched.step()
        model.eval()
        return TrainResult(model, accuracy(model, splits.test), epochs)
    finally:
        torch.set_num_threads(threads)


def parser(prog: str, description: str, out: Path | None = None) -> argparse.ArgumentParser:
    """The training command line (``--out`` required unless it has a default)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--out", type=Path, required=out is None, default=out, help="output directory")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    return p


def train_and_save(args: argparse.Namespace) -> tuple[TrainResult, DigitsSplits]:
    """Train on the digits splits as ``args`` say; write ``digits_cnn.pt`` into ``args.out``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    splits = digits_splits()
    result = train_digits(splits, epochs=args.epochs, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(result.model.state_dict(), args.out / "digits_cnn.pt")
    print(
        f"test accuracy: {result.test_accuracy * 100:.2f} % "
        f"({len(splits.test)} samples, {result.epochs} epochs)"
    )
    return result, splits


def main(argv: list[str] | None = None) -> int:
    train_and_save(parser("python -m lepton.models.train_digits", __doc__ or "").parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
