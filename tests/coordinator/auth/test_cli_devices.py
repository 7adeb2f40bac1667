"""``lepton devices enroll|claims|unclaim|revoke`` against a running coordinator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
from collections.abc import Callable

import httpx
import pytest

from lepton.coordinator.auth.cli_devices import agent_command
from lepton.coordinator.cli.main import main
from lepton.coordinator.service import Coordinator
from lepton.protocol import routes
from tests.coordinator.auth.enrolling import enroll, operator_token

MakeCoordinator = Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]]


async def test_enroll_prints_each_claim_and_its_device_command(
    make_coordinator: MakeCoordinator, capsys: pytest.CaptureFixture[str]
) -> None:
    async with make_coordinator() as c:
        op = operator_token(c, "devices:write")
        common = ["--api", str(c.api_url), "--token", op]

        async def cli(*args: str) -> tuple[int, str]:
            rc = await asyncio.to_thread(main, [*args, *common])
            return rc, capsys.readouterr().out

        rc, out = await cli(
            "devices",
            "enroll",
            "--count",
            "2",
            "--uses",
            "3",
            "--expires-in",
            "2h",
            "--class",
            "rpi5",
            "--json",
        )
        assert rc == 0
        made = json.loads(out)["claims"]
        assert len(made) == 2
        for claim in made:
            assert (claim["max_uses"], claim["device_class"]) == (3, "rpi5")
            words = shlex.split(claim["command"])
            assert words == ["lepton-agent", "enroll", str(c.api_url), claim["token"]]
        rc, out = await cli("devices", "enroll")
        assert rc == 0
        token = next(w for w in out.split() if w.startswith("lpc_"))
        assert f"lepton-agent enroll {c.api_url} {token}" in out
        rc, out = await cli("devices", "claims")
        assert rc == 0
        assert out.count("claim-") == 3
        assert "lpc_" not in out
        rc, out = await cli("devices", "unclaim", made[1]["name"])
        assert rc == 0
        async with httpx.AsyncClient(base_url=str(c.api_url)) as api:
            r = await enroll(api, made[1]["token"], "dev-1", device_class="rpi5")
            assert r.json()["reason"] == "claim_revoked"
            assert (await enroll(api, token, "dev-1")).status_code == 201
        rc, out = await cli("devices", "revoke", "dev-1", "--reason", "lost")
        assert rc == 0
        assert "device dev-1 revoked" in out
        assert await asyncio.to_thread(main, ["devices", "revoke", "nope", *common]) == 3
        assert await asyncio.to_thread(main, ["devices", "enroll", "--count", "0", *common]) == 2
    (record,) = c.auth.store.audit_log(action="revoke")
    assert record.detail["reason"] == "lost"


def test_the_command_pins_the_fleet_ca_when_there_is_one() -> None:
    assert agent_command("https://c:8443", "lpc_x", "sha256:ab") == (
        "lepton-agent enroll https://c:8443 lpc_x --ca-sha256 sha256:ab"
    )
    assert routes.path(routes.CLAIM, name="a/b") == "/v1/claims/a%2Fb"
