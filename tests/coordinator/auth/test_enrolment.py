"""``POST /v1/enroll`` and the claim routes on a running coordinator (real broker, real
HTTP server, SQLite): claims made, listed and revoked; each refusal of the contract; the
device token an enrolment gives works; a broker that cannot make accounts leaves the claim
unused."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import msgspec
import pytest

from lepton.coordinator.auth.store import AuthStore
from lepton.coordinator.service import Coordinator
from lepton.protocol import routes
from lepton.protocol.enrolment import EnrollResponse
from tests.coordinator.auth.enrolling import bearer, enroll, make_claims, metric, operator_token

MakeCoordinator = Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]]


@contextlib.asynccontextmanager
async def api_of(c: Coordinator) -> AsyncIterator[httpx.AsyncClient]:
    assert c.api_url is not None
    async with httpx.AsyncClient(base_url=c.api_url, timeout=10) as api:
        yield api


@pytest.fixture
async def coord(make_coordinator: MakeCoordinator) -> AsyncIterator[Coordinator]:
    """A running coordinator on the plain test broker (``coordinator`` is this folder's
    dynsec link)."""
    async with make_coordinator() as c:
        yield c


def refused(c: Coordinator, reason: str) -> float:
    return metric(c, "lepton_auth_refusals_total", {"reason": reason})


async def test_claims_are_made_listed_and_revoked(coord: Coordinator) -> None:
    op = operator_token(coord, "devices:write")
    async with api_of(coord) as api:
        made = await make_claims(
            api, op, count=3, uses=2, expires_in_s=3600, device_class="rpi5", device_group="lab"
        )
        assert len(made) == 3
        assert len({m["token"] for m in made}) == 3
        assert all(m["token"].startswith("lpc_") for m in made)
        assert {(m["max_uses"], m["uses"], m["device_class"], m["state"]) for m in made} == {
            (2, 0, "rpi5", "usable")
        }
        listed = (await api.get(routes.CLAIMS, headers=bearer(op))).json()
        assert {c["name"] for c in listed} == {m["name"] for m in made}
        assert all("token" not in c and "token_hash" not in c for c in listed)
        r = await api.delete(routes.path(routes.CLAIM, name=made[0]["name"]), headers=bearer(op))
        assert r.status_code == 200
        assert r.json()["state"] == "claim_revoked"
        r = await enroll(api, made[0]["token"], "dev-1", device_class="rpi5")
        assert (r.status_code, r.json()["reason"]) == (401, "claim_revoked")
        # An operator without devices:write makes none; bounds are checked.
        reader = operator_token(coord, "fleet:read")
        r = await api.post(routes.CLAIMS, json={}, headers=bearer(reader))
        assert (r.status_code, r.json()["reason"]) == (403, "missing_scope")
        for bad in ({"count": 0}, {"count": 1001}, {"uses": 0}, {"expires_in_s": 31 * 86400}):
            r = await api.post(routes.CLAIMS, json=bad, headers=bearer(op))
            assert r.status_code == 422, bad
        r = await api.delete(routes.path(routes.CLAIM, name="nope"), headers=bearer(op))
        assert r.status_code == 404


async def test_enrolment_gives_a_working_identity(coord: Coordinator) -> None:
    c = coord
    op = operator_token(c)
    async with api_of(c) as api:
        (claim,) = await make_claims(api, op, device_group="lab")
        r = await enroll(api, claim["token"], "dev-1", device_class="rpi5")
        assert r.status_code == 201, r.text
        out = msgspec.json.decode(r.content, type=EnrollResponse)
        assert out.device_id == "dev-1"
        assert out.fleet == c.config.fleet
        assert out.http_token.startswith("lpd_")
        assert out.coordinator_url == c.api_url
        assert out.device_group == "lab"
        assert (out.mqtt.host, out.mqtt.port, out.mqtt.tls) == (
            "127.0.0.1",
            c.config.mqtt.port,
            False,
        )
        assert out.mqtt.username == "dev-1"
        assert len(out.mqtt.password) >= 40
        assert out.ca_pem is None
        assert out.cert_pem is None
        # The device token is accepted on device routes (an unknown blob: 404, not 401) and
        # refused on operator routes.
        blob = routes.path(routes.BLOB, digest="0" * 64)
        r = await api.get(blob, headers=bearer(out.http_token))
        assert r.status_code == 404
        assert metric(c, "lepton_auth_allowed_total", {"kind": "device"}) >= 1
        r = await api.get(routes.DEVICES, headers=bearer(out.http_token))
        assert (r.status_code, r.json()["reason"]) == (403, "device_not_allowed")
        # A replay of the one-use claim.
        before = refused(c, "claim_used")
        r = await enroll(api, claim["token"], "dev-2")
        assert (r.status_code, r.json()["reason"]) == (401, "claim_used")
        assert refused(c, "claim_used") == before + 1
        # The id is taken: a claim never takes over a live identity.
        (other,) = await make_claims(api, op)
        r = await enroll(api, other["token"], "dev-1")
        assert (r.status_code, r.json()["reason"]) == (409, "already_enrolled")
        listed = {x["name"]: x for x in (await api.get(routes.CLAIMS, headers=bearer(op))).json()}
        assert listed[other["name"]]["uses"] == 0  # the refusal used nothing
    audit = AuthStore(c.store.engine).audit_log(action="enroll")
    outcomes = [(a.actor, a.target, a.outcome) for a in reversed(audit)]
    assert outcomes == [
        (f"claim:{claim['name']}", "dev-1", "ok"),
        (f"claim:{claim['name']}", "?", "401 claim_used"),
        (f"claim:{other['name']}", "dev-1", "409 already_enrolled"),
    ]


async def test_claim_refusals(coord: Coordinator) -> None:
    c = coord
    op = operator_token(c)
    async with api_of(c) as api:
        r = await enroll(api, None, "dev-1")
        assert (r.status_code, r.json()["reason"]) == (401, "missing_claim")
        assert r.headers["www-authenticate"] == "Bearer"
        r = await enroll(api, "lpc_" + "x" * 43, "dev-1")
        assert (r.status_code, r.json()["reason"]) == (401, "unknown_claim")
        r = await enroll(api, op, "dev-1")  # an operator token is no claim
        assert (r.status_code, r.json()["reason"]) == (401, "unknown_claim")
        (short,) = await make_claims(api, op, expires_in_s=0.2)
        await asyncio.sleep(0.3)
        r = await enroll(api, short["token"], "dev-1")
        assert (r.status_code, r.json()["reason"]) == (401, "claim_expired")
        (bound,) = await make_claims(api, op, device_class="jetson")
        r = await enroll(api, bound["token"], "dev-1", device_class="rpi5")
        assert (r.status_code, r.json()["reason"]) == (403, "class_mismatch")
        r = await enroll(api, bound["token"], "dev-1", csr_pem="-----BEGIN CERTIFICATE REQUEST")
        assert (r.status_code, r.json()["reason"]) == (422, "no_ca")
        # Without a class the device takes the claim's.
        r = await enroll(api, bound["token"], "dev-1")
        assert r.status_code == 201, r.text
    assert refused(c, "class_mismatch") == 1
    assert refused(c, "claim_expired") == 1
    assert refused(c, "missing_claim") == 1


async def test_a_revoked_device_enrols_again_with_new_secrets(coord: Coordinator) -> None:
    c = coord
    op = operator_token(c)
    async with api_of(c) as api:
        first, second = await make_claims(api, op, count=2)
        old = (await enroll(api, first["token"], "dev-1")).json()
        r = await api.post(routes.path(routes.DEVICE_REVOKE, device_id="dev-1"), headers=bearer(op))
        assert r.status_code == 200, r.text
        blob = routes.path(routes.BLOB, digest="0" * 64)
        r = await api.get(blob, headers=bearer(old["http_token"]))
        assert (r.status_code, r.json()["reason"]) == (401, "revoked_device")
        r = await enroll(api, second["token"], "dev-1")
        assert r.status_code == 201, r.text
        new = r.json()
        assert new["http_token"] != old["http_token"]
        assert new["mqtt"]["password"] != old["mqtt"]["password"]
        r = await api.get(blob, headers=bearer(old["http_token"]))
        assert (r.status_code, r.json()["reason"]) == (401, "unknown_token")  # replaced
        assert (await api.get(blob, headers=bearer(new["http_token"]))).status_code == 404
    assert "dev-1" not in c.revoked


async def test_concurrent_redemptions_of_a_one_use_claim_give_one_identity(
    coord: Coordinator,
) -> None:
    c = coord
    op = operator_token(c)
    async with api_of(c) as api:
        (claim,) = await make_claims(api, op)
        # Threads of their own: the default executor is the coordinator's.
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(16) as pool:
            answers = await asyncio.gather(
                *(
                    loop.run_in_executor(pool, _enroll_sync, c, claim["token"], f"dev-{i}")
                    for i in range(16)
                )
            )
    codes = sorted(code for code, _ in answers)
    assert codes == [201] + [401] * 15, answers
    assert {reason for code, reason in answers if code == 401} == {"claim_used"}
    enrolled = [
        r for r in AuthStore(c.store.engine).audit_log(action="enroll") if r.outcome == "ok"
    ]
    assert len(enrolled) == 1


def _enroll_sync(c: Coordinator, claim: str, device_id: str) -> tuple[int, Any]:
    assert c.api_url is not None
    r = httpx.post(
        c.api_url + routes.ENROLL, json={"device_id": device_id}, headers=bearer(claim), timeout=10
    )
    return r.status_code, r.json().get("reason")


async def test_a_broker_that_cannot_make_accounts_leaves_the_claim_unused(
    make_coordinator: MakeCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    """accounts = dynsec (the default) on a broker without the plugin: the coordinator runs,
    says once at ERROR what to configure, and refuses enrolments with 503."""
    async with make_coordinator(mqtt__accounts="dynsec", mqtt__accounts_timeout_s=0.5) as c:
        op = operator_token(c)
        async with api_of(c) as api:
            (claim,) = await make_claims(api, op)
            r = await enroll(api, claim["token"], "dev-1")
            assert (r.status_code, r.json()["reason"]) == (503, "broker_unavailable")
            listed = (await api.get(routes.CLAIMS, headers=bearer(op))).json()
            assert listed[0]["uses"] == 0
            assert (await api.get(routes.HEALTH)).status_code == 200
        errors = [r for r in caplog.records if "cannot make device accounts" in r.getMessage()]
        assert len(errors) == 1
        assert errors[0].levelname == "ERROR"
        assert "lepton broker init" in errors[0].getMessage()
        assert AuthStore(c.store.engine).audit_log(outcome="503 broker_unavailable")
