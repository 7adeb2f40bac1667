"""ONNX Runtime: GPU execution providers first where this build has them, else the CPU."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from lepton.agent.inference.runtimes.base import (
    Array,
    ModelLoadError,
    Runtime,
    TensorSpec,
    default_threads,
)

log = logging.getLogger(__name__)

#: Preference order among the providers a build lists; anything else is left alone unless the
#: configuration names it.
PREFERRED_PROVIDERS: Final = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
_SHORT_NAMES: Final = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
# ONNX element types as ORT names them -> numpy dtype names.
_DTYPES: Final = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def choose_providers(available: Sequence[str], wanted: Sequence[str] = ()) -> list[str]:
    """The providers to ask for, best first.

    ``wanted`` (from the configuration; short names such as ``cuda`` are accepted) restricts
    and orders the choice; empty means TensorRT, then CUDA, then CPU, as far as ``available``
    lists them. The CPU provider is always last, so a GPU provider that fails to initialise
    still leaves a working session.
    """
    if wanted:
        names = [_SHORT_NAMES.get(w.lower(), w) for w in wanted]
        chosen = [n for n in names if n in available]
        missing = [n for n in names if n not in available]
        if missing:
            log.warning("execution providers not available here: %s", ", ".join(missing))
    else:
        chosen = [p for p in PREFERRED_PROVIDERS if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or ()))
    return TensorSpec(name=arg.name, dtype=_DTYPES.get(arg.type, "object"), shape=shape)


#: The session config key (onnxruntime_session_options_config_keys.h) that lets intra-op
#: worker threads spin while waiting for work; ORT's default is "1".
ALLOW_SPINNING: Final = "session.intra_op.allow_spinning"


class OnnxRuntime(Runtime):
    """An ``onnxruntime.InferenceSession`` with all graph optimizations on.

    With ``allow_spinning`` false (the agent's default) the intra-op workers sleep as soon as
    a run ends instead of spinning on their cores for the next one: the device's other work
    keeps those cores between requests. It matters only with more than one thread.
    """

    format = "onnx"

    def __init__(self, *, providers: Sequence[str] = (), allow_spinning: bool = False) -> None:
        self._wanted = tuple(providers)
        self._allow_spinning = allow_spinning
        self._session: Any = None
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()
        self._output_names: list[str] = []
        self._threads = 0
        self._providers: tuple[str, ...] = ()
        self._version = ""

    def load(self, path: Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        threads = threads or default_threads()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only; provider fallbacks are logged by us
        options.add_session_config_entry(ALLOW_SPINNING, "1" if self._allow_spinning else "0")
        providers = choose_providers(ort.get_available_providers(), self._wanted)
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # ORT raises its own untyped errors for bad files
            raise ModelLoadError(f"onnxruntime cannot load {path.name}: {exc}") from exc
        inputs = tuple(_spec(a) for a in session.get_inputs())
        outputs = tuple(_spec(a) for a in session.get_outputs())
        if any(s.dtype == "object" for s in inputs):
            raise ModelLoadError(f"{path.name}: inputs that are not numeric tensors")
        # Non-tensor outputs (sequences, maps) cannot be returned as arrays; skip them.
        tensor_outputs = tuple(s for s in outputs if s.dtype != "object")
        if not tensor_outputs:
            raise ModelLoadError(f"{path.name}: no tensor outputs")
        self._session = session
        self._inputs = inputs
        self._outputs = tensor_outputs
        self._output_names = [s.name for s in tensor_outputs]
        self._threads = threads
        self._providers = tuple(session.get_providers())
        self._version = ort.__version__

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def providers(self) -> tuple[str, ...]:
        return self._providers

    @property
    def description(self) -> str:
        return f"onnxruntime {self._version}"

    @property
    def session(self) -> Any:
        """The underlying ``InferenceSession`` (for benchmarks comparing against it)."""
        return self._session

    def run(self, inputs: dict[str, Array]) -> dict[str, Array]:
        session = self._session
        if session is None:
            raise RuntimeError("model not loaded")
        values = session.run(self._output_names, inputs)
        return dict(zip(self._output_names, values, strict=True))

    def single(self, input_name: str, output_name: str) -> Callable[[Array], Array]:
        session = self._session
        if session is None:
            raise RuntimeError("model not loaded")
        run = session.run
        names = [output_name]

        def call(x: Array) -> Array:
            out: Array = run(names, {input_name: x})[0]
            return out

        return call

    def close(self) -> None:
        self._session = None
