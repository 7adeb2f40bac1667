"""The probe's measuring side: what this device can run, and how fast.

Run in a short-lived subprocess (``python -m lepton.agent.telemetry.measure``), never in the
daemon: it imports the heavy runtimes (ONNX Runtime, numpy), times two tiny matrix-multiply
models shipped in ``lepton/agent/assets`` for about a second and prints one JSON object. A
runtime that crashes on import takes down this process, not the agent.
:mod:`lepton.agent.telemetry.probe` starts it, validates and caches its answer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Final

import msgspec

from lepton.agent.telemetry.board import device_accelerators
from lepton.protocol.messages import Bench

#: Bump when the probe's output changes meaning, so old cache files are ignored.
PROBE_VERSION: Final = 1
#: Total time the timed loops may take, split between the FP32 and INT8 models.
DEFAULT_BUDGET_S: Final = 1.2

FP32_MODEL: Final = "probe_fp32_matmul.onnx"
INT8_MODEL: Final = "probe_int8_matmulinteger.onnx"
# Shapes of the shipped models (scripts/make_probe_models.py): (M, K) @ (K, N).
M, K, N = 256, 512, 512
OPS_PER_RUN: Final = 2 * M * K * N  # one multiply and one add per MAC

#: ONNX Runtime execution providers as short accelerator labels. Providers missing here get
#: their name lower-cased without the ``ExecutionProvider`` suffix.
_PROVIDER_LABELS: Final[dict[str, str | None]] = {
    "CPUExecutionProvider": "cpu",
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "tensorrt",
    "NvTensorRTRTXExecutionProvider": "tensorrt-rtx",
    "ROCMExecutionProvider": "rocm",
    "MIGraphXExecutionProvider": "migraphx",
    "OpenVINOExecutionProvider": "openvino",
    "DmlExecutionProvider": "directml",
    "CoreMLExecutionProvider": "coreml",
    "NnapiExecutionProvider": "nnapi",
    "QNNExecutionProvider": "qnn",
    "XnnpackExecutionProvider": "xnnpack",
    "ArmNNExecutionProvider": "armnn",
    "ACLExecutionProvider": "acl",
    "RknpuExecutionProvider": "rknpu",
    "VitisAIExecutionProvider": "vitisai",
    "WebGpuExecutionProvider": "webgpu",
    # Remote inference endpoints, not hardware on this device.
    "AzureExecutionProvider": None,
}


#: (label, import name, distribution name) of runtimes looked up without importing them.
_RUNTIME_MODULES: Final = (
    ("onnxruntime", "onnxruntime", "onnxruntime"),
    ("tflite", "ai_edge_litert", "ai-edge-litert"),
    ("tflite", "tflite_runtime", "tflite-runtime"),
    ("torch", "torch", "torch"),
)

# ---------------------------------------------------------------- runtimes


def available_runtimes() -> dict[str, str]:
    """Runtime label -> module name for the runtimes installed here, found without importing them.

    The probe subprocess confirms ONNX Runtime by importing it; the others are only located, so
    a module that is present but broken is reported until a task that uses it fails.
    """
    found: dict[str, str] = {}
    for label, module, _dist in _RUNTIME_MODULES:
        if label in found:
            continue
        try:
            spec = find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            found[label] = module
    return found


def dist_version(name: str) -> str | None:
    from importlib import metadata  # deferred: pulls in the email package (~1 MB resident)

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def provider_label(provider: str) -> str | None:
    """Short accelerator label for an ONNX Runtime execution provider name (None: not hardware)."""
    if provider in _PROVIDER_LABELS:
        return _PROVIDER_LABELS[provider]
    return provider.removesuffix("ExecutionProvider").lower() or None


# ---------------------------------------------------------------- measuring


def _time_loop(run: Callable[[], object], budget_s: float, max_iters: int = 500) -> dict[str, Any]:
    """Time ``run`` after one warm-up call for about ``budget_s``; median seconds per call."""
    start = time.perf_counter()
    run()  # warm-up: first-call allocations and weight packing are not throughput
    warmup = time.perf_counter() - start
    # A device so slow that one call eats a third of the budget gets a single timed call.
    min_iters = 1 if warmup > budget_s / 3 else 3
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_iters or (time.perf_counter() < deadline and len(times) < max_iters):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "iterations": len(times),
        "warmup_ms": round(warmup * 1e3, 3),
        "median_ms": round(median * 1e3, 3),
        "best_ms": round(min(times) * 1e3, 3),
        "rate_g": OPS_PER_RUN / median / 1e9,
    }


def _bench_onnxruntime(budget_s: float, details: dict[str, Any]) -> Bench:
    from importlib import resources

    import numpy as np
    import onnxruntime as ort

    version = str(ort.__version__)
    providers = [str(p) for p in ort.get_available_providers()]
    details["onnxruntime"] = {"version": version, "providers": providers}
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: warnings would clutter the agent's journal
    assets = resources.files("lepton.agent.assets")
    rng = np.random.default_rng(0)
    # The probe measures the CPU path the agent falls back to everywhere; accelerator
    # providers are reported as labels, their speed is measured by benchmark tasks.
    session = ort.InferenceSession(
        assets.joinpath(FP32_MODEL).read_bytes(), options, providers=["CPUExecutionProvider"]
    )
    a32 = rng.standard_normal((M, K), dtype=np.float32)
    fp32 = _time_loop(lambda: session.run(None, {"A": a32}), budget_s / 2)
    details["fp32"] = fp32
    int8_gops: float | None = None
    try:
        session8 = ort.InferenceSession(
            assets.joinpath(INT8_MODEL).read_bytes(), options, providers=["CPUExecutionProvider"]
        )
        a8 = rng.integers(0, 256, size=(M, K), dtype=np.uint8)
        int8 = _time_loop(lambda: session8.run(None, {"A": a8}), budget_s / 2)
        details["int8"] = int8
        int8_gops = round(int8["rate_g"], 3)
    except Exception as exc:  # any runtime failure only loses the INT8 figure
        details.setdefault("errors", []).append(f"int8: {type(exc).__name__}: {exc}")
    return Bench(
        fp32_gflops=round(fp32["rate_g"], 3),
        int8_gops=int8_gops,
        runtime=f"onnxruntime {version}",
        measured_at=time.time(),
    )


def _bench_numpy(budget_s: float, details: dict[str, Any]) -> Bench:
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    fp32 = _time_loop(lambda: a @ b, budget_s)
    details["fp32"] = fp32
    return Bench(
        fp32_gflops=round(fp32["rate_g"], 3),
        int8_gops=None,
        runtime=f"numpy {np.__version__}",
        measured_at=time.time(),
    )


def run_probe(budget_s: float = DEFAULT_BUDGET_S, root: Path = Path("/")) -> dict[str, Any]:
    """Run the whole probe in this process and return the JSON-ready answer.

    Meant for the subprocess; it imports onnxruntime and numpy. Failures of single parts are
    recorded under ``details["errors"]`` and never raised.
    """
    started = time.perf_counter()
    details: dict[str, Any] = {
        "probe_version": PROBE_VERSION,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    errors: list[str] = []
    details["errors"] = errors
    runtimes = available_runtimes()
    accelerators = {"cpu"}  # every device has one; runtimes and device nodes add the rest
    bench: Bench | None = None
    if "onnxruntime" in runtimes:
        try:
            bench = _bench_onnxruntime(budget_s, details)
        except Exception as exc:  # a broken runtime is a finding, not a crash
            errors.append(f"onnxruntime: {type(exc).__name__}: {exc}")
            runtimes.pop("onnxruntime")
        else:
            for provider in details["onnxruntime"]["providers"]:
                label = provider_label(provider)
                if label is not None:
                    accelerators.add(label)
    else:
        errors.append("onnxruntime: not installed")
    if bench is None:
        try:
            bench = _bench_numpy(budget_s, details)
        except Exception as exc:  # no figure at all; recorded, not raised
            errors.append(f"numpy: {type(exc).__name__}: {exc}")
    for label, module, dist in _RUNTIME_MODULES:
        if runtimes.get(label) == module and label != "onnxruntime":
            details[label] = {"module": module, "version": dist_version(dist)}
    device, device_details = device_accelerators(root)
    accelerators.update(device)
    details["devices"] = device_details
    details["wall_s"] = round(time.perf_counter() - started, 3)
    return {
        "bench": msgspec.to_builtins(bench) if bench is not None else None,
        "runtimes": sorted(runtimes),
        "accelerators": sorted(accelerators),
        "details": details,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m lepton.agent.telemetry.measure``: print the probe's JSON object on one line."""
    parser = argparse.ArgumentParser(
        prog="python -m lepton.agent.telemetry.measure",
        description="Measure this device (FP32/INT8 throughput, runtimes, accelerators); "
        "print one JSON object.",
    )
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds to time")
    args = parser.parse_args(argv)
    if not 0.0 < args.budget <= 60.0:
        parser.error("--budget must be in (0, 60]")
    result = run_probe(args.budget)
    sys.stdout.write(json.dumps(result, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
