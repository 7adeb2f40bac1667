"""The agent's inference path against bare ``InferenceSession.run`` on the same inputs, one run.

1. The ``infer`` handler's inner loop (:func:`lepton.agent.inference.tasks.evaluate`, the model
deployed
   through the model manager) against a bare loop of ``session.run`` over the same batches,
   with the same session options (threads, graph optimizations). Target: at most 1.05x.
2. The local endpoint's requests per second over one keep-alive connection (a blocking
   client in a separate process, JSON and MessagePack, 1 and 32 samples per request)
   against bare ``session.run`` calls on the same inputs. The difference is HTTP parsing,
   body decoding, validation and the hop to the inference thread, per request.

Both are reported in wall time and in CPU time. With one intra-op thread, ORT runs in the
calling thread, so CPU time (the inner loop's thread; the whole server process for the
endpoint) counts the work done and not the time spent waiting for a busy machine's cores;
on a shared machine it is the steadier figure, and the target applies to it.

Uses ``models/artifacts/digits_int8.onnx`` when present, else an INT8 (dynamically quantized)
MLP of the same shape built here.

    python -m bench.bench_agent_inference [--samples 1000] [--rounds 60] [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import _common
from lepton.agent.inference.endpoint import Endpoint
from lepton.agent.inference.manager import ModelManager
from lepton.agent.inference.runtimes.onnx import ALLOW_SPINNING
from lepton.agent.inference.served import deploy_spec
from lepton.agent.inference.tasks import evaluate
from lepton.agent.training.datasources import Dataset
from tests.support.httpserver import HttpServer

ARTIFACT = _common.REPO / "lepton" / "models" / "artifacts" / "digits_int8.onnx"

CLIENT = textwrap.dedent(
    """
    import socket, sys, time
    port, n, ctype, body_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    body = open(body_path, "rb").read()
    head = (
        f"POST /v1/models/bench:predict HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: {ctype}\\r\\n"
        f"Content-Length: {len(body)}\\r\\n\\r\\n"
    ).encode()
    request = head + body
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")

    def one():
        s.sendall(request)
        status = f.readline()
        assert b" 200 " in status, status
        length = 0
        while (line := f.readline()) != b"\\r\\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        f.read(length)

    for _ in range(min(200, n)):
        one()
    t0 = time.perf_counter()
    for _ in range(n):
        one()
    print(n / (time.perf_counter() - t0))
    """
)


def build_model(path: Path) -> None:
    """A 64-128-10 MLP, dynamically quantized to INT8 (MatMulInteger)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    w1 = rng.normal(scale=0.2, size=(64, 128)).astype(np.float32)
    w2 = rng.normal(scale=0.2, size=(128, 10)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["o"]),
            helper.make_node("Add", ["o", "b2"], ["logits"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(np.zeros(128, np.float32), "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(np.zeros(10, np.float32), "b2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    fp32 = path.with_suffix(".fp32.onnx")
    onnx.save(model, fp32)
    quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)


def bare_session(path: Path, threads: int) -> Any:
    """An InferenceSession with the options the agent's ONNX runtime uses."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry(ALLOW_SPINNING, "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bare_loop(session: Any, name: str, x: np.ndarray, batch: int) -> float:
    run = session.run
    clock = time.perf_counter
    t0 = clock()
    for start in range(0, len(x), batch):
        run(None, {name: x[start : start + batch]})
    return clock() - t0


def bare_calls(session: Any, name: str, xb: np.ndarray, n: int, rounds: int) -> tuple[float, float]:
    """(calls per second, CPU seconds per call), fastest of ``rounds``."""
    run = session.run
    for _ in range(min(200, n)):
        run(None, {name: xb})
    best, best_cpu = float("inf"), float("inf")
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(n):
            run(None, {name: xb})
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.thread_time() - c0)
    return n / best, best_cpu / n


async def deploy(path: Path, state: Path, threads: int) -> ModelManager:
    manager = ModelManager(state / "models", threads=threads)
    data = await asyncio.to_thread(path.read_bytes)
    with HttpServer() as blobs:
        digest = blobs.add(data)
        spec = deploy_spec(
            {
                "name": "bench",
                "digest": digest,
                "size": len(data),
                "url": blobs.url(digest),
                "format": "onnx",
                "precision": "int8",
            },
            max_bytes=1 << 30,
        )
        await manager.deploy(spec)
    return manager


def handler_vs_bare(
    manager: ModelManager, path: Path, x: np.ndarray, batch: int, threads: int, rounds: int
) -> dict[str, float]:
    """Fastest wall and CPU seconds over ``rounds`` interleaved passes, agent and bare.

    The fastest pass is the one least disturbed by the rest of the machine; interleaving
    gives both paths the same conditions. The agent's CPU time covers the whole
    :func:`evaluate` call (input preparation included), the bare one only its loop.
    """
    session = bare_session(path, threads)
    name = session.get_inputs()[0].name
    data = Dataset(x=x)
    stop = threading.Event()
    agent_s, bare_s, agent_cpu, bare_cpu = [], [], [], []
    cpu = time.thread_time
    with manager.lease("bench") as model:
        assert model is not None
        bare_loop(session, name, x, batch)  # warm-up both
        evaluate(model, data, batch_size=batch, warmup=1, output=None, stop=stop)
        for _ in range(rounds):
            c0 = cpu()
            ev = evaluate(model, data, batch_size=batch, warmup=0, output=None, stop=stop)
            agent_cpu.append(cpu() - c0)
            agent_s.append(ev.wall_s)
            c0 = cpu()
            bare_s.append(bare_loop(session, name, x, batch))
            bare_cpu.append(cpu() - c0)
    return {
        "agent_wall": min(agent_s),
        "bare_wall": min(bare_s),
        "agent_cpu": min(agent_cpu),
        "bare_cpu": min(bare_cpu),
    }


async def endpoint_rps(
    manager: ModelManager, body: bytes, ctype: str, n: int, tmp: Path
) -> tuple[float, float]:
    """(requests per second, server CPU seconds per request) over one keep-alive connection."""
    body_path = tmp / f"body-{ctype.replace('/', '-')}"
    await asyncio.to_thread(body_path.write_bytes, body)
    async with Endpoint(manager, port=0, concurrency=1) as ep:
        c0 = time.process_time()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLIENT,
            str(ep.port),
            str(n),
            ctype,
            str(body_path),
            stdout=subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        # The client's warm-up requests are served too.
        cpu_per_request = (time.process_time() - c0) / (n + min(200, n))
    if proc.returncode != 0:
        raise RuntimeError("endpoint client failed")
    return float(out.decode().strip()), cpu_per_request


async def main_async(samples: int, requests: int, threads: int, rounds: int) -> dict[str, float]:
    import msgspec

    from lepton.protocol.tensors import to_payload

    with tempfile.TemporaryDirectory(prefix="lepton-bench-") as tmpdir:
        tmp = Path(tmpdir)
        if ARTIFACT.exists():
            path, source = ARTIFACT, str(ARTIFACT.relative_to(_common.REPO))
        else:
            path, source = tmp / "mlp_int8.onnx", "built here: 64-128-10 MLP, dynamic INT8"
            build_model(path)
        manager = await deploy(path, tmp, threads)
        with manager.lease("bench") as model:
            assert model is not None
            spec = model.runtime.inputs[0]
        width = [d or 1 for d in spec.shape[1:]]
        rng = np.random.default_rng(1)
        x = rng.uniform(0, 16, size=(samples, *width)).astype(spec.dtype)

        figures: dict[str, float] = {}
        rows: list[tuple[str, ...]] = [
            ("path", "bare", "agent", "agent/bare wall", "agent/bare CPU")
        ]
        for batch in (1, 32):
            t = handler_vs_bare(manager, path, x, batch, threads, rounds)
            figures[f"handler_b{batch}_ratio"] = t["agent_wall"] / t["bare_wall"]
            figures[f"handler_b{batch}_cpu_ratio"] = t["agent_cpu"] / t["bare_cpu"]
            figures[f"handler_b{batch}_sps"] = samples / t["agent_wall"]
            rows.append(
                (
                    f"infer inner loop, batch {batch} (samples/s)",
                    f"{samples / t['bare_wall']:,.0f}",
                    f"{samples / t['agent_wall']:,.0f}",
                    f"{t['agent_wall'] / t['bare_wall']:.3f}x",
                    f"{t['agent_cpu'] / t['bare_cpu']:.3f}x",
                )
            )

        session = bare_session(path, threads)
        name = session.get_inputs()[0].name
        for batch in (1, 32):
            xb = x[:batch]
            bare_rps, bare_cpu = bare_calls(session, name, xb, requests, rounds)
            figures[f"bare_b{batch}_calls_per_s"] = bare_rps
            bodies = (
                ("json", msgspec.json.encode({"inputs": xb.tolist()}), "application/json"),
                (
                    "msgpack",
                    msgspec.msgpack.encode({"inputs": to_payload(xb)}),
                    "application/msgpack",
                ),
            )
            for label, body, ctype in bodies:
                rps, cpu = await endpoint_rps(manager, body, ctype, requests, tmp)
                key = f"endpoint_{label}_b{batch}"
                figures[f"{key}_rps"] = rps
                figures[f"{key}_cpu_us"] = cpu * 1e6
                figures[f"{key}_overhead_cpu_us"] = (cpu - bare_cpu) * 1e6
                rows.append(
                    (
                        f"endpoint {label}, {batch} sample(s)/request (req/s)",
                        f"{bare_rps:,.0f}",
                        f"{rps:,.0f}",
                        f"{bare_rps / rps:.2f}x",
                        f"{cpu / bare_cpu:.2f}x",
                    )
                )
        manager.close()
    print(_common.table(rows))
    print(
        f"model: {source}; threads={threads}; samples={samples}; requests={requests}; "
        f"fastest of {rounds} interleaved rounds; target: inner loop <= 1.05x"
    )
    for key, value in figures.items():
        if key.endswith("_overhead_cpu_us"):
            label = key.removesuffix("_overhead_cpu_us")
            print(f"{label}: {value:.0f} us of server CPU per request on top of session.run")
    return figures


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args.samples, args.requests, args.threads, args.rounds))


if __name__ == "__main__":
    main()
