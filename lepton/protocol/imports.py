"""``package.module:attr`` import paths: how jobs and configs name user code (a model factory,
a data source plugin). Resolved the same way on the agent and on the coordinator.

Importing a module runs its code, so a path that arrives over the network (a federated job,
a train task) is resolved only against an :class:`Allowlist` the operator configured, and the
check is made on the string **before** anything is imported. The target must also be defined
in an allowed module (a re-exported ``os.system`` or a walk through an imported module is
refused), so allowing ``lepton.models.*`` allows the reference models and nothing they import.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lepton.common.errors import LeptonError

_PATH_RE = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
)
_PATTERN_RE = re.compile(
    r"\*|[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(\.\*|:\*|:[A-Za-z_][A-Za-z0-9_.]*)?"
)
#: Entry-point group under which installed packages register model factories, data sets and
#: evaluation sets as plugins (``[project.entry-points."lepton.plugins"]``).
PLUGIN_GROUP = "lepton.plugins"


class ImportPathError(LeptonError, ValueError):
    """An import path that is refused or cannot be resolved.

    ``reason`` is a stable token: ``malformed``, ``not_allowed``, ``import_failed``,
    ``not_found`` or ``not_callable``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(detail)


@dataclass(frozen=True, slots=True)
class Allowlist:
    """The import paths that may be resolved.

    Patterns: ``pkg.module:attr`` (that callable), ``pkg.module:*`` (anything defined in that
    module), ``pkg.*`` (anything defined in ``pkg`` or a module below it), a bare ``pkg.module``
    (same as ``pkg.module:*``), and ``*`` (anything: only for paths the operator wrote
    into a local config file, never for paths from the network).
    """

    patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for pattern in self.patterns:
            if not _PATTERN_RE.fullmatch(pattern):
                raise ValueError(f"{pattern!r} is not an allowlist pattern")

    @classmethod
    def anything(cls) -> Allowlist:
        return cls(("*",))

    def with_plugins(self, group: str = PLUGIN_GROUP) -> Allowlist:
        """This list plus every entry point installed under ``group``."""
        points = importlib.metadata.entry_points(group=group)
        found = tuple(ep.value.replace(" ", "") for ep in points)
        return Allowlist(self.patterns + tuple(p for p in found if _PATH_RE.fullmatch(p)))

    def module_allowed(self, module: str) -> bool:
        """Whether anything defined in ``module`` may be resolved."""
        for pattern in self.patterns:
            if pattern == "*":
                return True
            if pattern.endswith(".*"):
                prefix = pattern[:-2]
                if module == prefix or module.startswith(prefix + "."):
                    return True
            elif module in (pattern.removesuffix(":*"), pattern) and ":" not in pattern[:-2]:
                return True
        return False

    def names(self, path: str) -> bool:
        """Whether the list names ``path`` itself (or allows anything)."""
        return path in self.patterns or "*" in self.patterns

    def permits(self, path: str) -> bool:
        """Whether ``path`` (``package.module:attr``) may be imported at all."""
        return self.names(path) or self.module_allowed(path.partition(":")[0])

    def check(self, path: str) -> None:
        """Raise :class:`ImportPathError` unless ``path`` is well formed and permitted."""
        if not _PATH_RE.fullmatch(path):
            raise ImportPathError("malformed", f"{path!r} is not a package.module:attr path")
        if not self.permits(path):
            allowed = ", ".join(self.patterns) or "nothing"
            raise ImportPathError(
                "not_allowed", f"{path!r} is not in the allowed imports ({allowed})"
            )


def _defined_in(target: Any) -> str | None:
    module = getattr(target, "__module__", None)
    return module if isinstance(module, str) else None


def resolve(path: str, *, allow: Allowlist) -> Callable[..., Any]:
    """The callable at ``package.module:attr`` (``attr`` may be dotted: ``Class.method``).

    ``allow`` is checked before anything is imported; the callable must be defined in a
    module the list allows (or be named exactly by it). Raises :class:`ImportPathError` with
    a reason a user can act on; any error the module raises on import is reported, not
    propagated (it is the user's code).
    """
    allow.check(path)
    module_name, _, attr = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises while importing
        raise ImportPathError("import_failed", f"cannot import {module_name!r}: {exc}") from exc
    parts = attr.split(".")
    for part in parts:
        target = getattr(target, part, None)
        if target is None:
            raise ImportPathError("not_found", f"{path!r} not found")
        if isinstance(target, types.ModuleType):
            raise ImportPathError("not_allowed", f"{path!r} goes through module {part!r}")
        if part == parts[0] and not allow.names(path):
            # The module's own definitions only: not what it imported from elsewhere.
            owner = _defined_in(target)
            if owner is None or not allow.module_allowed(owner):
                raise ImportPathError(
                    "not_allowed", f"{path!r} is defined in {owner!r}, which is not allowed"
                )
    if not callable(target):
        raise ImportPathError("not_callable", f"{path!r} is not callable")
    return target  # type: ignore[no-any-return]
