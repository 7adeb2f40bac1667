"""Who may reach the local endpoint: loopback-only TCP, the socket's mode and group, the token.

Each endpoint here is built from a loaded agent config (:meth:`Endpoint.from_config`, as the
daemon builds it) and reached over real TCP and Unix sockets.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from lepton.agent.cli import main as agent_main
from lepton.agent.config import AgentConfig, load_config
from lepton.agent.inference.endpoint import Endpoint
from lepton.agent.inference.manager import ModelManager
from lepton.agent.inference.unixsock import SocketPathError
from lepton.agent.metrics import Counters
from lepton.common.errors import ConfigError
from tests.agent.inference.conftest import Linear

TOKEN = "s3cr3t-token-0123456789abcdef"


def _config(tmp_path: Path, endpoint: str, env: dict[str, str] | None = None) -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(f"[endpoint]\n{endpoint}\n")
    return load_config(path, env=env or {})


def _token_file(tmp_path: Path, mode: int = 0o600, token: str = TOKEN) -> Path:
    path = tmp_path / "endpoint.token"
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


def _refused(tmp_path: Path, endpoint: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, endpoint, env)
    return info.value


# ---------------------------------------------------------------- TCP: loopback only


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "", "[2001:db8::1]"])
def test_a_host_that_is_not_loopback_is_refused_at_config_load(tmp_path: Path, host: str) -> None:
    err = _refused(tmp_path, f'host = "{host}"\nport = 0')
    assert err.key == "endpoint.host"
    assert "not a loopback address" in str(err)
    assert "endpoint.allow_remote = true" in str(err)  # says how to allow it


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "localhost"])
async def test_loopback_hosts_are_accepted_and_bound(
    tmp_path: Path, served: ModelManager, host: str
) -> None:
    cfg = _config(tmp_path, f'host = "{host}"\nport = 0')
    try:
        endpoint = Endpoint.from_config(served, cfg.endpoint)
        async with endpoint:
            assert endpoint.port
    except OSError as exc:  # ::1 on a host without IPv6
        pytest.skip(f"cannot bind {host}: {exc}")
    # A host that is not loopback is not checked while no TCP port is set (TCP is off).
    assert _config(tmp_path, 'host = "0.0.0.0"').endpoint.port is None


def test_allow_remote_needs_a_token(tmp_path: Path) -> None:
    err = _refused(tmp_path, 'host = "0.0.0.0"\nport = 0\nallow_remote = true')
    assert err.key == "endpoint.allow_remote"
    assert "endpoint.token_file" in str(err)
    tokened = _config(
        tmp_path,
        'host = "0.0.0.0"\nport = 0\nallow_remote = true',
        env={"LEPTON_ENDPOINT_TOKEN": TOKEN},
    )
    assert tokened.endpoint.allow_remote
    assert TOKEN not in repr(tokened)  # the secret stays out of logs of the config


async def test_an_endpoint_built_by_hand_still_refuses_a_wide_bind(served: ModelManager) -> None:
    with pytest.raises(SocketPathError, match="not loopback"):
        async with Endpoint(served, host="0.0.0.0", port=0):
            pass
    with pytest.raises(ValueError, match="needs a token"):
        Endpoint(served, host="0.0.0.0", port=0, allow_remote=True)


# ---------------------------------------------------------------- the Unix socket


def _own_group() -> str:
    return grp.getgrgid(os.getegid()).gr_name


@pytest.mark.parametrize(
    ("mode_key", "want"), [('"0640"', 0o640), ("0o600", 0o600), ('"660"', 0o660)]
)
async def test_socket_gets_the_configured_mode_and_group(
    served: ModelManager, short_dir: Path, mode_key: str, want: int
) -> None:
    path = short_dir / "run" / "infer.sock"
    group = _own_group()
    cfg = _config(
        short_dir, f'socket = "{path}"\nsocket_mode = {mode_key}\nsocket_group = "{group}"'
    )
    assert cfg.endpoint.mode == want
    async with Endpoint.from_config(served, cfg.endpoint):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == want
        assert st.st_gid == grp.getgrnam(group).gr_gid
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            assert (await client.get("/v1/health")).status_code == 200
    assert not path.exists()


async def test_socket_group_by_gid_and_default_group(served: ModelManager, short_dir: Path) -> None:
    path = short_dir / "infer.sock"
    by_gid = _config(short_dir, f'socket = "{path}"\nsocket_group = {os.getegid()}')
    default = _config(short_dir, f'socket = "{path}"')
    for cfg in (by_gid, default):
        async with Endpoint.from_config(served, cfg.endpoint):
            st = os.stat(path)
            assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (os.getegid(), 0o660)


async def test_the_socket_is_never_looser_than_configured(
    served: ModelManager, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen at the moment the mode is applied, under a process umask of 0: the file has
    owner-only bits and nobody can connect yet (it does not listen)."""
    path = short_dir / "infer.sock"
    seen: list[tuple[int, str]] = []
    real_chmod = os.chmod

    def watching_chmod(target: Any, mode: int) -> None:
        before = stat.S_IMODE(os.stat(target).st_mode)
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(target))
                seen.append((before, "accepted"))
            except ConnectionRefusedError:
                seen.append((before, "refused"))
        real_chmod(target, mode)

    monkeypatch.setattr("lepton.agent.inference.unixsock.os.chmod", watching_chmod)
    old = os.umask(0)
    try:
        cfg = _config(short_dir, f'socket = "{path}"\nsocket_mode = "0660"').endpoint
        async with Endpoint.from_config(served, cfg):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
            assert os.umask(0) == 0  # the process umask is back as it was before the bind
    finally:
        os.umask(old)
    assert seen == [(0o600, "refused")]


@pytest.mark.parametrize(
    ("line", "key", "says"),
    [
        ('socket_group = "lepton-no-such-group"', "endpoint.socket_group", "no group"),
        ("socket_group = 3999999", "endpoint.socket_group", "no group"),
        ("socket_mode = 660", "endpoint.socket_mode", "not permission bits"),
        ('socket_mode = "0999"', "endpoint.socket_mode", "not an octal mode"),
        ('socket_mode = "rw-rw----"', "endpoint.socket_mode", "not an octal mode"),
        ('socket_mode = "0666"', "endpoint.socket_mode", "every local user"),
    ],
)
def test_bad_socket_settings_are_config_errors(
    short_dir: Path, line: str, key: str, says: str
) -> None:
    err = _refused(short_dir, f'socket = "{short_dir}/s.sock"\n{line}')
    assert err.key == key
    assert says in str(err)


def test_socket_mode_from_the_environment(short_dir: Path) -> None:
    cfg = _config(
        short_dir, f'socket = "{short_dir}/s.sock"', env={"LEPTON_ENDPOINT_SOCKET_MODE": "0600"}
    )
    assert cfg.endpoint.mode == 0o600
    # World-connectable is allowed once a token guards it.
    env = {"LEPTON_ENDPOINT_SOCKET_MODE": "0666", "LEPTON_ENDPOINT_TOKEN": TOKEN}
    assert _config(short_dir, f'socket = "{short_dir}/s.sock"', env=env).endpoint.mode == 0o666


async def test_a_path_that_is_not_a_socket_or_is_in_use_is_left_alone(
    served: ModelManager, short_dir: Path
) -> None:
    path = short_dir / "infer.sock"
    cfg = _config(short_dir, f'socket = "{path}"').endpoint
    path.write_text("precious")
    with pytest.raises(SocketPathError, match="is not a socket; not removing it"):
        async with Endpoint.from_config(served, cfg):
            pass
    assert path.read_text() == "precious"
    path.unlink()
    (short_dir / "dir.sock").mkdir()
    with pytest.raises(SocketPathError, match="is not a socket"):
        async with Endpoint.from_config(
            served, _config(short_dir, f'socket = "{short_dir}/dir.sock"').endpoint
        ):
            pass
    assert (short_dir / "dir.sock").is_dir()
    # A stale socket (nobody listening) is replaced; a live one is not taken over.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    async with Endpoint.from_config(served, cfg):
        with pytest.raises(SocketPathError, match="in use"):
            async with Endpoint.from_config(served, cfg):
                pass
        assert path.is_socket()  # the first endpoint's socket survived the second's attempt
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            assert (await client.get("/v1/health")).status_code == 200


def _connect_as(uid: int, gid: int, path: Path) -> int:
    """Exit status of a forked child that drops to ``uid``/``gid`` (no other groups) and
    connects to ``path``: 0 connected, 13 permission denied, 1 anything else."""
    pid = os.fork()
    if pid == 0:  # the child: no Python-level cleanup, only _exit
        code = 1
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as other users")
async def test_the_mode_and_group_decide_who_connects(
    served: ModelManager, short_dir: Path
) -> None:
    short_dir.chmod(0o755)  # others may reach the directory; the socket's own bits decide
    path = short_dir / "infer.sock"
    outsider = 65534  # nobody / nogroup
    nogroup = (
        grp.getgrgid(outsider).gr_name if outsider in [g.gr_gid for g in grp.getgrall()] else None
    )
    if nogroup is None:
        pytest.skip("no group 65534 here")
    closed = _config(short_dir, f'socket = "{path}"\nsocket_group = {os.getegid()}').endpoint
    async with Endpoint.from_config(served, closed):
        assert _connect_as(outsider, outsider, path) == 13
    member = _config(short_dir, f'socket = "{path}"\nsocket_group = "{nogroup}"').endpoint
    async with Endpoint.from_config(served, member):
        assert os.stat(path).st_gid == outsider
        assert _connect_as(outsider, outsider, path) == 0


# ---------------------------------------------------------------- the token


def test_token_settings_are_checked_at_config_load(tmp_path: Path) -> None:
    loose = _token_file(tmp_path, 0o644)
    err = _refused(tmp_path, f'port = 0\ntoken_file = "{loose}"')
    assert err.key == "endpoint.token_file"
    assert "mode 0644" in str(err)
    assert "chmod 600" in str(err)
    assert (
        _refused(tmp_path, f'port = 0\ntoken_file = "{tmp_path}/none"').key == "endpoint.token_file"
    )
    short = _token_file(tmp_path, 0o600, token="short")
    assert "at least 16" in str(_refused(tmp_path, f'port = 0\ntoken_file = "{short}"'))
    # The token itself never comes from the config file or a flag.
    assert "LEPTON_ENDPOINT_TOKEN" in str(_refused(tmp_path, f'port = 0\ntoken = "{TOKEN}"'))
    with pytest.raises(ConfigError, match="process list"):
        load_config(None, env={}, overrides={"endpoint.token": TOKEN})
    both = _token_file(tmp_path)
    err = _refused(
        tmp_path, f'port = 0\ntoken_file = "{both}"', env={"LEPTON_ENDPOINT_TOKEN": TOKEN}
    )
    assert "both set" in str(err)


def test_the_agent_refuses_to_start_with_a_readable_token_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loose = _token_file(tmp_path, 0o644)
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nstate_dir = "{tmp_path}/state"\n[endpoint]\nport = 0\ntoken_file = "{loose}"\n'
    )
    assert agent_main(["run", "--config", str(path)]) == 2
    assert "endpoint.token_file" in capsys.readouterr().err


async def test_a_token_file_loosened_after_load_stops_the_endpoint(
    tmp_path: Path, served: ModelManager
) -> None:
    token = _token_file(tmp_path)
    cfg = _config(tmp_path, f'port = 0\ntoken_file = "{token}"')
    token.chmod(0o640)
    with pytest.raises(ConfigError, match="mode 0640"):
        Endpoint.from_config(served, cfg.endpoint)


@pytest.fixture
async def guarded(
    tmp_path: Path, short_dir: Path, served: ModelManager
) -> AsyncIterator[tuple[Endpoint, Counters]]:
    token = _token_file(tmp_path, 0o400)
    cfg = _config(tmp_path, f'port = 0\nsocket = "{short_dir}/g.sock"\ntoken_file = "{token}"')
    counters = Counters()
    async with Endpoint.from_config(served, cfg.endpoint, counters=counters) as ep:
        yield ep, counters


def _clients(ep: Endpoint) -> list[httpx.AsyncClient]:
    assert ep.socket_path is not None
    uds = httpx.AsyncHTTPTransport(uds=str(ep.socket_path))
    return [
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{ep.port}"),
        httpx.AsyncClient(transport=uds, base_url="http://agent"),
    ]


def _unauthorized(resp: httpx.Response, reason: str) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert resp.json()["error"]["code"] == f"token_{reason}"


async def test_requests_need_the_token(guarded: tuple[Endpoint, Counters], linear: Linear) -> None:
    ep, counters = guarded
    body: dict[str, Any] = {"inputs": linear.x[:2].tolist()}
    route = "/v1/models/clf:predict"
    for client in _clients(ep):
        async with client:
            _unauthorized(await client.post(route, json=body), "missing")
            _unauthorized(
                await client.post(route, json=body, headers={"authorization": "Bearer nope"}),
                "wrong",
            )
            near = TOKEN[:-1] + "X"  # same length, last character differs
            _unauthorized(
                await client.post(route, json=body, headers={"authorization": f"Bearer {near}"}),
                "wrong",
            )
            _unauthorized(
                await client.get("/v1/models", headers={"authorization": f"Basic {TOKEN}"}),
                "malformed",
            )
            ok = await client.post(route, json=body, headers={"authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 200, ok.text
            np.testing.assert_allclose(
                ok.json()["outputs"]["logits"], linear.logits(linear.x[:2]), atol=1e-4
            )
            listed = await client.get("/v1/models", headers={"authorization": f"bearer {TOKEN}"})
            assert listed.status_code == 200
    assert counters["endpoint.unauthorized.missing"] == 2
    assert counters["endpoint.unauthorized.wrong"] == 4
    assert counters["endpoint.unauthorized.malformed"] == 2


async def test_health_is_open_without_names_unless_closed(
    guarded: tuple[Endpoint, Counters], tmp_path: Path, served: ModelManager
) -> None:
    ep, counters = guarded
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ep.port}") as client:
        anonymous = await client.get("/v1/health")
        assert anonymous.json() == {"status": "ok"}  # no model names without the token
        named = await client.get("/v1/health", headers={"authorization": f"Bearer {TOKEN}"})
        assert named.json() == {"status": "ok", "models": ["clf"]}
        _unauthorized(
            await client.get("/v1/health", headers={"authorization": "Bearer guess"}), "wrong"
        )
    assert counters["endpoint.unauthorized.wrong"] == 1
    cfg = _config(tmp_path, "port = 0\nopen_health = false", env={"LEPTON_ENDPOINT_TOKEN": TOKEN})
    async with (
        Endpoint.from_config(served, cfg.endpoint) as closed,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{closed.port}") as client,
    ):
        _unauthorized(await client.get("/v1/health"), "missing")


async def test_refusals_are_logged_at_most_once_per_interval(
    guarded: tuple[Endpoint, Counters], caplog: pytest.LogCaptureFixture
) -> None:
    ep, counters = guarded
    caplog.set_level(logging.WARNING, logger="lepton.agent.inference.access")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ep.port}") as client:
        for _ in range(25):
            _unauthorized(await client.get("/v1/models"), "missing")
    lines = [r for r in caplog.records if r.name == "lepton.agent.inference.access"]
    assert len(lines) == 1
    assert "reason=missing" in lines[0].getMessage()
    assert counters["endpoint.unauthorized.missing"] == 25
    # Once the interval has passed, the next line says how many were refused meanwhile.
    assert ep.guard is not None
    ep.guard.log_interval_s = 0.0
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ep.port}") as client:
        _unauthorized(await client.get("/v1/models"), "missing")
    lines = [r for r in caplog.records if r.name == "lepton.agent.inference.access"]
    assert len(lines) == 2
    assert "refused 25 unauthorized" in lines[1].getMessage()


async def test_an_unauthorized_body_is_not_read(guarded: tuple[Endpoint, Counters]) -> None:
    ep, _ = guarded
    reader, writer = await asyncio.open_connection("127.0.0.1", ep.port)
    writer.write(
        b"POST /v1/models/clf:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 1000000\r\n\r\n"
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401")
    assert b"connection: close" in head.lower()
    writer.close()
