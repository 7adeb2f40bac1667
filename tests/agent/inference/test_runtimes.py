"""Runtimes on tiny models built in the test (ONNX via ``onnx``, TFLite via LiteRT's schema)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lepton.agent.inference.runtimes import (
    ModelLoadError,
    RuntimeUnavailableError,
    TensorSpec,
    runtime_for,
)
from lepton.agent.inference.runtimes.onnx import choose_providers
from lepton.agent.inference.runtimes.tflite import (
    TFLiteRuntime,
    dequantize,
    interpreter_module,
    quantize,
)
from tests.agent.inference.conftest import Linear, artifact

needs_litert = pytest.mark.skipif(
    interpreter_module() is None, reason="no TFLite interpreter (pip install ai-edge-litert)"
)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_onnx_runs_and_describes_the_model(tmp_path: Path, linear: Linear) -> None:
    rt = runtime_for("onnx")
    rt.load(_write(tmp_path, "m.onnx", linear.onnx), threads=2)
    assert rt.inputs == (TensorSpec("x", "float32", (None, 16)),)
    assert rt.outputs == (TensorSpec("logits", "float32", (None, 4)),)
    assert rt.threads == 2
    assert rt.providers[-1] == "CPUExecutionProvider"
    assert rt.description.startswith("onnxruntime ")
    out = rt.run({"x": linear.x[:7]})
    np.testing.assert_allclose(out["logits"], linear.logits(linear.x[:7]), rtol=1e-5, atol=1e-5)
    rt.close()
    with pytest.raises(RuntimeError, match="not loaded"):
        rt.run({"x": linear.x[:1]})


def test_onnx_threads_default_to_the_cores_we_may_use(tmp_path: Path, linear: Linear) -> None:
    from lepton.agent.inference.runtimes import default_threads

    rt = runtime_for("onnx")
    rt.load(_write(tmp_path, "m.onnx", linear.onnx))
    assert rt.threads == default_threads() >= 1


def test_onnx_workers_do_not_spin_unless_asked(tmp_path: Path, linear: Linear) -> None:
    from lepton.agent.inference.runtimes.onnx import ALLOW_SPINNING

    path = _write(tmp_path, "m.onnx", linear.onnx)
    for asked, entry in ((None, "0"), (False, "0"), (True, "1")):
        rt = runtime_for("onnx") if asked is None else runtime_for("onnx", allow_spinning=asked)
        rt.load(path, threads=2)
        assert rt.session.get_session_options().get_session_config_entry(ALLOW_SPINNING) == entry


def test_onnx_idle_model_leaves_the_cores_alone() -> None:
    """After a run, a two-thread session burns no CPU while no request comes.

    With ORT's default (spinning) its worker kept a core busy for 40-50 ms after every run
    on the development machine, which a device's application pays between requests.
    """
    import time

    rt = runtime_for("onnx")
    rt.load(artifact("digits_int8.onnx"), threads=2)
    spec = rt.inputs[0]
    x = np.zeros([d or 1 for d in spec.shape], dtype=spec.dtype)
    for _ in range(20):
        rt.run({spec.name: x})
    time.sleep(0.2)
    rt.run({spec.name: x})
    c0 = time.process_time()
    time.sleep(0.2)
    assert time.process_time() - c0 < 0.010


def test_onnx_int8_model_from_dynamic_quantization(tmp_path: Path, linear: Linear) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = _write(tmp_path, "m.onnx", linear.onnx)
    int8 = tmp_path / "m_int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    rt = runtime_for("onnx")
    rt.load(int8, threads=1)
    out = rt.run({"x": linear.x})["logits"]
    # INT8 weights: close to the float model, and nearly the same decisions.
    assert np.abs(out - linear.logits(linear.x)).max() < 0.2
    assert (out.argmax(axis=1) == linear.y).mean() > 0.95


@pytest.mark.parametrize("data", [b"", b"not a model", b"\x08\x07" * 100])
def test_onnx_corrupt_file_is_a_load_error(tmp_path: Path, data: bytes) -> None:
    rt = runtime_for("onnx")
    with pytest.raises(ModelLoadError, match="cannot load"):
        rt.load(_write(tmp_path, "bad.onnx", data), threads=1)


def test_onnx_truncated_model_is_a_load_error(tmp_path: Path, linear: Linear) -> None:
    rt = runtime_for("onnx")
    with pytest.raises(ModelLoadError):
        rt.load(_write(tmp_path, "cut.onnx", linear.onnx[: len(linear.onnx) // 2]), threads=1)


def test_provider_choice() -> None:
    cpu = "CPUExecutionProvider"
    gpu = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert choose_providers([cpu]) == [cpu]
    assert choose_providers(gpu) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", cpu]
    assert choose_providers(gpu, ["cuda"]) == ["CUDAExecutionProvider", cpu]
    assert choose_providers([cpu], ["cuda", "cpu"]) == [cpu]  # missing ones are skipped


def test_unknown_format_and_missing_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RuntimeUnavailableError, match="unknown model format 'pt'"):
        runtime_for("pt")
    real = importlib.util.find_spec

    def hide(name: str, *args: Any) -> Any:
        if name.split(".", maxsplit=1)[0] in ("onnxruntime", "ai_edge_litert", "tflite_runtime"):
            return None
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", hide)
    with pytest.raises(RuntimeUnavailableError, match="need onnxruntime"):
        runtime_for("onnx")
    with pytest.raises(RuntimeUnavailableError, match="ai-edge-litert"):
        runtime_for("tflite")


def test_tensor_spec_mismatch_names_the_dimension() -> None:
    spec = TensorSpec("x", "float32", (None, 16))
    assert spec.mismatch((3, 16)) is None
    assert "dimension 1 must be 16, got 8" in (spec.mismatch((3, 8)) or "")
    assert "expected rank 2" in (spec.mismatch((16,)) or "")


# ---------------------------------------------------------------- TFLite


def test_quantize_round_trip_saturates() -> None:
    x = np.array([-2.0, -0.5, 0.0, 0.5, 2.0], dtype=np.float32)
    q = quantize(x, 1 / 64, -1, np.int8)
    assert q.dtype == np.int8
    assert q.tolist() == [-128, -33, -1, 31, 127]
    back = dequantize(q, 1 / 64, -1)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back[1:4], x[1:4], atol=1 / 128)


@needs_litert
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8-io"])
def test_tflite_runs_with_float_view_of_quantized_io(tmp_path: Path, int8: bool) -> None:
    from tests.agent.inference.tflite_builder import linear_tflite

    rng = np.random.default_rng(3)
    w = rng.normal(size=(3, 4)).astype(np.float32)
    b = rng.normal(size=3).astype(np.float32)
    data, scales = linear_tflite(w, b, int8=int8)
    rt = runtime_for("tflite")
    rt.load(_write(tmp_path, "m.tflite", data), threads=1)
    assert isinstance(rt, TFLiteRuntime)
    # Quantized tensors are presented as float32 to callers.
    assert rt.inputs == (TensorSpec("x", "float32", (None, 4)),)
    assert rt.outputs == (TensorSpec("y", "float32", (None, 3)),)
    assert rt.description.startswith("litert")
    for n in (1, 6, 2):  # the batch dimension is resized as needed
        x = rng.uniform(-1, 1, size=(n, 4)).astype(np.float32)
        y = rt.run({"x": x})["y"]
        assert y.dtype == np.float32
        assert y.shape == (n, 3)
        tol = 1e-5 if not int8 else 2 * scales["out"] + 4 * scales["in"] * np.abs(w).sum()
        np.testing.assert_allclose(y, x @ w.T + b, atol=tol)


@needs_litert
def test_tflite_corrupt_file_is_a_load_error(tmp_path: Path) -> None:
    rt = runtime_for("tflite")
    with pytest.raises(ModelLoadError):
        rt.load(_write(tmp_path, "bad.tflite", b"TFL3" * 10), threads=1)


class _FakeInterpreter:
    """A TFLite interpreter double with a per-channel quantized input."""

    def __init__(self, path: str, threads: int) -> None:
        self.threads = threads

    def allocate_tensors(self) -> None:
        pass

    def get_input_details(self) -> list[dict[str, Any]]:
        return [
            {
                "name": "x",
                "index": 0,
                "shape": np.array([1, 2]),
                "shape_signature": np.array([-1, 2]),
                "dtype": np.int8,
                "quantization": (0.5, 0),
                "quantization_parameters": {"scales": np.array([0.5, 0.25])},
            }
        ]

    def get_output_details(self) -> list[dict[str, Any]]:
        return []


def test_tflite_per_channel_io_is_refused(tmp_path: Path) -> None:
    rt = TFLiteRuntime(factory=_FakeInterpreter)
    with pytest.raises(ModelLoadError, match="per channel"):
        rt.load(tmp_path / "any.tflite", threads=1)


# ---------------------------------------------------------------- shipped artifacts


def _smoke(path: Path) -> None:
    rt = runtime_for(path.suffix.lstrip("."))
    rt.load(path, threads=1)
    feeds = {s.name: np.zeros([d or 2 for d in s.shape], dtype=s.dtype) for s in rt.inputs}
    out = rt.run(feeds)
    assert set(out) == {s.name for s in rt.outputs}


def test_shipped_onnx_artifact_loads_and_runs() -> None:
    _smoke(artifact("*.onnx"))


@needs_litert
def test_shipped_tflite_artifact_loads_and_runs() -> None:
    _smoke(artifact("*.tflite"))
