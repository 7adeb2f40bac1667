"""``lepton tokens create|ls|revoke`` on the database, the token the CLI sends (``--token``,
``$LEPTON_TOKEN``, the 0600 token file) and ``lepton audit``, against a running coordinator."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select

from lepton.coordinator.auth import tables
from lepton.coordinator.cli import main
from lepton.coordinator.cli.exitcodes import EXIT_OK, EXIT_UNAUTHORIZED, EXIT_USAGE
from lepton.coordinator.service import Coordinator
from lepton.protocol import routes
from tests.support.api import bearer

MakeCoordinator = Callable[..., AbstractAsyncContextManager[Coordinator]]


@pytest.fixture(autouse=True)
def no_ambient_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No token from the environment or the user's own config; ``XDG_CONFIG_HOME`` in
    tmp_path (returned)."""
    monkeypatch.delenv("LEPTON_TOKEN", raising=False)
    monkeypatch.delenv("LEPTON_API", raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # tables unwrapped
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    return xdg


@pytest.fixture
async def coordinator(make_coordinator: MakeCoordinator) -> AsyncIterator[Coordinator]:
    async with make_coordinator() as c:
        yield c


def lepton(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def alepton(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The CLI in a worker thread: the coordinator shares this event loop."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def database_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def test_create_shows_the_token_once_and_stores_only_its_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "c.db"
    url = f"sqlite:///{db}"
    code, out, err = lepton(
        capsys, "tokens", "create", "ops", "--scope", "fleet:read", "--scope", "tasks:write",
        "--database", url,
    )  # fmt: skip
    assert code == EXIT_OK, err
    token = out.strip()
    assert token.startswith("lpo_")
    assert len(token) > 40
    assert "shown once" in err
    assert token not in err
    engine = create_engine(url)
    with engine.connect() as conn:
        row = conn.execute(select(tables.tokens)).mappings().one()
        audit = conn.execute(select(tables.audit)).mappings().all()
    engine.dispose()
    assert row["name"] == "ops"
    assert row["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert sorted(row["scopes"]) == ["fleet:read", "tasks:write"]
    assert token.encode() not in database_bytes(db)
    assert [(a["actor"], a["action"], a["target"]) for a in audit] == [
        ("cli", "tokens create", "ops")
    ]
    # The default scopes are the everyday set, not admin.
    code, out, _ = lepton(capsys, "tokens", "create", "daily", "--database", url, "--json")
    made = json.loads(out)
    assert made["token"].startswith("lpo_")
    assert "admin" not in made["scopes"]
    assert made["saved_to"] is None
    # A name is used once; an unknown scope is a usage error; neither prints a token.
    code, out, err = lepton(capsys, "tokens", "create", "ops", "--database", url)
    assert code == EXIT_USAGE
    assert "a token named 'ops' exists" in err
    assert "lpo_" not in out
    code, out, err = lepton(capsys, "tokens", "create", "x", "--scope", "root", "--database", url)
    assert code == EXIT_USAGE
    assert "unknown scope 'root'" in err
    assert "lpo_" not in out


def test_ls_shows_each_tokens_state_and_never_a_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    secrets = []
    for name, extra in (("live", ()), ("gone", ()), ("brief", ("--expires-in", "0.2s"))):
        code, out, _ = lepton(capsys, "tokens", "create", name, *extra, "--database", url)
        assert code == EXIT_OK
        secrets.append(out.strip())
    assert lepton(capsys, "tokens", "revoke", "gone", "--database", url)[0] == EXIT_OK
    time.sleep(0.3)
    code, out, _ = lepton(capsys, "tokens", "ls", "--database", url, "--json")
    listed = {t["name"]: t for t in json.loads(out)}
    assert {n: t["state"] for n, t in listed.items()} == {
        "live": "active",
        "gone": "revoked",
        "brief": "expired",
    }
    assert all("token" not in t and "token_hash" not in t for t in listed.values())
    code, table, _ = lepton(capsys, "tokens", "ls", "--database", url)
    assert code == EXIT_OK
    for word in ("live", "gone", "brief", "active", "revoked", "expired"):
        assert word in table
    for secret in secrets:
        assert secret not in out + table
        assert hashlib.sha256(secret.encode()).hexdigest() not in out + table
    code, _, err = lepton(capsys, "tokens", "revoke", "nobody", "--database", url)
    assert code == 3
    assert "no token named 'nobody'" in err


def test_save_writes_the_token_owner_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ambient_token: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    os.umask(0o022)
    code, out, err = lepton(capsys, "tokens", "create", "me", "--save", "--database", url)
    assert code == EXIT_OK
    path = no_ambient_token / "lepton" / "token"
    assert str(path) in err
    assert path.read_text().strip() == out.strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0


# ---------------------------------------------------------------- against a running one


async def test_revoke_refuses_the_token_at_once_on_a_running_coordinator(
    coordinator: Coordinator, capsys: pytest.CaptureFixture[str]
) -> None:
    url = coordinator.config.database_url
    code, out, _ = await alepton(capsys, "tokens", "create", "temp", "--database", url, "--json")
    assert code == EXIT_OK
    token = json.loads(out)["token"]
    async with httpx.AsyncClient(base_url=coordinator.api_url or "", headers=bearer(token)) as api:
        assert (await api.get(routes.DEVICES)).status_code == 200
        code, _, _ = await alepton(capsys, "tokens", "revoke", "temp", "--database", url)
        assert code == EXIT_OK
        r = await api.get(routes.DEVICES)
        assert (r.status_code, r.json()["reason"]) == (401, "revoked_token")


async def test_the_cli_without_a_token_says_how_to_get_one(
    coordinator: Coordinator, capsys: pytest.CaptureFixture[str]
) -> None:
    api = coordinator.api_url or ""
    code, out, err = await alepton(capsys, "--api", api, "devices", "ls")
    assert code == EXIT_UNAUTHORIZED
    assert "lepton tokens create NAME --save" in err
    assert "LEPTON_TOKEN" in err
    assert out == ""


async def test_the_token_from_flag_environment_or_file(
    coordinator: Coordinator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_ambient_token: Path,
) -> None:
    api = coordinator.api_url or ""
    url = coordinator.config.database_url
    _, out, _ = await alepton(capsys, "tokens", "create", "reader", "--scope", "fleet:read",
                              "--database", url)  # fmt: skip
    token = out.strip()
    code, _, err = await alepton(capsys, "--api", api, "--token", token, "devices", "ls")
    assert code == EXIT_OK, err
    code, _, err = await alepton(capsys, "devices", "ls", "--api", api, "--token", token)
    assert code == EXIT_OK, err
    # A bad token is refused with its reason (exit 9 too).
    code, _, err = await alepton(capsys, "--api", api, "--token", "lpo_nope", "devices", "ls")
    assert code == EXIT_UNAUTHORIZED
    assert "unknown token" in err
    # A token without the scope: 403, exit 9, naming the scope.
    code, _, err = await alepton(capsys, "--api", api, "--token", token, "tasks", "submit", "echo")
    assert code == EXIT_UNAUTHORIZED
    assert "tasks:write" in err
    monkeypatch.setenv("LEPTON_TOKEN", token)
    code, _, err = await alepton(capsys, "--api", api, "devices", "ls")
    assert code == EXIT_OK, err
    monkeypatch.delenv("LEPTON_TOKEN")
    path = no_ambient_token / "lepton" / "token"
    path.parent.mkdir(parents=True)
    path.write_text(token + "\n")
    path.chmod(0o644)
    code, _, err = await alepton(capsys, "--api", api, "devices", "ls")
    assert code != EXIT_OK
    assert "readable by others" in err
    assert "chmod 600" in err
    path.chmod(0o600)
    code, _, err = await alepton(capsys, "--api", api, "devices", "ls")
    assert code == EXIT_OK, err


async def test_lepton_audit_lists_the_records(
    coordinator: Coordinator, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    api = coordinator.api_url or ""
    url = coordinator.config.database_url
    _, out, _ = await alepton(capsys, "tokens", "create", "boss", "--scope", "admin",
                              "--database", url)  # fmt: skip
    monkeypatch.setenv("LEPTON_TOKEN", out.strip())
    code, out, _ = await alepton(capsys, "--api", api, "--json", "tasks", "submit", "echo")
    assert code == EXIT_OK
    await alepton(capsys, "--api", api, "--token", "lpo_wrong", "devices", "ls")
    code, out, err = await alepton(capsys, "--api", api, "--json", "audit")
    assert code == EXIT_OK, err
    records = json.loads(out)
    seen = [(r["actor"], r["action"], r["outcome"]) for r in records]
    assert ("operator:boss", "POST /v1/tasks", "ok") in seen
    assert ("anonymous", "GET /v1/devices", "401 unknown_token") in seen
    assert ("cli", "tokens create", "ok") in seen
    code, out, _ = await alepton(capsys, "--api", api, "--json", "audit", "--actor", "boss")
    assert {r["actor"] for r in json.loads(out)} == {"operator:boss"}
    code, table, _ = await alepton(capsys, "--api", api, "audit", "--since", "1h")
    assert code == EXIT_OK
    assert "POST /v1/tasks" in table
    # The audit log is the administrator's: a token without admin is refused.
    _, out, _ = await alepton(capsys, "tokens", "create", "peon", "--database", url)
    code, _, err = await alepton(capsys, "--api", api, "--token", out.strip(), "audit")
    assert code == EXIT_UNAUTHORIZED
    assert "admin" in err
