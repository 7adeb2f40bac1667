"""Train the digits CNN and build the shipped artifacts in ``lepton/models/artifacts``.

    python scripts/build_artifacts.py [--out lepton/models/artifacts] [--epochs 30] [--seed 0]

Trains as ``python -m lepton.models.train_digits`` does (``digits_cnn.pt``), then runs the
coordinator's quantization pipeline (``lepton.coordinator.model_registry.quantize.quantize_model``
with the default ``QuantizationConfig``) and writes ``digits_fp32.onnx``, ``digits_int8.onnx``,
``digits_test.npz`` and ``digits_quantization.json`` (the pipeline's report). Needs the ``train``
and ``coordinator`` extras. It lives here, not in ``models/``, because ``models`` depends on nothing
above it. ``scripts/build_tflite.py`` then makes the TFLite pair.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lepton.coordinator.model_registry.quantize import QuantizationConfig, quantize_model  # noqa: E402
from lepton.models.data import DigitsSplits, save_npz  # noqa: E402
from lepton.models.train_digits import TrainResult, parser, train_and_save  # noqa: E402


def build_artifacts(result: TrainResult, splits: DigitsSplits, out: Path) -> dict[str, object]:
    """Export, quantize (accuracy-gated) and write the shipped digits artifacts into ``out``."""
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
    args = parser(
        "scripts/build_artifacts.py", __doc__ or "", out=REPO / "lepton" / "models" / "artifacts"
    ).parse_args(argv)
    result, splits = train_and_save(args)
    print(json.dumps(build_artifacts(result, splits, args.out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
