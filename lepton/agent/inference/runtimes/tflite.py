"""TFLite / LiteRT: ``ai_edge_litert`` where installed, else the older ``tflite_runtime``.

INT8 models often keep quantized input and output tensors. Callers never see them: a float
input is quantized with the input tensor's scale and zero point, and quantized outputs are
dequantized, so :attr:`TFLiteRuntime.inputs` and ``outputs`` report ``float32`` for them.
The interpreter is not thread-safe; calls are serialized with a lock.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from lepton.agent.inference.runtimes.base import (
    Array,
    ModelLoadError,
    Runtime,
    TensorSpec,
    default_threads,
)

#: Interpreter modules, preferred first.
MODULES: Final = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")
_DISTRIBUTIONS: Final = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}

InterpreterFactory = Callable[[str, int], Any]


def interpreter_module() -> str | None:
    """The first importable interpreter module, found without importing the runtime."""
    for name in MODULES:
        try:
            if importlib.util.find_spec(name.split(".", 1)[0]) is not None:
                return name
        except (ImportError, ValueError):
            continue
    return None


def _default_factory(path: str, threads: int) -> Any:
    name = interpreter_module()
    if name is None:
        raise ModelLoadError("no TFLite interpreter installed (ai-edge-litert or tflite-runtime)")
    module = importlib.import_module(name)
    return module.Interpreter(model_path=path, num_threads=threads)


@dataclass(frozen=True, slots=True)
class _Binding:
    """How one tensor of the interpreter maps to what callers see."""

    index: int
    spec: TensorSpec
    raw_dtype: Any  # numpy dtype of the interpreter tensor
    scale: float  # 0.0: not quantized
    zero_point: int


def _binding(detail: dict[str, Any]) -> _Binding:
    import numpy as np

    raw = np.dtype(detail["dtype"])
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    shape = tuple(int(d) if int(d) >= 0 else None for d in dims)
    params = detail.get("quantization_parameters") or {}
    scales = params.get("scales")
    if scales is not None and len(scales) > 1:
        raise ModelLoadError(
            f"tensor {detail['name']!r} is quantized per channel; only per-tensor I/O is supported"
        )
    scale, zero_point = detail.get("quantization") or (0.0, 0)
    quantized = raw.kind in "iu" and float(scale) > 0.0
    return _Binding(
        index=int(detail["index"]),
        spec=TensorSpec(
            name=str(detail["name"]),
            dtype="float32" if quantized else raw.name,
            shape=shape,
        ),
        raw_dtype=raw,
        scale=float(scale) if quantized else 0.0,
        zero_point=int(zero_point) if quantized else 0,
    )


def quantize(x: Array, scale: float, zero_point: int, dtype: Any) -> Array:
    """``round(x / scale) + zero_point``, saturated to ``dtype``'s range."""
    import numpy as np

    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, dtype=np.float32) / np.float32(scale)) + zero_point
    out: Array = np.clip(q, info.min, info.max).astype(dtype)
    return out


def dequantize(q: Array, scale: float, zero_point: int) -> Array:
    """``(q - zero_point) * scale`` as float32."""
    import numpy as np

    return ((q.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)


class TFLiteRuntime(Runtime):
    """A TFLite interpreter; ``factory(path, threads)`` builds it (tests pass a double)."""

    format = "tflite"

    def __init__(self, *, factory: InterpreterFactory | None = None) -> None:
        self._factory = factory or _default_factory
        self._interp: Any = None
        self._inputs: tuple[_Binding, ...] = ()
        self._outputs: tuple[_Binding, ...] = ()
        self._shapes: dict[int, tuple[int, ...]] = {}
        self._lock = threading.Lock()
        self._threads = 0
        self._version = ""

    def load(self, path: Path, *, threads: int | None = None) -> None:
        threads = threads or default_threads()
        try:
            interp = self._factory(str(path), threads)
            interp.allocate_tensors()
            inputs = tuple(_binding(d) for d in interp.get_input_details())
            outputs = tuple(_binding(d) for d in interp.get_output_details())
        except ModelLoadError:
            raise
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError for bad files
            raise ModelLoadError(f"LiteRT cannot load {path.name}: {exc}") from exc
        self._interp = interp
        self._inputs = inputs
        self._outputs = outputs
        self._shapes = {
            b.index: tuple(int(d) for d in detail["shape"])
            for b, detail in zip(inputs, interp.get_input_details(), strict=True)
        }
        self._threads = threads
        self._version = _version()

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(b.spec for b in self._inputs)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(b.spec for b in self._outputs)

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def description(self) -> str:
        return f"litert {self._version}".strip()

    def run(self, inputs: dict[str, Array]) -> dict[str, Array]:
        import numpy as np

        with self._lock:
            interp = self._interp
            if interp is None:
                raise RuntimeError("model not loaded")
            values = []
            resized = False
            for b in self._inputs:
                x = inputs[b.spec.name]
                if b.scale:
                    x = quantize(x, b.scale, b.zero_point, b.raw_dtype)
                else:
                    x = np.asarray(x, dtype=b.raw_dtype)
                if tuple(x.shape) != self._shapes[b.index]:
                    interp.resize_tensor_input(b.index, list(x.shape))
                    self._shapes[b.index] = tuple(x.shape)
                    resized = True
                values.append((b.index, x))
            if resized:
                interp.allocate_tensors()
            for index, x in values:
                interp.set_tensor(index, np.ascontiguousarray(x))
            interp.invoke()
            out: dict[str, Array] = {}
            for b in self._outputs:
                y = np.array(interp.get_tensor(b.index))  # a copy: the buffer is reused
                out[b.spec.name] = dequantize(y, b.scale, b.zero_point) if b.scale else y
            return out

    def close(self) -> None:
        with self._lock:
            self._interp = None


def _version() -> str:
    from importlib import metadata

    name = interpreter_module()
    if name is None:
        return ""
    try:
        return metadata.version(_DISTRIBUTIONS[name.split(".", 1)[0]])
    except metadata.PackageNotFoundError:
        return ""
