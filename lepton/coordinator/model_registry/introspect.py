"""What a model file declares: input/output specs, a parameter count and a FLOPs estimate.

ONNX files are read with the ``onnx`` package (the coordinator's extra); TFLite files with
``ai_edge_litert`` when it is installed. A file that does not parse as its format raises
``ValueError``; a figure that cannot be estimated is ``None``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Dim = int | str | None

# Initializer inputs of these ops at these positions are quantization parameters, not weights.
_QPARAM_INPUTS = {
    "QuantizeLinear": (1, 2),
    "DequantizeLinear": (1, 2),
    "QLinearConv": (1, 2, 4, 5, 6, 7),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7),
}
_WEIGHT_DTYPES = {"float32", "float16", "float64", "bfloat16", "int8", "uint8", "int32"}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output: ``shape`` holds ints, names of symbolic dims, or None."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TensorSpec:
        return cls(name=str(raw["name"]), dtype=str(raw["dtype"]), shape=tuple(raw["shape"]))


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Descriptive figures of a model file (``None`` where the format does not tell)."""

    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    param_count: int | None = None
    flops: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _value_spec(value: Any) -> TensorSpec:
    from onnx import helper

    ttype = value.type.tensor_type
    dtype = helper.tensor_dtype_to_np_dtype(ttype.elem_type).name if ttype.elem_type else "?"
    dims: list[Dim] = []
    for d in ttype.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorSpec(name=value.name, dtype=dtype, shape=tuple(dims))


def _param_count(model: Any) -> int:
    """Elements of weight-like initializers, leaving out scales, zero points and shapes."""
    from onnx import helper

    qparams: set[str] = set()
    for node in model.graph.node:
        for pos in _QPARAM_INPUTS.get(node.op_type, ()):
            if pos < len(node.input):
                qparams.add(node.input[pos])
    total = 0
    for init in model.graph.initializer:
        if init.name in qparams or not init.dims:
            continue
        if helper.tensor_dtype_to_np_dtype(init.data_type).name in _WEIGHT_DTYPES:
            total += math.prod(init.dims)
    return total


def _flops(model: Any) -> int | None:
    """2 x multiply-accumulates of Conv/Gemm/MatMul (and their quantized forms), batch 1."""
    import onnx
    from onnx import shape_inference

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        for d in value.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = 1
    inferred = shape_inference.infer_shapes(fixed)
    shapes: dict[str, list[int]] = {i.name: list(i.dims) for i in inferred.graph.initializer}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [int(d.dim_value) for d in dims]
    macs = 0
    for node in inferred.graph.node:
        op = node.op_type
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            continue
        if op in ("Conv", "ConvInteger", "QLinearConv"):
            w = shapes.get(node.input[3 if op == "QLinearConv" else 1])
            if w is None:
                return None
            macs += math.prod(out) * math.prod(w[1:])
        elif op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
            a = shapes.get(node.input[0])
            if a is None:
                return None
            trans_a = any(att.name == "transA" and att.i for att in node.attribute)
            k = a[0] if (op == "Gemm" and trans_a) else a[-1]
            macs += math.prod(out) * k
    return 2 * macs


def inspect_onnx(path: str | Path) -> ModelInfo:
    """Specs, parameter count and FLOPs estimate (batch 1) of an ONNX file."""
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ValueError(f"{Path(path).name} is not a readable ONNX model: {exc}") from exc
    if not model.graph.node:
        raise ValueError(f"{Path(path).name} is not an ONNX model (no graph)")
    inits = {i.name for i in model.graph.initializer}
    inputs = tuple(_value_spec(v) for v in model.graph.input if v.name not in inits)
    outputs = tuple(_value_spec(v) for v in model.graph.output)
    try:
        flops = _flops(model)
    except Exception:  # an estimate is optional; the file may still be served
        log.warning("FLOPs estimate failed for %s", path, exc_info=True)
        flops = None
    return ModelInfo(inputs=inputs, outputs=outputs, param_count=_param_count(model), flops=flops)


def inspect_tflite(path: str | Path) -> ModelInfo:
    """Input/output specs of a .tflite file (empty when ``ai_edge_litert`` is missing)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return ModelInfo()
    try:
        interp = Interpreter(model_path=str(path))
    except Exception as exc:
        raise ValueError(f"{Path(path).name} is not a readable TFLite model: {exc}") from exc

    def spec(d: dict[str, Any]) -> TensorSpec:
        sig = [int(x) for x in d.get("shape_signature", d["shape"])]
        shape = tuple(None if x < 0 else x for x in sig)
        return TensorSpec(name=str(d["name"]), dtype=d["dtype"].__name__, shape=shape)

    return ModelInfo(
        inputs=tuple(spec(d) for d in interp.get_input_details()),
        outputs=tuple(spec(d) for d in interp.get_output_details()),
    )


def inspect_model(path: str | Path, fmt: str) -> ModelInfo:
    """Dispatch on the registry's format name (``onnx``, ``tflite``; ``torch`` tells nothing)."""
    if fmt == "onnx":
        return inspect_onnx(path)
    if fmt == "tflite":
        return inspect_tflite(path)
    return ModelInfo()
