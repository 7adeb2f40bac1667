"""Model runtimes behind one small interface: ONNX Runtime and TFLite/LiteRT."""

from lepton.agent.inference.runtimes.base import (
    FORMATS,
    ModelFormat,
    ModelLoadError,
    Runtime,
    RuntimeUnavailableError,
    TensorSpec,
    default_threads,
    runtime_for,
)

__all__ = [
    "FORMATS",
    "ModelFormat",
    "ModelLoadError",
    "Runtime",
    "RuntimeUnavailableError",
    "TensorSpec",
    "default_threads",
    "runtime_for",
]
