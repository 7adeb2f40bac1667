"""ONNX Runtime's intra-op spinning on and off, in one run: what a benchmark and a device see.

    python -m bench.bench_spinning [--threads N] [--iters 200] [--requests 200] [--gap-ms 20]

ONNX Runtime's intra-op workers spin on their cores for a while after each run, waiting for
the next one (session config ``session.intra_op.allow_spinning``, "1" by default). The
agent's runtime turns that off unless ``inference.allow_spinning`` asks for it. With several
intra-op threads (default: every core this process may use), on the same models:

1. Timing method. A MobileNetV2-shaped network, FP32 and the pipeline's default INT8 (U8S8
   QDQ, 7-bit weights), timed round-robin (one run of each session in turn, as
   ``bench.bench_int8`` does) and one session at a time, each with spinning on and off: the
   p50 latencies and the INT8 speed-up each method reports.
2. The agent's runtime (:mod:`lepton.agent.inference.runtimes.onnx`), spinning off (its default)
against on,
   for the shipped digits INT8 CNN and the MobileNetV2 INT8: back-to-back p50 latency, and
   requests that arrive ``--gap-ms`` after the previous answer (a sensor's pace): p50
   latency and the process's CPU time per request, every thread counted (a spinning
   worker's too).

One-at-a-time timing runs in blocks that alternate between the configurations ``--blocks``
times, each block after a pause long enough for the previous session's workers to stop
spinning, so load from other processes falls on every configuration alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import _common
from lepton.agent.inference.runtimes import Runtime, default_threads, runtime_for

DIGITS = _common.REPO / "lepton" / "models" / "artifacts" / "digits_int8.onnx"
# Longer than a worker spins after a run (under 50 ms on the development machine).
PAUSE_S = 0.3

Call = Callable[[], Any]


def build_mobilenet(tmp: Path, resolution: int, width: float) -> tuple[Path, Path]:
    """FP32 and default-INT8 ONNX files of the MobileNetV2-shaped network (random weights)."""
    from lepton.coordinator.model_registry.export import export_onnx
    from lepton.coordinator.model_registry.quantize import QuantizationConfig, quantize_onnx
    from lepton.models.mobilenet import build_mobilenet_v2

    rng = np.random.default_rng(0)
    fp32, int8 = tmp / "mobilenet_fp32.onnx", tmp / "mobilenet_int8.onnx"
    shape = (1, 3, resolution, resolution)
    export_onnx(build_mobilenet_v2(width=width), fp32, sample=rng.random(shape, np.float32))
    calib = [rng.random((4, *shape[1:]), np.float32) for _ in range(4)]
    quantize_onnx(fp32, int8, calib, QuantizationConfig())
    return fp32, int8


def loaded(path: Path, threads: int, spinning: bool) -> tuple[Runtime, Call]:
    """The agent's ONNX runtime on ``path`` and a call running it on one fixed sample."""
    runtime = runtime_for("onnx", allow_spinning=spinning)
    runtime.load(path, threads=threads)
    spec = runtime.inputs[0]
    x = np.random.default_rng(1).random([d or 1 for d in spec.shape]).astype(spec.dtype)
    call = runtime.single(spec.name, runtime.outputs[0].name)
    return runtime, lambda: call(x)


def round_robin(calls: dict[str, Call], iters: int, warmup: int) -> dict[str, float]:
    """p50 ms of each call, one run of each in turn."""
    time.sleep(PAUSE_S)
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(iters):
        for k, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def one_at_a_time(
    calls: dict[str, Call], iters: int, warmup: int, blocks: int, gap_s: float = 0.0
) -> dict[str, tuple[float, float]]:
    """(p50 ms, process CPU ms per call) of each call, in alternating blocks of its own.

    ``gap_s`` > 0 sleeps that long after each call, as between requests; the CPU time then
    includes whatever the runtime's threads burn while no request is there.
    """
    times: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, float] = dict.fromkeys(calls, 0.0)
    per_block = max(1, iters // blocks)
    for _ in range(blocks):
        for k, call in calls.items():
            time.sleep(PAUSE_S)
            for _ in range(warmup):
                call()
            c0 = time.process_time()
            for _ in range(per_block):
                t0 = time.perf_counter()
                call()
                times[k].append(time.perf_counter() - t0)
                if gap_s:
                    time.sleep(gap_s)
            cpu[k] += time.process_time() - c0
    return {k: (statistics.median(v) * 1e3, cpu[k] / len(v) * 1e3) for k, v in times.items()}


def timing_methods(
    fp32: Path, int8: Path, threads: int, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """p50 ms of FP32 and INT8 under each timing method, spinning on and off."""
    runtimes: list[Runtime] = []
    calls: dict[tuple[str, bool], Call] = {}
    for spinning in (True, False):
        for name, path in (("fp32", fp32), ("int8", int8)):
            runtime, calls[name, spinning] = loaded(path, threads, spinning)
            runtimes.append(runtime)
    out: dict[str, dict[str, float]] = {}
    for spinning in (True, False):
        pair = {name: calls[name, spinning] for name in ("fp32", "int8")}
        out[f"round-robin, spinning {'on' if spinning else 'off'}"] = round_robin(
            pair, args.iters, args.warmup
        )
    alone = one_at_a_time(
        {f"{n}|{s}": c for (n, s), c in calls.items()}, args.iters, args.warmup, args.blocks
    )
    for spinning in (True, False):
        out[f"one session at a time, spinning {'on' if spinning else 'off'}"] = {
            name: alone[f"{name}|{spinning}"][0] for name in ("fp32", "int8")
        }
    for runtime in runtimes:
        runtime.close()
    return out


def agent_runtime(path: Path, threads: int, args: argparse.Namespace) -> dict[str, float]:
    """Back-to-back and paced figures of the agent's runtime, spinning off and on."""
    off, call_off = loaded(path, threads, False)
    on, call_on = loaded(path, threads, True)
    calls = {"off": call_off, "on": call_on}
    busy = one_at_a_time(calls, args.iters, args.warmup, args.blocks)
    paced = one_at_a_time(calls, args.requests, args.warmup, args.blocks, args.gap_ms / 1e3)
    off.close()
    on.close()
    figures: dict[str, float] = {}
    for k in calls:
        figures[f"busy_p50_ms_{k}"] = busy[k][0]
        figures[f"paced_p50_ms_{k}"] = paced[k][0]
        figures[f"paced_cpu_ms_{k}"] = paced[k][1]
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_spinning", description=__doc__)
    parser.add_argument("--threads", type=int, default=0, help="0: every core we may use")
    parser.add_argument("--iters", type=int, default=200, help="timed runs per configuration")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs per block")
    parser.add_argument("--blocks", type=int, default=8, help="alternations of the blocks")
    parser.add_argument("--requests", type=int, default=200, help="paced requests per config")
    parser.add_argument("--gap-ms", type=float, default=20.0, help="pause after each answer")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--width", type=float, default=1.0, help="MobileNetV2 width multiplier")
    args = parser.parse_args(argv)
    threads = args.threads or default_threads()
    with tempfile.TemporaryDirectory(prefix="lepton-bench-spin-") as tmp:
        fp32, int8 = build_mobilenet(Path(tmp), args.resolution, args.width)
        methods = timing_methods(fp32, int8, threads, args)
        agent = {"digits INT8": agent_runtime(DIGITS, threads, args)}
        agent["MobileNetV2 INT8"] = agent_runtime(int8, threads, args)

    print(
        f"threads={threads}; MobileNetV2 at {args.resolution}x{args.resolution}x3, width "
        f"{args.width}; {args.iters} timed runs per configuration, blocks of "
        f"{max(1, args.iters // args.blocks)}\n"
    )
    rows: list[tuple[str, ...]] = [("timing method", "FP32 p50 ms", "INT8 p50 ms", "INT8 speed-up")]
    for method, p50 in methods.items():
        rows.append(
            (
                method,
                f"{p50['fp32']:.2f}",
                f"{p50['int8']:.2f}",
                f"{p50['fp32'] / p50['int8']:.2f}x",
            )
        )
    print(_common.table(rows) + "\n")
    rows = [("agent runtime", "spinning off", "spinning on", "on/off")]
    for model, f in agent.items():
        for label, key, digits in (
            ("back to back, p50 ms", "busy_p50_ms", 3),
            (f"every {args.gap_ms:g} ms, p50 ms", "paced_p50_ms", 3),
            (f"every {args.gap_ms:g} ms, CPU ms/request", "paced_cpu_ms", 2),
        ):
            off, on = f[f"{key}_off"], f[f"{key}_on"]
            rows.append(
                (f"{model}: {label}", f"{off:.{digits}f}", f"{on:.{digits}f}", f"{on / off:.2f}x")
            )
    print(_common.table(rows))
    return {"threads": threads, "methods": methods, "agent": agent}


if __name__ == "__main__":
    main()
