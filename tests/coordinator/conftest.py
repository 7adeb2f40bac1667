"""Fixtures for coordinator tests: a database of each backend, a store on it, a config."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter

from lepton.coordinator.api import ApiContext, create_app
from lepton.coordinator.auth.guard import Authenticator
from lepton.coordinator.auth.metrics import AuthMetrics
from lepton.coordinator.auth.store import AuthStore
from lepton.coordinator.config import Config
from lepton.coordinator.config import load as load_config
from lepton.coordinator.metrics import Metrics
from lepton.coordinator.runtime.routes import make_router as make_devices_router
from lepton.coordinator.service import Coordinator
from lepton.coordinator.store import RetryPolicy, Store
from lepton.coordinator.store.schema import Base
from lepton.coordinator.tasks.routes import make_router as make_tasks_router
from tests.support.api import api_client, bearer, new_operator_token, operator_token
from tests.support.broker import Broker

__all__ = ["api_client", "cli_token", "eventually", "in_process_api", "operator_token"]

PG_DSN = os.environ.get("LEPTON_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

_pg_state: dict[str, str | None] = {}


def postgres_unavailable() -> str | None:
    """None when the test PostgreSQL answers, else why not (checked once per session)."""
    if "reason" not in _pg_state:
        try:
            import psycopg
            from sqlalchemy.engine import make_url

            url = make_url(PG_DSN)
            conn = psycopg.connect(
                host=url.host,
                port=url.port or 5432,
                dbname=url.database,
                user=url.username,
                password=url.password,
                connect_timeout=2,
            )
            conn.close()
            _pg_state["reason"] = None
        except Exception as exc:
            _pg_state["reason"] = f"PostgreSQL at {PG_DSN} does not answer: {exc}"
    return _pg_state["reason"]


def _pg_admin(sql: str, *, schema: str | None = None) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(PG_DSN)
    with psycopg.connect(
        host=url.host,
        port=url.port or 5432,
        dbname=url.database,
        user=url.username,
        password=url.password,
        autocommit=True,
        options=f"-csearch_path={schema}" if schema else None,
    ) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def _new_schema_url() -> str:
    schema = f"lepton_test_{uuid.uuid4().hex[:12]}"
    _pg_admin(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_DSN else "?"
    # Commits need not reach the disk in tests; durability is not what they check.
    return f"{PG_DSN}{sep}options=-csynchronous_commit%3Doff%20-csearch_path%3D{schema}"


def _schema_of(url: str) -> str:
    return url.rsplit("%3D", 1)[1]


def _drop_schema(url: str) -> None:
    _pg_admin(f"DROP SCHEMA IF EXISTS {_schema_of(url)} CASCADE")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL to the test PostgreSQL whose search_path is a fresh schema, dropped afterwards."""
    reason = postgres_unavailable()
    if reason is not None:
        pytest.skip(reason)
    url = _new_schema_url()
    try:
        yield url
    finally:
        _drop_schema(url)


@pytest.fixture(scope="session")
def pg_shared_url() -> Iterator[str]:
    """One schema with the tables created, shared by the tests of a session (see ``db_url``)."""
    reason = postgres_unavailable()
    if reason is not None:
        pytest.skip(reason)
    url = _new_schema_url()
    Store.open(url).close()
    try:
        yield url
    finally:
        _drop_schema(url)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store test runs once on a SQLite file and once on PostgreSQL (tables emptied)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'coordinator.db'}"
    url = str(request.getfixturevalue("pg_shared_url"))
    tables = ", ".join(Base.metadata.tables)
    _pg_admin(f"TRUNCATE {tables} CASCADE", schema=_schema_of(url))
    return url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store.open(
        db_url,
        retry=RetryPolicy(base_s=10.0, max_s=100.0, jitter=0.0),
        capacity_history=5,
        sqlite_synchronous="normal",
    )
    yield s
    s.close()


# ---------------------------------------------------------------- the HTTP app in-process


@contextlib.asynccontextmanager
async def in_process_api(
    store: Store,
    metrics: Metrics | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    raise_app_exceptions: bool = False,
    on_submit: Callable[[], None] = lambda: None,
    routers: Sequence[APIRouter] = (),
    scopes: Sequence[str] = ("admin",),
    **context: Any,
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the coordinator's HTTP app over ``store``, served in-process (no socket),
    with the device and task routes mounted as the service mounts them, then ``routers``.
    ``overrides``: config keys; ``on_submit``: the task routes' wake-up; ``context``:
    further :class:`ApiContext` fields. By default a 500 is an answer to compare, not an
    exception. The client holds an operator token with ``scopes`` (none: no token)."""
    cfg = load_config(env={}, overrides={"instance_id": "api-test", **(overrides or {})})
    metrics = metrics if metrics is not None else Metrics()
    auth_store = AuthStore(store.engine)
    context.setdefault("auth", Authenticator(auth_store, AuthMetrics(metrics.registry)))
    headers = bearer(new_operator_token(store, scopes)) if scopes else {}
    app = create_app(
        ApiContext(
            config=cfg,
            devices=store.devices,
            tasks=store.tasks,
            ping=store.ping,
            metrics=metrics,
            started_at=time.time(),
            routers=[
                make_devices_router(cfg, store.devices, store.tasks),
                make_tasks_router(
                    cfg, store.tasks, store.cancels, store.results, metrics, on_submit=on_submit
                ),
                *routers,
            ],
            **context,
        )
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers=headers
    ) as client:
        yield client


# ---------------------------------------------------------------- a running coordinator


def coordinator_config(tmp_path: Path, broker_port: int, **overrides: Any) -> Config:
    """A config for tests: SQLite in tmp_path, free HTTP port, short intervals."""
    base: dict[str, Any] = {
        "instance_id": "test-coordinator",
        "data_dir": str(tmp_path / "coordinator"),
        "mqtt.port": broker_port,
        "mqtt.reconnect_min_s": 0.2,
        "mqtt.reconnect_max_s": 1.0,
        "mqtt.accounts": "none",  # the plain test broker has no dynamic security plugin
        "http.port": 0,
        "database.sqlite_synchronous": "normal",
        "registry.flush_interval_s": 0.05,
        "scheduler.batch_interval_s": 0.1,
        "scheduler.time_budget_s": 0.2,
        "tasks.retry_backoff_s": 0.1,
        "tasks.retry_backoff_max_s": 0.5,
        "tasks.redispatch_after_s": 1.0,
        "liveness.max_check_s": 0.5,
        "replica.lease_s": 3.0,
        # Test fleets write their evaluation sets under tmp_path.
        "fl.eval_dir": str(tmp_path),
    }
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(env={}, overrides=base)


@pytest.fixture
def make_coordinator(
    broker: Broker, tmp_path: Path
) -> Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]]:
    """``async with make_coordinator(**overrides) as c:`` a running, connected coordinator.
    Its API wants an operator token: ``api_client(c)`` (``scopes=`` to narrow it) is a
    client holding one, ``operator_token(c)`` the token (:mod:`tests.support.api`), and
    ``cli_token(monkeypatch, c)`` hands one to in-process ``lepton`` commands."""

    @contextlib.asynccontextmanager
    async def make(**overrides: Any) -> AsyncIterator[Coordinator]:
        cfg = coordinator_config(tmp_path, broker.port, **overrides)
        async with Coordinator(cfg) as c:
            assert await c.link.wait_connected(10), "coordinator did not connect to the broker"
            yield c

    return make


@pytest.fixture
async def coordinator(
    make_coordinator: Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]],
) -> AsyncIterator[Coordinator]:
    async with make_coordinator() as c:
        yield c


def cli_token(
    monkeypatch: pytest.MonkeyPatch, c: Coordinator, scopes: Sequence[str] = ("admin",)
) -> str:
    """Give the ``lepton`` CLI run in this process an operator token of ``c`` through
    ``$LEPTON_TOKEN`` (and no token file: ``$XDG_CONFIG_HOME`` points nowhere); the token."""
    token = operator_token(c, scopes)
    monkeypatch.setenv("LEPTON_TOKEN", token)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(Path(c.config.data_dir) / "no-xdg"))
    return token


async def eventually(
    check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """Poll ``check`` (sync, run in a thread, or async) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        last = result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)
