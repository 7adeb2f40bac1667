"""``package.module:attr`` import paths: how jobs and configs name user code (a model factory,
a data source plugin). Resolved the same way on the agent and on the coordinator."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from protocol.errors import LeptonError


class ImportPathError(LeptonError, ValueError):
    """An import path whose module cannot be imported or whose target is not a callable."""


def resolve(path: str) -> Callable[..., Any]:
    """The callable at ``package.module:attr`` (``attr`` may be dotted: ``Class.method``).

    Raises :class:`ImportPathError` with a reason a user can act on; any error the module
    raises on import is reported, not propagated (it is the user's code).
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ImportPathError(f"{path!r} is not a package.module:attr path")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises while importing
        raise ImportPathError(f"cannot import {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ImportPathError(f"{path!r} not found")
    if not callable(target):
        raise ImportPathError(f"{path!r} is not callable")
    return target  # type: ignore[no-any-return]
