"""Every HTTP route has an owner: the bearer token check in front of the app.

A route declares what it needs with :func:`require` (``dependencies=[require(Scope.X)]``,
or as a parameter when the handler wants the caller). :class:`AuthGuard`, a pure ASGI
middleware outermost in the app, finds the route the router will pick and checks the
``Authorization: Bearer`` header *before* anything else runs (no body is read for an
unauthenticated caller):

- no route matches: the router answers (404/405); nothing was going to run;
- the route is in ``public`` (the health check): through;
- no token, or a token that is unknown, revoked or expired: **401** with
  ``WWW-Authenticate: Bearer`` and a reason;
- a token without the route's scope, or a device on an operator route: **403** naming the
  missing scope (RFC 6750 ``insufficient_scope``);
- a route that declares nothing: **403** ``undeclared_route`` (fails closed: a route added
  without an owner is unusable, not open).

The caller (:class:`~lepton.coordinator.auth.records.Principal`) is put in the request's
state for the route. RefusedErrors are counted (``lepton_auth_refusals_total{reason}``), logged,
and written to the audit log, at most ``AUDIT_BURST`` per address per minute (a flood of bad
tokens cannot fill the database; the rest are counted). Mutating calls (POST, PUT, PATCH,
DELETE) that get through are audited with their status as the answer begins, before it
leaves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final

from fastapi import Depends, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lepton.common.errors import LeptonError
from lepton.coordinator.api.limits import answer_and_linger
from lepton.coordinator.auth import credentials
from lepton.coordinator.auth.metrics import AuthMetrics
from lepton.coordinator.auth.records import Principal
from lepton.coordinator.auth.scopes import Scope as AuthScope
from lepton.coordinator.auth.scopes import grants
from lepton.coordinator.auth.store import AuthStore

log = logging.getLogger(__name__)

MUTATING: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
AUDIT_BURST: Final = 20  # refusal records per address per minute
HOW_TO_GET_ONE: Final = "create one with `lepton tokens create NAME` on the coordinator host"

BEARER: Final = HTTPBearer(
    auto_error=False,
    scheme_name="LeptonToken",
    description=(
        "An operator token (`lpo_...`, `lepton tokens create`) whose scopes cover the route,"
        " or on device routes an enrolled device's token (`lpd_...`)."
    ),
)


@dataclass(frozen=True, slots=True)
class Requirement:
    """What a route needs: an operator scope; ``devices``: enrolled devices may call it too
    (the route then checks what the device may see)."""

    scope: AuthScope
    devices: bool = False

    def __call__(
        self,
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
    ) -> Principal:
        principal = getattr(request.state, "principal", None)
        if not isinstance(principal, Principal):  # the guard did not run: fail closed
            raise TypeError("route reached without the auth guard")
        return principal


def require(scope: AuthScope, *, devices: bool = False) -> Any:
    """The dependency declaring that a route needs ``scope`` (see module doc)."""
    return Security(Requirement(scope, devices))


def requirement_of(route: BaseRoute) -> Requirement | None:
    """The requirement a route declares, if any."""
    if not isinstance(route, APIRoute):
        return None
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        if isinstance(dep.call, Requirement):
            return dep.call
        stack.extend(dep.dependencies)
    return None


class RefusedError(LeptonError):
    def __init__(self, status: int, reason: str, detail: str, scope: str | None = None) -> None:
        self.status, self.reason, self.detail, self.scope = status, reason, detail, scope
        super().__init__(detail)

    def response(self) -> JSONResponse:
        challenge = "Bearer"
        if self.status == 403 and self.scope:
            challenge = f'Bearer error="insufficient_scope", scope="{self.scope}"'
        elif self.status == 401 and self.reason != "missing_token":
            challenge = 'Bearer error="invalid_token"'
        body: dict[str, Any] = {"detail": self.detail, "reason": self.reason}
        if self.scope:
            body["scope"] = self.scope
        return JSONResponse(
            body,
            status_code=self.status,
            headers={"www-authenticate": challenge, "connection": "close"},
        )


class Authenticator:
    """Turns a bearer token into a :class:`Principal` (or a :class:`RefusedError`), counts and
    audits. ``insecure``: everyone is an administrator (``--insecure``, local experiments)."""

    def __init__(self, store: AuthStore, metrics: AuthMetrics, *, insecure: bool = False) -> None:
        self.store = store
        self.metrics = metrics
        self.insecure = insecure
        self._burst: dict[str, tuple[float, int]] = {}

    def authenticate(self, token: str | None, now: float | None = None) -> Principal:
        """The caller holding ``token`` (blocking: a database lookup)."""
        if self.insecure:
            return Principal("insecure", "insecure", frozenset({AuthScope.ADMIN.value}))
        if not token:
            raise RefusedError(
                401, "missing_token", f"this route needs a bearer token; {HOW_TO_GET_ONE}"
            )
        kind = credentials.kind_of(token)
        if kind is None or kind == "claim":
            raise RefusedError(401, "malformed_token", "not a Lepton operator or device token")
        now = time.time() if now is None else now
        h = credentials.digest(token)
        principal, why = self.store.operator(h, now) if kind == "operator" else self.store.device(h)
        if principal is None:
            words = why.replace("_", " ")
            raise RefusedError(401, why, f"{words}; {HOW_TO_GET_ONE}")
        return principal

    @staticmethod
    def authorize(principal: Principal, need: Requirement | None) -> None:
        """Whether ``principal`` may call a route that needs ``need`` (None: a route that
        declares no owner, which nobody may call)."""
        if need is None:
            raise RefusedError(403, "undeclared_route", "this route declares no owner")
        if principal.kind == "device":
            if not need.devices:
                raise RefusedError(
                    403,
                    "device_not_allowed",
                    "device tokens cannot call this route",
                    need.scope.value,
                )
            return
        if not grants(principal.scopes, need.scope):
            raise RefusedError(
                403,
                "missing_scope",
                f"token {principal.name!r} lacks scope {need.scope.value}",
                need.scope.value,
            )

    def refused(self, refusal: RefusedError, method: str, path: str, remote: str) -> None:
        """Count, log and (within the burst allowance) audit a refusal (blocking)."""
        self.metrics.refusals.labels(refusal.reason).inc()
        log.info(
            "refused %s %s from %s: %s %s", method, path, remote, refusal.status, refusal.reason
        )
        now = time.time()
        start, n = self._burst.get(remote, (now, 0))
        if now - start >= 60.0:
            start, n = now, 0
        self._burst[remote] = (start, n + 1)
        if len(self._burst) > 10_000:  # forget idle addresses
            self._burst = {k: v for k, v in self._burst.items() if now - v[0] < 60.0}
        if n >= AUDIT_BURST:
            self.metrics.audit_suppressed.inc()
            return
        try:
            self.store.audit(
                "anonymous",
                f"{method} {path}"[:64],
                path,
                f"{refusal.status} {refusal.reason}",
                remote=remote,
            )
        except Exception:  # the database being down must not turn a 401 into a 500
            log.warning("audit record of a refusal not written", exc_info=True)


class AuthGuard:
    """The middleware (see module doc). ``routes``: the app's routes in matching order."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Sequence[BaseRoute],
        auth: Authenticator,
        public: frozenset[str],
    ) -> None:
        self.app = app
        self.auth = auth
        self._routes = [(r, requirement_of(r), getattr(r, "path", "") in public) for r in routes]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        client = scope.get("client")
        remote = str(client[0]) if client else ""
        route = self._match(scope)
        if route is None or route[2]:
            await self.app(scope, receive, send)
            return
        need = route[1]
        token = _bearer(Headers(scope=scope).get("authorization", ""))
        try:
            principal = await asyncio.to_thread(self.auth.authenticate, token)
            self.auth.authorize(principal, need)
        except RefusedError as refusal:
            await asyncio.to_thread(self.auth.refused, refusal, method, path, remote)
            await _answer(refusal.response(), scope, receive, send)
            return
        self.auth.metrics.allowed.labels(principal.kind).inc()
        scope.setdefault("state", {})["principal"] = principal
        if method not in MUTATING:
            await self.app(scope, receive, send)
            return
        action = f"{method} {getattr(route[0], 'path', path)}"
        audited = False

        async def audit(status: int) -> None:
            nonlocal audited
            audited = True
            record = (principal.actor, action, path, "ok" if status < 400 else str(status))
            await asyncio.to_thread(_audit, self.auth.store, record, remote)

        async def sending(message: Message) -> None:
            # Recorded before the answer leaves: a client that saw its answer can find the
            # record, and a crash after it cannot lose one.
            if message["type"] == "http.response.start":
                await audit(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if not audited:  # the app failed before it began an answer
                await audit(500)

    def _match(self, scope: Scope) -> tuple[BaseRoute, Requirement | None, bool] | None:
        for entry in self._routes:
            match, _ = entry[0].matches(scope)
            if match is Match.FULL:
                return entry
        return None


async def _answer(response: JSONResponse, scope: Scope, receive: Receive, send: Send) -> None:
    """Send ``response``; a body the client is still sending is read and dropped (bounded)
    before the connection closes, so the client reads the answer instead of a reset."""
    headers = Headers(scope=scope)
    if not headers.get("content-length") and "chunked" not in headers.get("transfer-encoding", ""):
        await response(scope, receive, send)
        return
    await answer_and_linger(response, receive, send)


def _bearer(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _audit(store: AuthStore, record: tuple[str, str, str, str], remote: str) -> None:
    actor, action, target, outcome = record
    try:
        store.audit(actor, action, target, outcome, remote=remote)
    except Exception:
        log.warning("audit record of %s by %s not written", action, actor, exc_info=True)
