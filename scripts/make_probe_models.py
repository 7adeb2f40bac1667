"""Write the two tiny ONNX models that ``lepton.agent.telemetry.measure`` times at agent start-up.

Run from the repository root after changing a shape or an operator::

    .venv/bin/python scripts/make_probe_models.py

The ``onnx`` package is only needed here (a developer tool), never on a device. The output is
deterministic, so re-running it without changes leaves the files byte-identical.

Each model computes ``Y = A @ B`` for an input ``A`` of shape (M, K) and a constant ``B`` of shape
(K, N). ``B`` is not stored as a 1 MiB initializer: the graph builds it from ``Range``/``Mod``
nodes, which ONNX Runtime's constant folding turns into an ordinary initializer when the session
is created. The weights are then pre-packed exactly as those of a real model would be, while each
file stays under 1 KiB. ``B`` holds a short repeating pattern of small non-zero values, so no
optimisation can treat it as zeros.

* ``probe_fp32_matmul.onnx``: ``MatMul``, float32 in and out.
* ``probe_int8_matmulinteger.onnx``: ``MatMulInteger`` with uint8 activations and int8 weights
  (the kernel ONNX Runtime runs for dynamically quantized INT8 models), int32 out.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

M, K, N = 256, 512, 512
PERIOD = 7
# IR version 8 / opset 13 load in every onnxruntime release the agent supports (>= 1.17).
IR_VERSION = 8
OPSET = 13
ASSETS = Path(__file__).resolve().parent.parent / "lepton" / "agent" / "assets"


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], name=name, value=numpy_helper.from_array(value, name)
    )


def _weights_nodes(out: str, scale: float, dtype: int) -> list[onnx.NodeProto]:
    """Nodes computing ``out = reshape(cast((arange(K*N) % PERIOD) - PERIOD//2) * scale)``."""
    return [
        _const("w_start", np.array(0, dtype=np.int32)),
        _const("w_limit", np.array(K * N, dtype=np.int32)),
        _const("w_delta", np.array(1, dtype=np.int32)),
        _const("w_period", np.array(PERIOD, dtype=np.int32)),
        _const("w_offset", np.array(PERIOD // 2, dtype=np.int32)),
        _const("w_shape", np.array([K, N], dtype=np.int64)),
        helper.make_node("Range", ["w_start", "w_limit", "w_delta"], ["w_range"], name="w_range"),
        helper.make_node("Mod", ["w_range", "w_period"], ["w_mod"], name="w_mod"),
        helper.make_node("Sub", ["w_mod", "w_offset"], ["w_centered"], name="w_centered"),
        helper.make_node("Cast", ["w_centered"], ["w_cast"], name="w_cast", to=dtype),
        *(
            [
                _const("w_scale", np.array(scale, dtype=np.float32)),
                helper.make_node("Mul", ["w_cast", "w_scale"], ["w_scaled"], name="w_scaled"),
            ]
            if dtype == TensorProto.FLOAT
            else [helper.make_node("Identity", ["w_cast"], ["w_scaled"], name="w_scaled")]
        ),
        helper.make_node("Reshape", ["w_scaled", "w_shape"], [out], name="w_reshape"),
    ]


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        producer_name="lepton-probe",
        producer_version="1",
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def fp32_model() -> onnx.ModelProto:
    nodes = [
        *_weights_nodes("B", 0.125, TensorProto.FLOAT),
        helper.make_node("MatMul", ["A", "B"], ["Y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "probe_fp32_matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [M, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [M, N])],
    )
    return _model(graph)


def int8_model() -> onnx.ModelProto:
    nodes = [
        *_weights_nodes("B", 1.0, TensorProto.INT8),
        _const("a_zero_point", np.array(128, dtype=np.uint8)),
        _const("b_zero_point", np.array(0, dtype=np.int8)),
        helper.make_node(
            "MatMulInteger", ["A", "B", "a_zero_point", "b_zero_point"], ["Y"], name="matmul"
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "probe_int8_matmulinteger",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [M, K])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [M, N])],
    )
    return _model(graph)


def main() -> int:
    ASSETS.mkdir(parents=True, exist_ok=True)
    for name, model in (
        ("probe_fp32_matmul.onnx", fp32_model()),
        ("probe_int8_matmulinteger.onnx", int8_model()),
    ):
        path = ASSETS / name
        path.write_bytes(model.SerializeToString(deterministic=True))
        sys.stdout.write(f"wrote {path} ({path.stat().st_size} bytes)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
