"""The digits CNN, its training, and the shipped artifacts built from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lepton.models.data import DigitsSplits, load_npz
from lepton.models.digits import INPUT_NAME, OUTPUT_NAME, build_digits_cnn
from lepton.models.train_digits import TrainResult, main

ARTIFACTS = Path(__file__).resolve().parents[2] / "lepton" / "models" / "artifacts"
MIN_ACCURACY = 0.95  # the default recipe reaches about 97.8 % on the 450 test digits


def test_training_reaches_the_stated_accuracy(trained: TrainResult) -> None:
    assert trained.test_accuracy >= MIN_ACCURACY


def test_model_shapes_and_seeded_init() -> None:
    a, b = build_digits_cnn(3), build_digits_cnn(3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert a(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    assert sum(p.numel() for p in a.parameters()) < 10_000


def test_cli_writes_state_dict_and_prints_accuracy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--out", str(tmp_path), "--epochs", "2"]) == 0
    assert (tmp_path / "digits_cnn.pt").stat().st_size > 0
    assert "test accuracy:" in capsys.readouterr().out


def test_shipped_test_set_matches_the_split(splits: DigitsSplits) -> None:
    shipped = load_npz(ARTIFACTS / "digits_test.npz")
    np.testing.assert_array_equal(shipped.x, splits.test.x)
    np.testing.assert_array_equal(shipped.y, splits.test.y)


@pytest.mark.parametrize("name", ["digits_fp32.onnx", "digits_int8.onnx"])
def test_shipped_onnx_models_meet_their_report(name: str) -> None:
    from lepton.coordinator.model_registry.evaluation import evaluate, make_session

    path = ARTIFACTS / name
    assert path.stat().st_size < 64 * 1024
    report = json.loads((ARTIFACTS / "digits_quantization.json").read_text())
    test = load_npz(ARTIFACTS / "digits_test.npz")
    session = make_session(path)
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    assert [o.name for o in session.get_outputs()] == [OUTPUT_NAME]
    key = "accuracy_fp32" if "fp32" in name else "accuracy_int8"
    assert evaluate(path, test.x, test.y) == pytest.approx(report[key], abs=1e-9)
    assert report["drop_points"] <= report["gate_points"]


def test_shipped_tflite_model_is_full_integer_and_accurate() -> None:
    interpreter_mod = pytest.importorskip(
        "ai_edge_litert.interpreter", reason="ai-edge-litert (the tflite extra) is not installed"
    )
    test = load_npz(ARTIFACTS / "digits_test.npz")
    interp = interpreter_mod.Interpreter(model_path=str(ARTIFACTS / "digits_int8.tflite"))
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    assert inp["dtype"] == np.int8
    assert out["dtype"] == np.int8
    scale, zero = inp["quantization"]
    x = np.transpose(test.x, (0, 2, 3, 1))  # NHWC
    q = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
    interp.resize_tensor_input(inp["index"], [len(q), 8, 8, 1])
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], q)
    interp.invoke()
    logits = interp.get_tensor(out["index"])
    assert float(np.mean(logits.argmax(axis=1) == test.y)) >= MIN_ACCURACY
