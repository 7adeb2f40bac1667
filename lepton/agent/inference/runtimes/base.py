"""The runtime interface: load a model file, describe its tensors, run it on numpy arrays.

A :class:`Runtime` wraps one loaded model of one format. Callers always pass and receive
arrays in the dtypes of :attr:`Runtime.inputs` / :attr:`Runtime.outputs`; a runtime whose
model stores quantized tensors (TFLite INT8 I/O) converts at its own boundary, so the spec it
reports is the float view. ``run`` may be called from several threads at once: a runtime that
is not thread-safe serializes internally.

Heavy imports (onnxruntime, LiteRT, numpy) happen in :meth:`Runtime.load`, never at import.
"""

from __future__ import annotations

import abc
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from lepton.common.errors import LeptonError

if TYPE_CHECKING:
    import numpy.typing as npt

    Array = npt.NDArray[Any]
else:
    Array = Any

ModelFormat = Literal["onnx", "tflite"]
FORMATS: Final[tuple[ModelFormat, ...]] = ("onnx", "tflite")


class RuntimeUnavailableError(LeptonError):
    """The runtime a model format needs is not installed on this device."""

    def __init__(self, fmt: str, detail: str) -> None:
        self.format = fmt
        super().__init__(detail)


class ModelLoadError(LeptonError):
    """A model file could not be loaded (corrupt, truncated, unsupported operators)."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output: ``shape`` has None for a dimension the model leaves free."""

    name: str
    dtype: str  # a numpy dtype name: "float32", "int64", ...
    shape: tuple[int | None, ...]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def mismatch(self, shape: tuple[int, ...]) -> str | None:
        """Why an array of ``shape`` does not fit this input, or None when it does."""
        if len(shape) != len(self.shape):
            return (
                f"input {self.name!r}: expected rank {len(self.shape)} "
                f"(shape {_fmt(self.shape)}), got rank {len(shape)} (shape {list(shape)})"
            )
        for axis, (want, got) in enumerate(zip(self.shape, shape, strict=True)):
            if want is not None and want != got:
                return (
                    f"input {self.name!r}: dimension {axis} must be {want}, got {got} "
                    f"(expected shape {_fmt(self.shape)}, got {list(shape)})"
                )
        return None


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def default_threads() -> int:
    """Cores this process may use (cgroup/affinity aware where the OS says so)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


class Runtime(abc.ABC):
    """One loaded model. Create with :func:`runtime_for`, then :meth:`load`."""

    #: The model format this runtime reads.
    format: ModelFormat

    @abc.abstractmethod
    def load(self, path: Path, *, threads: int | None = None) -> None:
        """Load ``path`` with ``threads`` intra-op threads (None: the device's core count).

        Raises :class:`ModelLoadError` for a file the runtime cannot use.
        """

    @property
    @abc.abstractmethod
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    @abc.abstractmethod
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    @abc.abstractmethod
    def threads(self) -> int:
        """Intra-op threads the loaded model runs with."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Runtime name and version, e.g. ``onnxruntime 1.32.0``."""

    @property
    def providers(self) -> tuple[str, ...]:
        """Execution providers / delegates in use, best first."""
        return ("cpu",)

    @abc.abstractmethod
    def run(self, inputs: dict[str, Array]) -> dict[str, Array]:
        """Run once; ``inputs`` maps every input name to an array of its dtype."""

    def single(self, input_name: str, output_name: str) -> Callable[[Array], Array]:
        """A callable running one input to one output, for tight loops over batches.

        Runtimes override it to skip building dictionaries on every call.
        """

        def call(x: Array) -> Array:
            return self.run({input_name: x})[output_name]

        return call

    def close(self) -> None:  # noqa: B027 - closing is optional for runtimes holding nothing
        """Release the model; the runtime is unusable afterwards."""


def runtime_for(
    fmt: str, *, providers: tuple[str, ...] = (), allow_spinning: bool = False
) -> Runtime:
    """An unloaded runtime for ``fmt``; :class:`RuntimeUnavailableError` when it is not installed.

    ``providers`` restricts ONNX Runtime's execution providers (empty: the best available);
    ``allow_spinning`` lets its intra-op workers spin between runs (ORT's own default).
    """
    if fmt == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            raise RuntimeUnavailableError(
                fmt, "ONNX models need onnxruntime: pip install 'lepton-fleet[agent]'"
            )
        from lepton.agent.inference.runtimes.onnx import OnnxRuntime

        return OnnxRuntime(providers=providers, allow_spinning=allow_spinning)
    if fmt == "tflite":
        from lepton.agent.inference.runtimes.tflite import TFLiteRuntime, interpreter_module

        if interpreter_module() is None:
            raise RuntimeUnavailableError(
                fmt,
                "TFLite models need LiteRT: pip install 'lepton-fleet[tflite]' "
                "(ai-edge-litert), or tflite-runtime",
            )
        return TFLiteRuntime()
    raise RuntimeUnavailableError(fmt, f"unknown model format {fmt!r}; known: {', '.join(FORMATS)}")
