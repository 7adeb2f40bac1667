"""Train the digits CNN on CPU (a few seconds) and report its test accuracy.

    python -m models.train_digits --out DIR

writes ``DIR/digits_cnn.pt`` (the state dict) and prints the test accuracy. With
``--artifacts`` it also runs the coordinator's quantization pipeline and writes the shipped
artifacts: ``digits_fp32.onnx``, ``digits_int8.onnx``, ``digits_test.npz`` and
``digits_quantization.json`` (the pipeline's report). Needs the ``train`` extra (torch and
scikit-learn); ``--artifacts`` needs the ``coordinator`` extra too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.data import DigitsSplits, Split, digits_splits, save_npz
from models.digits import DigitsCNN, build_digits_cnn

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


def build_artifacts(result: TrainResult, splits: DigitsSplits, out: Path) -> dict[str, object]:
    """Export, quantize (accuracy-gated) and write the shipped digits artifacts into ``out``."""
    from coordinator.models.quantize import QuantizationConfig, quantize_model

    save_npz(out / "digits_test.npz", splits.test.x, splits.test.y)
    qr = quantize_model(
        result.model,
        sample_input=splits.test.x[:1],
        calibration=splits.calibration.batches(32),
        evaluation=(splits.test.x, splits.test.y),
        out_dir=out,
        stem="digits",
        config=QuantizationConfig(),
    )
    report = qr.report.to_dict()
    # File names, not this machine's paths: the report ships next to the files.
    report["fp32_path"], report["int8_path"] = qr.fp32_path.name, qr.int8_path.name
    (out / "digits_quantization.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.train_digits", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--artifacts",
        action="store_true",
        help="also export and quantize (FP32/INT8 ONNX, test set, quantization report)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    splits = digits_splits()
    result = train_digits(splits, epochs=args.epochs, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(result.model.state_dict(), args.out / "digits_cnn.pt")
    print(
        f"test accuracy: {result.test_accuracy * 100:.2f} % "
        f"({len(splits.test)} samples, {result.epochs} epochs)"
    )
    if args.artifacts:
        report = build_artifacts(result, splits, args.out)
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
