"""Bounds on what a device keeps: how many models it serves, their bytes in memory, the
bytes of its model cache on disk; and which models to let go when a deploy goes past them.

Pure policy, no I/O: :func:`to_evict` names served models to unload, least recently used
first, never the one just deployed and never one a request is using; :func:`cache_excess`
names cached files to delete. The :class:`~lepton.agent.inference.manager.ModelManager` applies
both.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Caps:
    """``max_models`` served at once, ``max_loaded_bytes`` of them (model file sizes, a
    floor on what a runtime holds), ``max_cache_bytes`` of cached model files on disk."""

    max_models: int = 8
    max_loaded_bytes: int = 1024 * 1024 * 1024
    max_cache_bytes: int = 2 * 1024 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_models", "max_loaded_bytes", "max_cache_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclass(frozen=True, slots=True)
class Loaded:
    """What the policy needs to know of one served model."""

    name: str
    digest: str
    size: int
    last_used: float  # monotonic seconds of the last lease (or the load)
    in_use: bool  # a request holds it now


def to_evict(models: Sequence[Loaded], caps: Caps, *, protect: str | None) -> list[str]:
    """Served models to unload, least recently used first, until the rest fit ``caps``.

    ``protect`` (the model just deployed) and models in use are never chosen; if they alone
    are over the caps, the list ends short and the caps are exceeded until they are free.
    A digest served under several names counts once towards the bytes.
    """
    kept = {m.name: m for m in models}
    out: list[str] = []
    candidates = sorted(
        (m for m in models if m.name != protect and not m.in_use), key=lambda m: m.last_used
    )
    for victim in candidates:
        if _fits(kept.values(), caps):
            break
        del kept[victim.name]
        out.append(victim.name)
    return out


def _fits(models: Iterable[Loaded], caps: Caps) -> bool:
    models = list(models)
    loaded = sum({m.digest: m.size for m in models}.values())
    return (
        len(models) <= caps.max_models
        and loaded <= caps.max_loaded_bytes
        and loaded <= caps.max_cache_bytes
    )


def cache_excess(
    files: Sequence[tuple[str, int, float]], keep: set[str], caps: Caps, *, spare: int
) -> list[str]:
    """Cached files (``(digest, bytes, mtime)``) to delete: every unreferenced one past the
    newest ``spare`` (kept for a rollback without a download), and more of those, oldest
    first, while the cache is over ``caps.max_cache_bytes``. Files in ``keep`` stay."""
    spares = sorted((f for f in files if f[0] not in keep), key=lambda f: f[2], reverse=True)
    out = [digest for digest, _, _ in spares[spare:]]
    total = sum(size for digest, size, _ in files if digest not in out)
    for digest, size, _ in reversed(spares[:spare]):  # oldest spare first
        if total <= caps.max_cache_bytes:
            break
        out.append(digest)
        total -= size
    return out
