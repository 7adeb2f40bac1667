"""The coordinator's HTTP API as the demo uses it: devices, tasks, deploys, explanations, FL
jobs."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from lepton.common.errors import LeptonError
from lepton.coordinator.tasks.states import TERMINAL
from lepton.protocol import routes


class DemoError(LeptonError, RuntimeError):
    """A stage of the demo could not go on; the message says why."""


class Api:
    """JSON over HTTPS to one coordinator, verified with ``verify`` (the fleet CA's context),
    with an operator ``token``; errors become :class:`DemoError`."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        verify: ssl.SSLContext | bool = True,
        timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout, headers=headers, verify=verify
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, ok404: bool = False, **kw: Any) -> Any:
        """The decoded JSON body; None for a 404 when ``ok404``."""
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise DemoError(f"{method} {path}: the coordinator did not answer ({exc})") from exc
        if r.status_code == 404 and ok404:
            return None
        if r.status_code >= 400:
            raise DemoError(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return r.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, json=body)

    # ------------------------------------------------------------------ views

    def devices(self) -> list[dict[str, Any]]:
        return list(self.get(routes.DEVICES, limit=10_000))

    def tasks(self, kind: str) -> list[dict[str, Any]]:
        return list(self.get(routes.TASKS, kind=kind, limit=10_000))

    def task(self, task_id: str) -> dict[str, Any]:
        return dict(self.get(routes.path(routes.TASK, task_id=task_id)))

    def explain(self, task_id: str) -> dict[str, Any]:
        return dict(self.get(routes.path(routes.TASK_EXPLAIN, task_id=task_id)))

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.post(routes.TASKS, body))

    def create_claim(self, *, uses: int, expires_in_s: float = 3600.0) -> str:
        """A new enrolment claim good for ``uses`` devices; its token (shown only now)."""
        made = self.post(routes.CLAIMS, {"count": 1, "uses": uses, "expires_in_s": expires_in_s})
        return str(made["claims"][0]["token"])

    def deploy(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """The coordinator's deploy of model ``name`` (``lepton models deploy``): the model
        version and one deploy task per device."""
        return dict(self.post(routes.path(routes.MODEL_DEPLOY, name=name), body))

    # ------------------------------------------------------------------ waiting

    def wait_tasks(
        self,
        kind: str,
        ids: Iterable[str],
        *,
        timeout: float,
        on_progress: Callable[[int, int], None] | None = None,
        check: Callable[[], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Until every task in ``ids`` is finished; their records, in the order of ``ids``.

        ``on_progress(finished, total)`` after each look; ``check`` raises to give up early
        (a process of the stack died).
        """
        wanted = list(ids)
        deadline = time.monotonic() + timeout
        while True:
            by_id = {t["id"]: t for t in self.tasks(kind)}
            missing = [i for i in wanted if i not in by_id]
            if missing:
                raise DemoError(f"{len(missing)} {kind} tasks are not known to the coordinator")
            done = sum(by_id[i]["state"] in TERMINAL for i in wanted)
            if on_progress is not None:
                on_progress(done, len(wanted))
            if done == len(wanted):
                return [by_id[i] for i in wanted]
            if time.monotonic() > deadline:
                raise DemoError(
                    f"{len(wanted) - done} of {len(wanted)} {kind} tasks unfinished after "
                    f"{timeout:g}s"
                )
            if check is not None:
                check()
            time.sleep(0.25)
