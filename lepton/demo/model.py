"""The demo's model work on the coordinator side: central training, INT8 through the gate.

The central model is trained on a small labelled seed set the operator holds (128 images of
the stratified calibration subset of the digits training split); the devices hold
the rest of the training data, split among them with label skew, which federated rounds
then learn from without it leaving the devices. Quantization is
:func:`lepton.coordinator.model_registry.quantize.quantize_and_publish` into the coordinator's own
registry (its database and data directory), so the coordinator serves the published bytes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lepton.coordinator.model_registry.quantize import Published
    from lepton.coordinator.model_registry.registry import ModelRecord, ModelRegistry
    from lepton.models.data import DigitsSplits, Split

MODEL_NAME = "digits"


@dataclass(frozen=True, slots=True, kw_only=True)
class CentralModel:
    """A model trained centrally and its test accuracy (torch, FP32)."""

    module: Any  # models.digits.DigitsCNN
    accuracy: float
    samples: int
    epochs: int
    seconds: float


def host_gflops(batch: int = 32, runs: int = 200) -> float | None:
    """This host's effective FP32 throughput on the digits CNN (ONNX Runtime, one thread,
    batches of ``batch``), GFLOP/s; None when the shipped model is missing.

    The simulator stretches each task's real time by host speed / profile speed, and the
    profiles give *effective* small-CNN throughput; comparing them with the host's peak
    (what the agent's start-up probe measures on large kernels, several times higher)
    would make every simulated device look that much slower than its profile says.
    """
    import numpy as np
    import onnxruntime as ort

    from lepton.coordinator.model_registry.introspect import inspect_onnx

    path = Path(__file__).resolve().parents[1] / "models" / "artifacts" / "digits_fp32.onnx"
    if not path.is_file():
        return None
    flops = inspect_onnx(path).flops
    if not flops:
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.zeros((batch, 1, 8, 8), np.float32)}
    for _ in range(10):
        session.run(None, feed)
    started = time.perf_counter()
    for _ in range(runs):
        session.run(None, feed)
    per_run = (time.perf_counter() - started) / runs
    return float(flops * batch / per_run / 1e9)


def open_registry(database_url: str, data_dir: Path) -> ModelRegistry:
    """The coordinator's model registry, opened from this process (same database and files)."""
    from lepton.coordinator.model_registry.registry import ModelRegistry
    from lepton.coordinator.store.connection import make_engines

    engine = make_engines(database_url, sqlite_synchronous="normal").write
    return ModelRegistry(engine, data_dir, create_tables=False)


def splits(seed: int = 0) -> DigitsSplits:
    """The digits splits the simulated devices were given (same seed, same samples)."""
    from lepton.models.data import digits_splits

    return digits_splits(seed=seed)


def seed_set(data: DigitsSplits, samples: int) -> Split:
    """The first ``samples`` images of the stratified calibration subset of the training split."""
    from lepton.models.data import Split

    cal = data.calibration
    return Split(cal.x[:samples], cal.y[:samples])


def train_central(data: DigitsSplits, *, samples: int, epochs: int, seed: int = 0) -> CentralModel:
    """Train the digits CNN on the seed set; its accuracy on ``data.test``."""
    from lepton.models.data import DigitsSplits
    from lepton.models.train_digits import train_digits

    train = seed_set(data, samples)
    seed_data = DigitsSplits(train=train, test=data.test, calibration=train)
    started = time.perf_counter()
    result = train_digits(seed_data, epochs=epochs, batch_size=32, seed=seed)
    return CentralModel(
        module=result.model,
        accuracy=result.test_accuracy,
        samples=len(train),
        epochs=epochs,
        seconds=time.perf_counter() - started,
    )


def quantize(registry: ModelRegistry, source: Any, data: DigitsSplits) -> Published:
    """Export (a torch module) or copy (an FP32 ONNX path), quantize to INT8 calibrated on the
    seed set, evaluate both on the test split, and publish the pair if within the gate."""
    import torch  # noqa: F401 - loaded first: it sets its loggers' levels on import

    from lepton.coordinator.model_registry.quantize import QuantizationConfig, quantize_and_publish

    # The exporter warns about every torchvision op it cannot register; this model has none.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    return quantize_and_publish(
        registry,
        name=MODEL_NAME,
        source=source,
        calibration=data.calibration.batches(32),
        evaluation=(data.test.x, data.test.y),
        sample_input=data.test.x[:1],
        config=QuantizationConfig(latency_runs=20),
    )


def publish_weights(registry: ModelRegistry, module: Any) -> str:
    """Store ``module``'s weights as a ``lepton.protocol.weights`` blob (what a federated job can
    start from); returns its digest."""
    from lepton.protocol.weights import encode_weights

    state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    return registry.put_bytes(encode_weights(state, kind="weights"))


def model_ref(record: ModelRecord) -> dict[str, Any]:
    """What the report says about one registered model version."""
    return {
        "name": record.name,
        "version": record.version,
        "precision": record.precision,
        "format": record.format,
        "digest": record.digest,
        "size": record.size,
        "flops": record.flops,
        "accuracy_fp32": record.accuracy_fp32,
        "accuracy_int8": record.accuracy_int8,
    }


def quantization_figures(published: Published, seconds: float) -> dict[str, Any]:
    """The gate's figures for the report (accuracies are fractions, drops are points)."""
    r = published.report
    return {
        "fp32": model_ref(published.fp32),
        "int8": model_ref(published.int8),
        "accuracy_fp32": r.accuracy_fp32,
        "accuracy_int8": r.accuracy_int8,
        "drop_points": r.drop_points,
        "gate_points": r.gate_points,
        "passed": r.passed,
        "eval_samples": r.eval_samples,
        "size_fp32": r.size_fp32,
        "size_int8": r.size_int8,
        "latency_fp32_ms": r.latency_fp32.p50_ms,
        "latency_int8_ms": r.latency_int8.p50_ms,
        "seconds": seconds,
    }
