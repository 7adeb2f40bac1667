"""The routes a coordinator's HTTP app really serves, found by walking the app (so a route
added later is checked without anyone listing it), and requests that reach each one."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from starlette.routing import BaseRoute, Route

from lepton.coordinator.auth.guard import Requirement, requirement_of
from lepton.coordinator.service import Coordinator
from lepton.protocol import routes

#: Open to everyone by design: the health check and the API's own description.
# The enrolment route is open to the guard: the claim in its Authorization header is its
# credential, checked by the route (tests/coordinator/auth/test_enrolment.py).
PUBLIC = frozenset(
    {routes.HEALTH, routes.ENROLL, "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)
#: What the guard answers with (the route's own refusals have other reasons).
GUARD_REASONS = frozenset(
    {
        "missing_token",
        "malformed_token",
        "unknown_token",
        "revoked_token",
        "expired_token",
        "revoked_device",
        "device_not_allowed",
        "missing_scope",
        "undeclared_route",
    }
)
_PARAM = re.compile(r"{([^}:]+)(?::[^}]+)?}")


@dataclass(frozen=True, slots=True)
class Served:
    """One method of one route: where to send it and what it declares it needs."""

    method: str
    template: str
    need: Requirement | None

    @property
    def path(self) -> str:
        """The template with each parameter filled by a value its converter takes."""
        return _PARAM.sub("1", self.template)

    def __str__(self) -> str:
        return f"{self.method} {self.template}"


def walk(entries: list[BaseRoute]) -> Iterator[Route]:
    """Every :class:`Route` under ``entries``, into included routers (FastAPI keeps one as
    an entry holding ``original_router``)."""
    for entry in entries:
        inner = getattr(entry, "original_router", None)
        if inner is not None:
            yield from walk(list(inner.routes))
        elif isinstance(entry, Route):
            yield entry


def served(app: FastAPI) -> list[Served]:
    """Every (method, route) ``app`` answers, HEAD included where GET is."""
    out: list[Served] = []
    for route in walk(list(app.router.routes)):
        for method in sorted(route.methods or ()):
            out.append(Served(method, route.path, requirement_of(route)))
    return out


def app_of(c: Coordinator) -> FastAPI:
    assert c.http is not None, "this coordinator serves no HTTP"
    app = c.http.app
    assert isinstance(app, FastAPI)
    return app


def protected(c: Coordinator) -> list[Served]:
    return [s for s in served(app_of(c)) if s.template not in PUBLIC]


def reason(body: bytes) -> Any:
    """The ``reason`` of a JSON answer, if it has one."""
    import json

    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value.get("reason") if isinstance(value, dict) else None
