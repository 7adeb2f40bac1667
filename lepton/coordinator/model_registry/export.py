"""torch -> ONNX export for the quantization pipeline.

One file (no external data), named input and output, a symbolic batch dimension, the lowest
IR version that carries the opset (so older runtimes on devices load it), and none of the
exporter's per-node provenance (stack traces with source paths), which is most of a small
model's bytes and would make the file depend on where it was built.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from lepton.coordinator.model_registry.errors import QuantizationError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MIN_OPSET = 17
DEFAULT_OPSET = 18


def _min_ir_version(opset: int) -> int:
    """The lowest IR version that carries ``opset``: older runtimes (ORT on devices) load it."""
    from onnx import helper

    return min(row[1] for row in helper.VERSION_TABLE if row[2] == opset)


def export_onnx(
    model: torch.nn.Module,
    path: str | Path,
    *,
    sample: npt.NDArray[Any],
    input_name: str = "input",
    output_name: str = "logits",
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``model`` (in eval mode) to a single ONNX file with torch's exporter.

    The input and output get the given names, dimension 0 is a symbolic ``batch`` when
    ``dynamic_batch``, and the IR version is lowered to the oldest that carries ``opset``.
    """
    import onnx
    import torch

    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}")
    dest = Path(path)
    model.eval()
    example = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
    dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    try:
        # The exporter's own deprecation notices (torch internals) are not the caller's to
        # act on, and must not become errors where warnings are errors (the test suite).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.onnx.export(
                model,
                (example,),
                str(dest),
                input_names=[input_name],
                output_names=[output_name],
                opset_version=opset,
                dynamic_shapes=dynamic,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        for w in caught:
            log.debug("torch.onnx.export: %s: %s", w.category.__name__, w.message)
    except Exception as exc:
        raise QuantizationError("export", str(exc)) from exc
    proto = onnx.load(str(dest))
    proto.ir_version = min(proto.ir_version, _min_ir_version(opset))
    _strip_trace_metadata(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(dest))
    return dest


def _strip_trace_metadata(proto: Any) -> None:
    """Drop the exporter's per-node provenance (stack traces with source paths, FX names).

    It is most of a small model's bytes and makes the file depend on where it was built.
    """
    graph = proto.graph
    for item in [*graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        del item.metadata_props[:]
        item.doc_string = ""
    keep = [p for p in proto.metadata_props if not p.key.startswith("pkg.torch")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
