"""Measure an ONNX model with ONNX Runtime on this host: accuracy and latency.

Pure measurement helpers shared by the quantization pipeline and ``bench/bench_int8.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

Metric = Callable[[npt.NDArray[Any], npt.NDArray[Any]], float]


def top1_accuracy(logits: npt.NDArray[Any], labels: npt.NDArray[Any]) -> float:
    """Fraction of rows whose arg-max equals the label."""
    if len(labels) == 0:
        raise ValueError("cannot measure accuracy on an empty set")
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


def make_session(
    path: str | Path,
    *,
    threads: int = 0,
    optimization: str = "all",
    allow_spinning: bool = True,
) -> Any:
    """An ONNX Runtime CPU session; ``threads`` 0 lets ORT use every core.

    ``optimization`` is one of ``disable``, ``basic``, ``extended``, ``all``.
    ``allow_spinning`` false makes the intra-op workers sleep as soon as a run ends (ORT's
    default spins them for the next run, which takes the cores from any other session).
    """
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[optimization]
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def predict(session: Any, x: npt.NDArray[Any], *, batch_size: int = 256) -> npt.NDArray[Any]:
    """Run a single-input, single-output session over ``x`` in batches; outputs concatenated."""
    name = session.get_inputs()[0].name
    outs = [
        session.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs, axis=0)


def evaluate(
    path: str | Path,
    x: npt.NDArray[Any],
    y: npt.NDArray[Any],
    *,
    metric: Metric = top1_accuracy,
    batch_size: int = 256,
    optimization: str = "all",
) -> float:
    """``metric(outputs, y)`` of the model at ``path`` over the evaluation set ``(x, y)``."""
    session = make_session(path, optimization=optimization)
    return metric(predict(session, x, batch_size=batch_size), y)


@dataclass(frozen=True, slots=True)
class Latency:
    """Wall-clock latency of one ``session.run`` in milliseconds over ``runs`` timed runs."""

    p50_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    threads: int
    batch: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_latency(
    path: str | Path,
    sample: npt.NDArray[Any],
    *,
    threads: int = 1,
    runs: int = 50,
    warmup: int = 5,
    optimization: str = "all",
) -> Latency:
    """Time ``runs`` runs of ``sample`` (after ``warmup`` untimed ones) on one session."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    session = make_session(path, threads=threads, optimization=optimization)
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(sample)}
    for _ in range(warmup):
        session.run(None, feed)
    times: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        session.run(None, feed)
        times.append((time.perf_counter_ns() - t0) / 1e6)
    times.sort()
    return Latency(
        p50_ms=statistics.median(times),
        p90_ms=times[min(len(times) - 1, int(0.9 * len(times)))],
        mean_ms=statistics.fmean(times),
        runs=runs,
        threads=threads,
        batch=int(sample.shape[0]),
    )
