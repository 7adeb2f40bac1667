"""Operator scopes: what a token lets its holder do, following the routes.

A route names the one scope it needs (:func:`lepton.coordinator.auth.guard.require`); a token
holds a set of scopes, and ``admin`` holds every one. ``fleet:read`` reads everything the
coordinator knows about the fleet (devices, tasks, models, jobs, blobs); each ``*:write``
changes one area; ``metrics:read`` is only ``/metrics`` (a Prometheus scraper's token).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Final


class Scope(StrEnum):
    FLEET_READ = "fleet:read"
    TASKS_WRITE = "tasks:write"
    MODELS_WRITE = "models:write"
    FL_WRITE = "fl:write"
    ROLLOUTS_WRITE = "rollouts:write"
    DEVICES_WRITE = "devices:write"  # enrolment claims, revocation
    METRICS_READ = "metrics:read"
    ADMIN = "admin"  # tokens and the audit log; implies every scope


#: What each scope is for (``lepton tokens create --help``, the OpenAPI scheme).
DESCRIPTIONS: Final[dict[Scope, str]] = {
    Scope.FLEET_READ: "read devices, tasks, models, federated jobs and blobs",
    Scope.TASKS_WRITE: "submit and cancel tasks",
    Scope.MODELS_WRITE: "deploy models",
    Scope.FL_WRITE: "start and stop federated jobs",
    Scope.ROLLOUTS_WRITE: "start, pause and abort rollouts",
    Scope.DEVICES_WRITE: "make enrolment claims, revoke devices",
    Scope.METRICS_READ: "scrape /metrics",
    Scope.ADMIN: "everything, including tokens and the audit log",
}

#: The scopes of ``lepton tokens create`` without ``--scope``: an operator's everyday set.
DEFAULT: Final = frozenset(
    {Scope.FLEET_READ, Scope.TASKS_WRITE, Scope.MODELS_WRITE, Scope.FL_WRITE}
)


def parse(names: Iterable[str]) -> frozenset[Scope]:
    """The scopes named (``ValueError`` naming an unknown one and listing the known)."""
    out: set[Scope] = set()
    for name in names:
        try:
            out.add(Scope(name.strip()))
        except ValueError:
            known = ", ".join(s.value for s in Scope)
            raise ValueError(f"unknown scope {name!r}; known: {known}") from None
    return frozenset(out)


def grants(held: Iterable[str], needed: Scope) -> bool:
    """Whether a holder of ``held`` may act under ``needed``."""
    held = set(held)
    return Scope.ADMIN in held or needed in held
