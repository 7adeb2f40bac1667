"""The torch side of a federated job on the coordinator: the job's model, its first
weights, the central evaluation set, the FLOPs a training example costs, and the final
model file. torch is imported here only, when a job needs it, never at service start-up.

Every function is blocking; the engine runs them in worker threads. Code and files a job
names are resolved through the operator's :class:`~.admission.JobPolicy` (import paths
against its allowlist, ``.npz`` files inside its evaluation directory), and whatever the
job's code raises comes back as :class:`JobCodeError` with the reason, so a job whose model
does not load fails instead of being retried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from lepton.common.errors import LeptonError
from lepton.coordinator.fl.jobs.spec import JobError
from lepton.protocol import imports

if TYPE_CHECKING:
    import torch

    from lepton.coordinator.fl.jobs.admission import JobPolicy

log = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[np.generic]]
#: A training step costs about three forward passes (forward, and two for backward).
TRAIN_FLOPS_PER_FORWARD = 3.0


class JobCodeError(LeptonError, ValueError):
    """The job's model factory or evaluation set cannot be used."""


@dataclass(frozen=True, slots=True)
class EvalSet:
    """Samples ``x`` (float32) and class labels ``y`` (int64) the coordinator scores on."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.y)


def resolve(path: str, policy: JobPolicy) -> Callable[..., Any]:
    """The callable at ``package.module:attr``, if the policy allows it (``JobCodeError``
    if it is not allowed, does not import or is not a callable)."""
    try:
        return imports.resolve(path, allow=policy.allow)
    except imports.ImportPathError as exc:
        raise JobCodeError(f"{exc.reason}: {exc}") from exc


def _call(path: str, policy: JobPolicy) -> Any:
    """Call the job's zero-argument callable; what it raises is a :class:`JobCodeError`."""
    target = resolve(path, policy)
    try:
        return target()
    except Exception as exc:  # the job's code: any error is the job's failure
        raise JobCodeError(f"{path}() raised {type(exc).__name__}: {exc}") from exc


def build_model(path: str, policy: JobPolicy, weights: Arrays | None = None) -> torch.nn.Module:
    """The job's model (in eval mode), with ``weights`` loaded when given."""
    import torch

    model = _call(path, policy)
    if not isinstance(model, torch.nn.Module):
        raise JobCodeError(f"{path} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        own = model.state_dict()
        if set(own) != set(weights):
            raise JobCodeError(f"the weights do not fit {path}")
        try:
            model.load_state_dict(
                {k: torch.from_numpy(np.array(weights[k])).to(v.dtype) for k, v in own.items()},
                strict=True,
            )
        except RuntimeError as exc:  # shapes that do not fit
            raise JobCodeError(f"the weights do not fit {path}: {exc}") from exc
    model.eval()
    return model


def initial_weights(path: str, policy: JobPolicy, seed: int) -> Arrays:
    """The model's freshly initialised weights (the same seed gives the same weights)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(path, policy)
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_eval_set(spec: str, policy: JobPolicy) -> EvalSet:
    """The central evaluation set: a ``.npz`` file with ``x`` and ``y`` in the policy's
    evaluation directory, or an allowed callable (``package.module:fn``) returning an
    object with ``x`` and ``y`` or an ``(x, y)`` pair."""
    if spec.endswith(".npz"):
        try:
            path: Path = policy.eval_path(spec)
        except JobError as exc:
            raise JobCodeError(str(exc)) from exc
        try:
            with np.load(path, allow_pickle=False) as data:
                x, y = np.asarray(data["x"]), np.asarray(data["y"])
        except (OSError, KeyError, ValueError) as exc:
            raise JobCodeError(f"eval set {spec}: {type(exc).__name__}: {exc}") from exc
    else:
        got = _call(spec, policy)
        try:
            if isinstance(got, tuple) and len(got) == 2:
                x, y = np.asarray(got[0]), np.asarray(got[1])
            else:
                x, y = np.asarray(got.x), np.asarray(got.y)
        except (AttributeError, TypeError, ValueError) as exc:
            raise JobCodeError(f"eval set {spec}: no x and y: {exc}") from exc
    if y.ndim == 2:
        y = y.argmax(axis=1)
    if len(x) != len(y) or len(y) == 0:
        raise JobCodeError(f"eval set {spec}: x and y must be non-empty and the same length")
    return EvalSet(np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64))


def evaluate(
    path: str, policy: JobPolicy, weights: Arrays, data: EvalSet, batch_size: int = 512
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the weights on ``data``."""
    import torch
    from torch.nn import functional

    model = build_model(path, policy, weights)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            out = model(x[start : start + batch_size])
            yb = y[start : start + batch_size]
            loss += float(functional.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(dim=1) == yb).sum())
    return loss / len(y), correct / len(y)


def train_flops_per_example(
    path: str, policy: JobPolicy, sample_shape: tuple[int, ...] | None
) -> float:
    """FLOPs of one training example (about three forward passes); from the parameter count
    when no sample shape is known."""
    import torch

    model = build_model(path, policy)
    params = sum(p.numel() for p in model.parameters())
    if sample_shape is None:
        return TRAIN_FLOPS_PER_FORWARD * 2.0 * params
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros((1, *sample_shape)))
        forward = float(counter.get_total_flops())
    except Exception:  # an unusual model: fall back to the parameter count
        log.warning("cannot count the FLOPs of %s; estimating from its parameters", path)
        forward = 2.0 * params
    return TRAIN_FLOPS_PER_FORWARD * max(forward, 2.0 * params)


def write_final_model(
    path: str,
    policy: JobPolicy,
    weights: Arrays,
    dest: Path,
    *,
    fmt: str,
    sample_shape: tuple[int, ...] | None,
) -> tuple[Path, str]:
    """Write the final model: FP32 ONNX (needs a sample shape) or a torch state dict.

    Returns the file and its format (``onnx`` falls back to ``torch`` without a shape).
    """
    import torch

    model = build_model(path, policy, weights)
    dest.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx" and sample_shape is not None:
        from lepton.coordinator.model_registry.export import export_onnx

        out = dest / "model.onnx"
        export_onnx(model, out, sample=np.zeros((1, *sample_shape), dtype=np.float32))
        return out, "onnx"
    if fmt == "onnx":
        log.warning("no input shape known (no eval set, no input_shape): saving a state dict")
    out = dest / "model.pt"
    torch.save(model.state_dict(), out)
    return out, "torch"
