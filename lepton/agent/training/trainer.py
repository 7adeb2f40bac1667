"""The torch side of federated training: the job's model with the global weights loaded,
the local training loop (FedProx term, seeded shuffling, cancellation between batches),
scoring, and the update (local minus global weights).

Everything here blocks and runs in a worker thread; torch and numpy are imported inside the
functions, so importing this module costs nothing at agent start-up. The task handlers that
call it are in :mod:`lepton.agent.training.tasks`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lepton.agent.handlers import TaskError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import torch

    from lepton.agent.training.datasources import Dataset
    from lepton.protocol.imports import Allowlist
    from lepton.protocol.tasks import TrainParams

    Arrays = dict[str, npt.NDArray[np.generic]]


def factory(path: str, *, allow: Allowlist) -> Callable[[], Any]:
    """The job's model factory, if ``allow`` permits it (checked before anything is
    imported); ``TaskError`` (``model: ...``) if it cannot be had."""
    from lepton.protocol.imports import ImportPathError, resolve

    try:
        return resolve(path, allow=allow)
    except ImportPathError as exc:
        raise TaskError(f"model: {exc}") from exc


def build_model(path: str, weights: Arrays, *, allow: Allowlist) -> torch.nn.Module:
    """The job's model with the global weights loaded; TaskError if they do not fit."""
    import numpy as np
    import torch

    try:
        model = factory(path, allow=allow)()
    except TaskError:
        raise
    except Exception as exc:  # the factory is the job's code: report, never crash
        raise TaskError(f"model: {path} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise TaskError(f"model: {path} returned {type(model).__name__}, not a torch.nn.Module")
    own = model.state_dict()
    if set(own) != set(weights):
        missing = sorted(set(own) - set(weights))[:5]
        extra = sorted(set(weights) - set(own))[:5]
        raise TaskError(
            f"weights_mismatch: the weights do not fit {path} "
            f"(missing {missing}, unexpected {extra})"
        )
    state = {}
    for name, ref in own.items():
        arr = weights[name]
        if tuple(arr.shape) != tuple(ref.shape):
            raise TaskError(
                f"weights_mismatch: {name} is {list(arr.shape)} in the weights, "
                f"{list(ref.shape)} in {path}"
            )
        state[name] = torch.from_numpy(np.array(arr)).to(ref.dtype)
    model.load_state_dict(state, strict=True)
    return model


def tensors(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    import torch

    assert data.y is not None
    y = data.y.argmax(axis=1) if data.y.ndim == 2 else data.y
    x = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32))
    return x, torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


def score(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    stop: threading.Event | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``; a set ``stop`` ends it
    between batches (:class:`TaskError`)."""
    import torch
    from torch.nn import functional

    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            if stop is not None and stop.is_set():
                raise TaskError("cancelled")
            out = model(x[start : start + batch_size])
            yb = y[start : start + batch_size]
            loss_sum += float(functional.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(dim=1) == yb).sum())
    return loss_sum / len(x), correct / len(x)


class Optimizer:
    """SGD with momentum and Adam, with ``torch.optim.SGD`` / ``torch.optim.Adam``'s update
    rules (defaults: no dampening or Nesterov; Adam betas (0.9, 0.999), eps 1e-8).

    Written out because constructing any ``torch.optim`` optimizer imports ``torch._dynamo``:
    about 6 s and 70 MB of resident memory on a desktop CPU the first time in a process,
    several times that on a Raspberry Pi, for two loops of tensor arithmetic.
    """

    def __init__(self, params: list[torch.nn.Parameter], config: TrainParams) -> None:
        import torch

        self.params = params
        self.kind = config.optimizer
        self.lr = config.lr
        self.momentum = config.momentum
        self.betas = (0.9, 0.999)
        self.eps = 1e-8
        self.steps = 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params] if self.kind == "adam" else []

    def step(self) -> None:
        import torch

        self.steps += 1
        b1, b2 = self.betas
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if p.grad is None:
                    continue
                g = p.grad
                if self.kind == "adam":
                    self.m[i].mul_(b1).add_(g, alpha=1 - b1)
                    self.v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (self.v[i] / (1 - b2**self.steps)).sqrt_().add_(self.eps)
                    p.addcdiv_(self.m[i], denom, value=-self.lr / (1 - b1**self.steps))
                elif self.momentum:  # from a zero buffer, the first step is the gradient
                    self.m[i].mul_(self.momentum).add_(g)
                    p.add_(self.m[i], alpha=-self.lr)
                else:
                    p.add_(g, alpha=-self.lr)


@dataclass(frozen=True, slots=True)
class Trained:
    delta: Arrays
    examples: int
    steps: int
    loss_before: float
    accuracy_before: float
    loss_after: float
    accuracy: float
    train_s: float
    update_norm: float


def train_local(
    params: TrainParams,
    weights: Arrays,
    data: Dataset,
    threads: int,
    stop: threading.Event,
    *,
    allow: Allowlist,
) -> Trained:
    """Train locally and return the update (blocking; run in a worker thread)."""
    import numpy as np
    import torch
    from torch.nn import functional

    torch.set_num_threads(threads)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        model = build_model(params.model, weights, allow=allow)
        x, y = tensors(data)
        loss_before, accuracy_before = score(model, x, y, max(params.batch_size, 256))
        trainable = [p for p in model.parameters() if p.requires_grad]
        anchors = [p.detach().clone() for p in trainable]
        optimizer = Optimizer(trainable, params)
        shuffle = torch.Generator().manual_seed(params.seed)
        steps = 0
        for _ in range(params.epochs):
            model.train()
            order = torch.randperm(len(x), generator=shuffle)
            for start in range(0, len(x), params.batch_size):
                if stop.is_set():
                    raise TaskError("cancelled")
                idx = order[start : start + params.batch_size]
                for p in trainable:
                    p.grad = None
                loss = functional.cross_entropy(model(x[idx]), y[idx])
                if params.prox_mu > 0:
                    prox = sum(
                        ((p - a) ** 2).sum() for p, a in zip(trainable, anchors, strict=True)
                    )
                    loss = loss + params.prox_mu / 2.0 * prox
                if not torch.isfinite(loss):
                    raise TaskError(f"diverged: the training loss became {float(loss.detach())}")
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                steps += 1
        loss_after, accuracy = score(model, x, y, max(params.batch_size, 256))
    delta: Arrays = {}
    for name, tensor in model.state_dict().items():
        local = tensor.detach().cpu().numpy()
        base = weights[name]
        if local.dtype.kind == "f":
            delta[name] = local.astype(np.float32) - base.astype(np.float32)
        else:
            delta[name] = (local.astype(np.int64) - base.astype(np.int64)).astype(local.dtype)
    norm = math.sqrt(
        sum(
            float(np.square(d, dtype=np.float64).sum())
            for d in delta.values()
            if d.dtype.kind == "f"
        )
    )
    return Trained(
        delta=delta,
        examples=len(x),
        steps=steps,
        loss_before=loss_before,
        accuracy_before=accuracy_before,
        loss_after=loss_after,
        accuracy=accuracy,
        train_s=time.perf_counter() - started,
        update_norm=norm,
    )


def transformed(trained: Trained, transform: Callable[[Arrays], Arrays]) -> Trained:
    """``trained`` with its update passed through the context's ``update_transform``."""
    import dataclasses

    import numpy as np

    try:
        delta = transform(dict(trained.delta))
    except Exception as exc:  # the hook is deployment code: report it, never crash
        raise TaskError(f"update_transform: {type(exc).__name__}: {exc}") from exc
    if not isinstance(delta, dict) or set(delta) != set(trained.delta):
        raise TaskError("update_transform: must return the same tensor names")
    norm = math.sqrt(
        sum(
            float(np.square(np.asarray(d), dtype=np.float64).sum())
            for d in delta.values()
            if np.asarray(d).dtype.kind == "f"
        )
    )
    return dataclasses.replace(trained, delta=delta, update_norm=norm)


def evaluate_local(
    model_path: str,
    weights: Arrays,
    data: Dataset,
    batch_size: int,
    threads: int,
    *,
    allow: Allowlist,
    stop: threading.Event | None = None,
) -> tuple[float, float]:
    import torch

    torch.set_num_threads(threads)
    model = build_model(model_path, weights, allow=allow)
    x, y = tensors(data)
    return score(model, x, y, batch_size, stop)
