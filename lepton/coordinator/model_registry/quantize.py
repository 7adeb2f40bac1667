"""INT8 quantization pipeline with an accuracy gate.

torch model -> ONNX (opset >= 17, named input/output, dynamic batch) ->
``quant_pre_process`` (shape inference, graph optimisation: batch norm folded into conv) ->
``quantize_static`` (QDQ, per-channel weights, calibration from a data-source plugin) ->
FP32 and INT8 evaluated with ONNX Runtime -> :class:`QuantizationReport` -> published to
the registry only when the accuracy drop is within the gate, else
:class:`~lepton.coordinator.model_registry.errors.AccuracyGateError` carrying the figures.

All quantization is ``onnxruntime.quantization``; this module is glue.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from lepton.coordinator.model_registry.calibration import DataSource, SourceReader
from lepton.coordinator.model_registry.errors import AccuracyGateError, QuantizationError
from lepton.coordinator.model_registry.evaluation import (
    Latency,
    Metric,
    evaluate,
    measure_latency,
    top1_accuracy,
)
from lepton.coordinator.model_registry.export import DEFAULT_OPSET, MIN_OPSET, export_onnx

if TYPE_CHECKING:
    import torch

    from lepton.coordinator.model_registry.registry import ModelRecord, ModelRegistry

log = logging.getLogger(__name__)

CalibrationName = Literal["minmax", "entropy", "percentile"]
QuantTypeName = Literal["int8", "uint8"]
FormatName = Literal["qdq", "qoperator"]
CALIBRATION_METHODS: tuple[CalibrationName, ...] = ("minmax", "entropy", "percentile")


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantizationConfig:
    """How to quantize and how much accuracy may be lost.

    Defaults: QDQ format, unsigned activations with signed per-channel weights (U8S8),
    7-bit weights (``reduce_range``), MinMax calibration. U8S8 is the layout every ONNX
    Runtime CPU kernel accelerates: with S8S8 on x86 without VNNI, ORT leaves depthwise
    convolutions in float between Dequantize/Quantize pairs (see ``bench/bench_int8.py``).
    ``reduce_range`` is ORT's remedy for its x86 U8S8 kernels (AVX2/AVX-512 without VNNI),
    whose 16-bit intermediate sums saturate: with 8-bit weights the digits model loses 0.67
    points on such a host and none in the float reference of the same QDQ graph; with 7-bit
    weights it loses none on either. ``gate_points`` is the largest accuracy drop
    (percentage points) that may be published.
    """

    calibration: CalibrationName = "minmax"
    per_channel: bool = True
    activation_type: QuantTypeName = "uint8"
    weight_type: QuantTypeName = "int8"
    quant_format: FormatName = "qdq"
    reduce_range: bool = True
    percentile: float = 99.999
    max_calibration_batches: int | None = None
    op_types_to_quantize: tuple[str, ...] | None = None
    nodes_to_exclude: tuple[str, ...] = ()
    gate_points: float = 1.0
    opset: int = DEFAULT_OPSET
    latency_threads: int = 1
    latency_runs: int = 50

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATION_METHODS:
            raise ValueError(f"calibration must be one of {CALIBRATION_METHODS}")
        if self.opset < MIN_OPSET:
            raise ValueError(f"opset must be >= {MIN_OPSET}")
        if not self.gate_points >= 0:
            raise ValueError("gate_points must be >= 0")
        if not 0 < self.percentile <= 100:
            raise ValueError("percentile must be in (0, 100]")


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibrationDetails:
    """What the INT8 model was calibrated and quantized with (stored in the registry)."""

    method: str
    batches: int
    samples: int
    per_channel: bool
    activation_type: str
    weight_type: str
    quant_format: str
    reduce_range: bool
    percentile: float | None
    onnxruntime: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantizationReport:
    """Every figure one pipeline run measured. Accuracies are fractions; drops are points."""

    accuracy_fp32: float
    accuracy_int8: float
    # The INT8 graph with ORT's optimisations off (QDQ simulated in float): a drop here is
    # quantization error, a drop only in ``accuracy_int8`` comes from this host's kernels.
    accuracy_int8_reference: float
    drop_points: float
    gate_points: float
    eval_samples: int
    size_fp32: int
    size_int8: int
    latency_fp32: Latency
    latency_int8: Latency
    calibration: CalibrationDetails
    int8_ops: dict[str, int]
    host: str
    fp32_path: str
    int8_path: str

    @property
    def passed(self) -> bool:
        return self.drop_points <= self.gate_points

    @property
    def size_ratio(self) -> float:
        return self.size_int8 / self.size_fp32

    @property
    def speedup(self) -> float:
        return self.latency_fp32.p50_ms / self.latency_int8.p50_ms

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(passed=self.passed, size_ratio=self.size_ratio, speedup=self.speedup)
        return out


@dataclass(frozen=True, slots=True)
class QuantizationResult:
    """The FP32 and INT8 ONNX files a run wrote, and its report."""

    fp32_path: Path
    int8_path: Path
    report: QuantizationReport


@dataclass(frozen=True, slots=True)
class Published:
    """Registry records of a published pair: the INT8 record's parent is the FP32 one."""

    fp32: ModelRecord
    int8: ModelRecord
    report: QuantizationReport = field(repr=False)


def _prune_opset_imports(path: Path) -> None:
    """Keep only the operator domains the graph uses.

    The pre-processor stamps every domain its runtime knows (some at versions newer than
    older device runtimes accept); an unused stamp is noise at best and a load error at worst.
    """
    import onnx

    proto = onnx.load(str(path))
    used = {n.domain for n in proto.graph.node} | {""}
    keep = [o for o in proto.opset_import if o.domain in used]
    if len(keep) != len(proto.opset_import):
        del proto.opset_import[:]
        proto.opset_import.extend(keep)
        onnx.save(proto, str(path))


def _quant_type(name: QuantTypeName) -> Any:
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]


def _input_name(path: Path) -> str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return str(next(i.name for i in model.graph.input if i.name not in inits))


def quantize_onnx(
    fp32_path: str | Path,
    int8_path: str | Path,
    calibration: DataSource,
    config: QuantizationConfig | None = None,
) -> CalibrationDetails:
    """Pre-process and statically quantize an FP32 ONNX file; returns what was used."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    cfg = config or QuantizationConfig()
    src, dest = Path(fp32_path), Path(int8_path)
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[cfg.calibration]
    fmt = QuantFormat.QDQ if cfg.quant_format == "qdq" else QuantFormat.QOperator
    extra: dict[str, Any] = {}
    if cfg.calibration == "percentile":
        extra["CalibPercentile"] = cfg.percentile
    reader = SourceReader(
        calibration,
        _input_name(src),
        max_batches=cfg.max_calibration_batches,
        # ORT's histogram calibrators stack per-batch outputs, so every batch must have the
        # same shape; single samples guarantee that whatever batches the source yields.
        single_samples=cfg.calibration != "minmax",
    )
    with tempfile.TemporaryDirectory(prefix="lepton-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre))
        except Exception as exc:
            raise QuantizationError("pre_process", str(exc)) from exc
        try:
            quantize_static(
                str(pre),
                str(dest),
                reader,
                quant_format=fmt,
                op_types_to_quantize=list(cfg.op_types_to_quantize)
                if cfg.op_types_to_quantize
                else None,
                per_channel=cfg.per_channel,
                reduce_range=cfg.reduce_range,
                activation_type=_quant_type(cfg.activation_type),
                weight_type=_quant_type(cfg.weight_type),
                nodes_to_exclude=list(cfg.nodes_to_exclude) or None,
                calibrate_method=method,
                extra_options=extra,
            )
        except Exception as exc:
            raise QuantizationError("quantize", str(exc)) from exc
    if reader.batches == 0:
        raise QuantizationError("calibrate", "the calibration data source yielded no batches")
    _prune_opset_imports(dest)
    return CalibrationDetails(
        method=cfg.calibration,
        batches=reader.batches,
        samples=reader.samples,
        per_channel=cfg.per_channel,
        activation_type=cfg.activation_type,
        weight_type=cfg.weight_type,
        quant_format=cfg.quant_format,
        reduce_range=cfg.reduce_range,
        percentile=cfg.percentile if cfg.calibration == "percentile" else None,
        onnxruntime=onnxruntime.__version__,
    )


def op_histogram(path: str | Path) -> dict[str, int]:
    """How many nodes of each op type an ONNX file holds (shows what got quantized)."""
    import onnx

    return dict(sorted(Counter(n.op_type for n in onnx.load(str(path)).graph.node).items()))


def host_description() -> str:
    """A short description of this host for reports: machine, CPU count, OS."""
    return f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def quantize_model(
    source: torch.nn.Module | str | Path,
    *,
    calibration: DataSource,
    evaluation: tuple[npt.NDArray[Any], npt.NDArray[Any]],
    out_dir: str | Path,
    stem: str = "model",
    config: QuantizationConfig | None = None,
    sample_input: npt.NDArray[Any] | None = None,
    metric: Metric = top1_accuracy,
    enforce_gate: bool = True,
) -> QuantizationResult:
    """Run the whole pipeline; writes ``{stem}_fp32.onnx`` and ``{stem}_int8.onnx`` in ``out_dir``.

    ``source`` is a torch module (exported first, with ``sample_input`` or the first
    evaluation sample as the example) or the path of an FP32 ONNX file (copied). ``metric``
    scores model outputs against the evaluation labels (top-1 accuracy by default).
    Raises :class:`AccuracyGateError` when the drop exceeds ``config.gate_points`` and
    ``enforce_gate`` is set; the files stay in ``out_dir`` for inspection.
    """
    cfg = config or QuantizationConfig()
    x_eval, y_eval = evaluation
    if len(x_eval) == 0 or len(x_eval) != len(y_eval):
        raise ValueError("the evaluation set needs as many labels as samples, and at least one")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp32_path, int8_path = out / f"{stem}_fp32.onnx", out / f"{stem}_int8.onnx"
    if isinstance(source, (str, Path)):
        if Path(source).resolve() != fp32_path.resolve():
            shutil.copyfile(source, fp32_path)
    else:
        sample = sample_input if sample_input is not None else x_eval[:1]
        export_onnx(source, fp32_path, sample=sample, opset=cfg.opset)
    details = quantize_onnx(fp32_path, int8_path, calibration, cfg)
    acc_fp32 = evaluate(fp32_path, x_eval, y_eval, metric=metric)
    acc_int8 = evaluate(int8_path, x_eval, y_eval, metric=metric)
    acc_ref = evaluate(int8_path, x_eval, y_eval, metric=metric, optimization="disable")
    sample1 = np.ascontiguousarray(x_eval[:1])
    report = QuantizationReport(
        accuracy_fp32=acc_fp32,
        accuracy_int8=acc_int8,
        accuracy_int8_reference=acc_ref,
        drop_points=round((acc_fp32 - acc_int8) * 100, 6),
        gate_points=cfg.gate_points,
        eval_samples=len(y_eval),
        size_fp32=fp32_path.stat().st_size,
        size_int8=int8_path.stat().st_size,
        latency_fp32=measure_latency(
            fp32_path, sample1, threads=cfg.latency_threads, runs=cfg.latency_runs
        ),
        latency_int8=measure_latency(
            int8_path, sample1, threads=cfg.latency_threads, runs=cfg.latency_runs
        ),
        calibration=details,
        int8_ops=op_histogram(int8_path),
        host=host_description(),
        fp32_path=str(fp32_path),
        int8_path=str(int8_path),
    )
    log.info(
        "quantized %s: fp32 %.2f %%, int8 %.2f %%, drop %.2f points (gate %.2f), %d -> %d bytes",
        stem,
        acc_fp32 * 100,
        acc_int8 * 100,
        report.drop_points,
        cfg.gate_points,
        report.size_fp32,
        report.size_int8,
    )
    if enforce_gate and not report.passed:
        raise AccuracyGateError(report)
    return QuantizationResult(fp32_path, int8_path, report)


def publish(registry: ModelRegistry, result: QuantizationResult, *, name: str) -> Published:
    """Register the FP32 model and its INT8 child (parent link, accuracies, calibration).

    Refuses (raises :class:`AccuracyGateError`) a result that did not pass its gate, so a
    result made with ``enforce_gate=False`` cannot be published by mistake. Importing the
    same FP32 bytes again reuses the existing FP32 record.
    """
    report = result.report
    if not report.passed:
        raise AccuracyGateError(report)
    fp32 = registry.import_file(
        result.fp32_path,
        name=name,
        format="onnx",
        precision="fp32",
        accuracy_fp32=report.accuracy_fp32,
        eval_samples=report.eval_samples,
    )
    int8 = registry.import_file(
        result.int8_path,
        name=name,
        format="onnx",
        precision="int8",
        param_count=fp32.param_count,
        flops=fp32.flops,
        accuracy_fp32=report.accuracy_fp32,
        accuracy_int8=report.accuracy_int8,
        eval_samples=report.eval_samples,
        calibration=report.calibration.to_dict(),
        parent_version=fp32.version,
    )
    return Published(fp32=fp32, int8=int8, report=report)


def quantize_and_publish(
    registry: ModelRegistry,
    *,
    name: str,
    source: torch.nn.Module | str | Path,
    calibration: DataSource,
    evaluation: tuple[npt.NDArray[Any], npt.NDArray[Any]],
    config: QuantizationConfig | None = None,
    sample_input: npt.NDArray[Any] | None = None,
    metric: Metric = top1_accuracy,
) -> Published:
    """:func:`quantize_model` in a scratch directory, then :func:`publish` under ``name``."""
    with tempfile.TemporaryDirectory(prefix="lepton-quant-") as tmp:
        result = quantize_model(
            source,
            calibration=calibration,
            evaluation=evaluation,
            out_dir=tmp,
            stem=name,
            config=config,
            sample_input=sample_input,
            metric=metric,
        )
        return publish(registry, result, name=name)
