"""Tiny TFLite models built in tests with the flatbuffer schema LiteRT ships (no TensorFlow).

One FULLY_CONNECTED layer, ``y = x @ w.T + b``, either all float32 or with INT8 input, weights
and output (per-tensor scales, INT32 bias), the layout the INT8 quantizer produces.
"""

from __future__ import annotations

import flatbuffers
import numpy as np
import numpy.typing as npt
from ai_edge_litert import schema_py_generated as schema


def _quant(scale: float, zero_point: int) -> schema.QuantizationParametersT:
    q = schema.QuantizationParametersT()
    q.scale = [float(scale)]
    q.zeroPoint = [int(zero_point)]
    return q


def _tensor(
    name: str,
    shape: list[int],
    ttype: int,
    buffer: int,
    quant: schema.QuantizationParametersT | None,
) -> schema.TensorT:
    t = schema.TensorT()
    t.name = name.encode()
    t.shape = list(shape)
    t.shapeSignature = [-1, *shape[1:]] if name in ("x", "y") else list(shape)
    t.type = ttype
    t.buffer = buffer
    if quant is not None:
        t.quantization = quant
    return t


def _buffer(data: bytes | None) -> schema.BufferT:
    b = schema.BufferT()
    if data is not None:
        b.data = list(data)
    return b


def linear_tflite(
    w: npt.NDArray[np.float32],
    b: npt.NDArray[np.float32],
    *,
    int8: bool = False,
    x_range: tuple[float, float] = (-1.0, 1.0),
) -> tuple[bytes, dict[str, float]]:
    """A model computing ``x @ w.T + b`` for ``w`` of shape (out, in); returns bytes and scales."""
    out_n, in_n = w.shape
    scales: dict[str, float] = {}
    if int8:
        lo, hi = x_range
        s_in = (hi - lo) / 255.0
        zp_in = round(-128 - lo / s_in)
        s_w = float(np.abs(w).max()) / 127.0
        wq = np.clip(np.round(w / s_w), -127, 127).astype(np.int8)
        s_b = s_in * s_w
        bq = np.round(b / s_b).astype(np.int32)
        # Output range from the extreme inputs.
        corners = np.abs(w).sum(axis=1) * max(abs(lo), abs(hi)) + np.abs(b)
        o_hi = float(corners.max())
        s_out = 2 * o_hi / 255.0
        zp_out = 0
        scales = {"in": s_in, "zp_in": zp_in, "w": s_w, "out": s_out, "zp_out": zp_out}
        tensors = [
            _tensor("x", [1, in_n], schema.TensorType.INT8, 1, _quant(s_in, zp_in)),
            _tensor("w", [out_n, in_n], schema.TensorType.INT8, 2, _quant(s_w, 0)),
            _tensor("b", [out_n], schema.TensorType.INT32, 3, _quant(s_b, 0)),
            _tensor("y", [1, out_n], schema.TensorType.INT8, 4, _quant(s_out, zp_out)),
        ]
        buffers = [
            _buffer(None),
            _buffer(None),
            _buffer(wq.tobytes()),
            _buffer(bq.tobytes()),
            _buffer(None),
        ]
        version = 4
    else:
        tensors = [
            _tensor("x", [1, in_n], schema.TensorType.FLOAT32, 1, None),
            _tensor("w", [out_n, in_n], schema.TensorType.FLOAT32, 2, None),
            _tensor("b", [out_n], schema.TensorType.FLOAT32, 3, None),
            _tensor("y", [1, out_n], schema.TensorType.FLOAT32, 4, None),
        ]
        buffers = [
            _buffer(None),
            _buffer(None),
            _buffer(w.astype(np.float32).tobytes()),
            _buffer(b.astype(np.float32).tobytes()),
            _buffer(None),
        ]
        version = 1

    options = schema.FullyConnectedOptionsT()
    options.fusedActivationFunction = schema.ActivationFunctionType.NONE
    op = schema.OperatorT()
    op.opcodeIndex = 0
    op.inputs = [0, 1, 2]
    op.outputs = [3]
    op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = options

    graph = schema.SubGraphT()
    graph.tensors = tensors
    graph.inputs = [0]
    graph.outputs = [3]
    graph.operators = [op]
    graph.name = b"main"

    code = schema.OperatorCodeT()
    code.builtinCode = schema.BuiltinOperator.FULLY_CONNECTED
    code.deprecatedBuiltinCode = schema.BuiltinOperator.FULLY_CONNECTED
    code.version = version

    model = schema.ModelT()
    model.version = 3
    model.operatorCodes = [code]
    model.subgraphs = [graph]
    model.buffers = buffers
    model.description = b"lepton test model"

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), scales
