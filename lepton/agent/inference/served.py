"""What the agent's model manager deals in: a deploy's parameters
(:class:`~lepton.protocol.tasks.DeployParams`, checked by :func:`deploy_spec`), a served model
(counted in and out by the requests using it), a deploy's outcome, and the manager's error."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from lepton.agent.inference.runtimes.base import Runtime, TensorSpec
from lepton.common.errors import LeptonError
from lepton.protocol.tasks import DeployParams, InputSpec, params_as


class ModelError(LeptonError):
    """A deploy was refused. ``reason`` is a stable token, the message says why (prefixed
    with the ``stage`` that refused it, e.g. ``fetch: http_404: ...``)."""

    def __init__(self, reason: str, detail: str, *, stage: str = "") -> None:
        self.reason = reason
        self.detail = detail
        self.stage = stage
        super().__init__(f"{stage}: {reason}: {detail}" if stage else f"{reason}: {detail}")


def deploy_spec(params: dict[str, Any], *, max_bytes: int) -> DeployParams:
    """A ``deploy`` task's params, validated (:class:`~lepton.protocol.tasks.DeployParams`, digest
    lower-cased) and checked against this device: an http(s) URL, a size within ``max_bytes``.
    :class:`ModelError` (``bad_params``, ``bad_url``, ``too_large``) names the problem."""
    try:
        spec = params_as(DeployParams, params)
    except msgspec.ValidationError as exc:
        raise ModelError("bad_params", str(exc)) from exc
    scheme = spec.url.split(":", 1)[0].lower() if ":" in spec.url else ""
    if scheme not in ("http", "https"):
        raise ModelError("bad_url", f"url must be http(s), got {spec.url[:80]!r}")
    if spec.size > max_bytes:
        raise ModelError(
            "too_large", f"declared size {spec.size} exceeds this device's cap {max_bytes}"
        )
    return spec


@dataclass(slots=True, eq=False)
class ServedModel:
    """One loaded model. Use it through :meth:`ModelManager.lease`."""

    name: str
    digest: str
    format: str
    precision: str
    size: int
    runtime: Runtime
    input: InputSpec | None
    load_s: float
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)  # the last lease, for LRU
    _users: int = 0
    _retired: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _enter(self) -> None:
        with self._lock:
            self._users += 1
        self.last_used = time.monotonic()

    @property
    def in_use(self) -> bool:
        """A request holds it now (it must not be evicted under it)."""
        return self._users > 0

    def _leave(self) -> None:
        with self._lock:
            self._users -= 1
            close = self._retired and self._users == 0
        if close:
            self.runtime.close()

    def retire(self) -> None:
        """No new users; close the runtime once the last current user leaves."""
        with self._lock:
            self._retired = True
            close = self._users == 0
        if close:
            self.runtime.close()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "digest": self.digest,
            "format": self.format,
            "precision": self.precision,
            "size": self.size,
            "runtime": self.runtime.description,
            "providers": list(self.runtime.providers),
            "threads": self.runtime.threads,
            "inputs": [s.describe() for s in self.runtime.inputs],
            "outputs": [s.describe() for s in self.runtime.outputs],
            "loaded_at": self.loaded_at,
        }


@dataclass(frozen=True, slots=True)
class DeployOutcome:
    name: str
    digest: str
    downloaded: int  # bytes fetched over the network for this deploy; 0 on a cache hit
    cached: bool
    load_s: float
    previous: str | None  # digest served before, if any
    runtime: str
    threads: int
    evicted: tuple[str, ...] = ()  # served models unloaded to stay within the caps


def input_mismatch(spec: InputSpec, inputs: tuple[TensorSpec, ...]) -> str | None:
    """Why a model's inputs contradict the declared input spec, or None."""
    target = next((s for s in inputs if s.name == spec.name), None) if spec.name else None
    if spec.name and target is None:
        return f"model has no input named {spec.name!r} (has {[s.name for s in inputs]})"
    target = target or inputs[0]
    if spec.dtype is not None and spec.dtype != target.dtype:
        return f"input {target.name!r} is {target.dtype}, declared {spec.dtype}"
    if spec.shape is not None:
        if len(spec.shape) != len(target.shape):
            return f"input {target.name!r} has shape {list(target.shape)}, declared {spec.shape}"
        for axis, (want, have) in enumerate(zip(spec.shape, target.shape, strict=True)):
            if want is not None and have is not None and want != have:
                return (
                    f"input {target.name!r} dimension {axis} is {have}, declared {want} "
                    f"(model {list(target.shape)}, declared {spec.shape})"
                )
    return None
