"""The quantization pipeline on the digits model: within the gate it publishes, beyond it
it refuses with the figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lepton.coordinator.model_registry.calibration import SourceReader, load_source
from lepton.coordinator.model_registry.errors import AccuracyGateError, QuantizationError
from lepton.coordinator.model_registry.quantize import (
    CalibrationName,
    QuantizationConfig,
    publish,
    quantize_and_publish,
    quantize_model,
)
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.models.data import DigitsSplits, Split, digits_splits

RUNS = 3  # latency runs: the figure is not checked here


@pytest.fixture(scope="module")
def splits() -> DigitsSplits:
    return digits_splits()


def _eval(test: Split) -> tuple[np.ndarray, np.ndarray]:
    return test.x, test.y


def test_within_gate_publishes_int8_with_parent(
    registry: ModelRegistry,
    digits_fp32: Path,
    digits_test: Split,
    splits: DigitsSplits,
) -> None:
    published = quantize_and_publish(
        registry,
        name="digits",
        source=digits_fp32,
        calibration=splits.calibration.batches(32),
        evaluation=_eval(digits_test),
        config=QuantizationConfig(latency_runs=RUNS),
    )
    report = published.report
    assert report.passed
    assert report.drop_points <= 1.0
    assert report.accuracy_int8 >= 0.95
    assert report.size_int8 < report.size_fp32
    assert report.calibration.samples == 256
    assert report.calibration.batches == 8
    assert report.int8_ops["QuantizeLinear"] > 0
    assert published.fp32.precision == "fp32"
    assert published.int8.precision == "int8"
    assert published.int8.parent_version == published.fp32.version
    assert published.int8.accuracy_int8 == report.accuracy_int8
    assert published.int8.calibration is not None
    assert published.int8.calibration["method"] == "minmax"
    assert published.int8.param_count == published.fp32.param_count == 7178
    assert registry.get("digits", precision="int8") == published.int8


def test_bad_calibration_is_refused_with_the_figures(
    registry: ModelRegistry,
    digits_fp32: Path,
    digits_test: Split,
    splits: DigitsSplits,
    tmp_path: Path,
) -> None:
    # Calibrating on images 100x too dark clips every real activation.
    dark = [b * 0.01 for b in splits.calibration.batches(32)]
    with pytest.raises(AccuracyGateError) as info:
        quantize_model(
            digits_fp32,
            calibration=dark,
            evaluation=_eval(digits_test),
            out_dir=tmp_path,
            stem="digits",
            config=QuantizationConfig(latency_runs=RUNS),
        )
    err = info.value
    assert err.drop_points > 1.0
    assert err.gate_points == 1.0
    assert err.accuracy_fp32 > 0.95 > err.accuracy_int8
    assert "points below FP32" in str(err)
    assert err.report.to_dict()["passed"] is False
    assert registry.list() == []


def test_publish_rechecks_the_gate(
    registry: ModelRegistry,
    digits_fp32: Path,
    digits_test: Split,
    splits: DigitsSplits,
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="gate_points"):
        QuantizationConfig(gate_points=-1.0)
    dim = [b * 0.05 for b in splits.calibration.batches(32)]
    result = quantize_model(
        digits_fp32,
        calibration=dim,
        evaluation=_eval(digits_test),
        out_dir=tmp_path,
        stem="digits",
        config=QuantizationConfig(gate_points=0.1, latency_runs=RUNS),
        enforce_gate=False,
    )
    assert not result.report.passed
    assert result.int8_path.is_file()  # kept for inspection
    with pytest.raises(AccuracyGateError):
        publish(registry, result, name="digits")
    assert registry.list() == []


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibrations_accept_ragged_batches(
    method: CalibrationName,
    digits_fp32: Path,
    digits_test: Split,
    splits: DigitsSplits,
    tmp_path: Path,
) -> None:
    batches = splits.calibration.batches(100)  # 100, 100, 56
    result = quantize_model(
        digits_fp32,
        calibration=lambda: iter(batches),
        evaluation=_eval(digits_test),
        out_dir=tmp_path,
        stem="d",
        config=QuantizationConfig(calibration=method, latency_runs=RUNS),
    )
    assert result.report.calibration.method == method
    assert result.report.calibration.samples == 256
    assert result.report.passed


def test_torch_source_is_exported_with_named_dynamic_io(
    digits_test: Split,
    splits: DigitsSplits,
    tmp_path: Path,
) -> None:
    import onnx
    import torch

    from lepton.models.digits import build_digits_cnn

    model = build_digits_cnn(1)
    result = quantize_model(
        model,
        calibration=splits.calibration.batches(64),
        evaluation=_eval(digits_test),
        out_dir=tmp_path,
        stem="fresh",
        enforce_gate=False,
        config=QuantizationConfig(latency_runs=RUNS),
    )
    proto = onnx.load(str(result.fp32_path))
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert proto.graph.input[0].name == "input"
    assert proto.graph.output[0].name == "logits"
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert not any(n.metadata_props for n in proto.graph.node)
    int8 = onnx.load(str(result.int8_path))
    assert {o.domain for o in int8.opset_import} <= {"", "ai.onnx"}
    from lepton.coordinator.model_registry.evaluation import make_session, predict

    x = digits_test.x[:7]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(predict(make_session(result.fp32_path), x), expected, atol=1e-4)


def test_empty_calibration_and_bad_inputs(
    digits_fp32: Path,
    digits_test: Split,
    tmp_path: Path,
) -> None:
    with pytest.raises(QuantizationError) as info:
        quantize_model(
            digits_fp32,
            calibration=[],
            evaluation=_eval(digits_test),
            out_dir=tmp_path,
            config=QuantizationConfig(latency_runs=RUNS),
        )
    assert info.value.stage in ("calibrate", "quantize")
    with pytest.raises(ValueError, match="evaluation"):
        quantize_model(
            digits_fp32,
            calibration=[],
            evaluation=(digits_test.x, digits_test.y[:3]),
            out_dir=tmp_path,
        )
    with pytest.raises(ValueError, match="calibration"):
        QuantizationConfig(calibration="magic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="opset"):
        QuantizationConfig(opset=13)


def test_data_sources(tmp_path: Path, splits: DigitsSplits) -> None:
    from lepton.models.data import save_npz

    path = save_npz(tmp_path / "calib.npz", splits.calibration.x, splits.calibration.y)
    batches = load_source(str(path), batch_size=100)
    assert [len(b) for b in batches] == [100, 100, 56]  # type: ignore[union-attr]
    plugin = load_source("lepton.models.data:digits_splits")
    assert callable(plugin)
    with pytest.raises(ValueError, match="module:attr"):
        load_source("nothing")
    reader = SourceReader(batches, "input", max_batches=2, single_samples=True)
    feeds = iter(reader.get_next, None)
    assert sum(1 for _ in feeds) == 200
    assert reader.samples == 200
    reader.rewind()
    assert reader.get_next() is not None
