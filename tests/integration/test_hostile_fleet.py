"""One campaign against a live, fully secured fleet (issue 12): the shipped configuration
(``lepton ca init``, ``lepton broker init``: dynsec and a TLS listener on a real Mosquitto),
an in-process coordinator on it over TLS as the coordinator account with
``mqtt.accounts = "dynsec"``, serving HTTPS, and three ``lepton-agent`` processes enrolled
with ``lepton-agent enroll`` (:mod:`tests.support.secure_stack`).

The attackers: a network client with no, malformed, unknown, revoked, expired or
under-scoped operator tokens; a compromised enrolled device ``mal-x`` (its own HTTP token
and broker account, no agent), then the same device after its revocation; a real agent's
token (``pi-b``) used against ``pi-a``'s blob and upload slot; replayed, used-up, expired
and revoked claims. Each attempt must be refused with its reason and counted (the
coordinator's counters, or the broker's own answer with nothing reaching an observer that
reads every topic), every process must stay up (health 200, agents online, a task still
runs) and the stored tables must not change (:func:`hostile_clients.digest`).

The coordinator runs in-process so that the test reads its Prometheus counters and its
database directly; the agents and the broker are separate processes.

``pytest -s`` prints the table of figures (docs/security.md, "Hostile-input figures").
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections import Counter
from typing import Any, Final

import msgspec
import pytest

from lepton.coordinator.auth import credentials
from lepton.coordinator.auth.scopes import Scope
from lepton.coordinator.auth.store import AuthStore
from lepton.coordinator.model_registry.feature import ModelRegistryFeature
from lepton.coordinator.service import Coordinator
from lepton.protocol import codec, routes, topics
from lepton.protocol.errors import DecodeError
from lepton.protocol.messages import State
from tests.coordinator.auth.app_routes import protected, reason
from tests.coordinator.auth.enrolling import bearer, enroll, make_claims
from tests.coordinator.conftest import eventually
from tests.integration.hostile_clients import MARK, MqttClient, Score, digest
from tests.support.api import new_operator_token
from tests.support.secure_stack import FLEET, OBSERVER, SecureStack, secure_stack

pytestmark = pytest.mark.slow

AGENTS: Final = ("pi-a", "pi-b", "pi-c")
N: Final = 10  # repeats of each single attack (claims, blobs, uploads, MQTT)
AUTH_REFUSALS: Final = "lepton_auth_refusals_total"


def by_reason(c: Coordinator, name: str) -> Counter[str]:
    """A counter's samples by their ``reason`` label."""
    out: Counter[str] = Counter()
    for metric in c.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name and "reason" in sample.labels:
                out[sample.labels["reason"]] += int(sample.value)
    return out


def identity(s: SecureStack, device_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((s.tmp / device_id / "identity.json").read_text())
    return data


async def grant_blob_to(s: SecureStack, device_id: str) -> str:
    """A blob only ``device_id`` may read: the one its deploy task names (the grant outlives
    the attempt by ten minutes). The agent fetches it and fails to load it (not a model)."""
    c = s.coordinator
    data = b"weights of " + device_id.encode()
    blob = c.feature(ModelRegistryFeature).registry.put_bytes(data)
    params = {"name": "m", "digest": blob, "size": len(data), "url": f"{s.url}/v1/blobs/{blob}"}
    r = await s.api.post(
        routes.TASKS,
        json={"kind": "deploy", "params": params | {"format": "onnx"}, "device_id": device_id},
        headers=bearer(s.admin),
    )
    assert r.status_code == 201, r.text
    task_id = r.json()["id"]
    await eventually(
        lambda: c.store.tasks.get_task(task_id).state in ("succeeded", "failed"), timeout=30
    )
    return blob


def hostile_payloads() -> list[tuple[str, bytes]]:
    """Payloads every decoder refuses (checked here with :func:`codec.decode`): not
    MessagePack, truncated, deeply nested, wrongly typed, unknown tag, empty."""
    good = codec.encode(State(state="online", agent_version="x"))
    out = [("empty", b""), ("not msgpack", b"\xc1" * 64), ("json", b'{"type":"state"}')]
    out += [(f"truncated {n}", good[:n]) for n in range(1, len(good), max(1, len(good) // 8))]
    out.append(("nested 5000", b"\x91" * 5000 + b"\xc0"))
    out.append(("nested maps 100", b"\x81\xa1k" * 100 + b"\xc0"))
    wrong = [
        {"type": "state", "state": 123},
        {"type": "state", "state": "online", "agent_version": ["x"] * 3},
        {"type": "capacity", "cpu": "fast"},
        {"type": "result", "task_id": None},
        {"type": "no-such-message"},
        [1, 2, 3],
        "state",
    ]
    out += [(f"wrong type {i}", msgspec.msgpack.encode(v)) for i, v in enumerate(wrong)]
    for what, data in out:
        with pytest.raises(DecodeError):
            codec.decode(data)
        assert MARK not in data, what
    return out


def bad_operator_tokens(c: Coordinator) -> tuple[str, str, dict[str, str]]:
    """A revoked and an expired admin token, and per scope a token with every other one."""
    store = AuthStore(c.store.engine)
    revoked = new_operator_token(c, name="hostile-revoked")
    store.revoke_token("hostile-revoked")
    expired = new_operator_token(c, name="hostile-expired", expires_at=time.time() - 1)
    everyday = {sc.value for sc in Scope} - {Scope.ADMIN.value}
    lacking: dict[str, str] = {}
    served = [sv for sv in protected(c) if sv.need is not None]
    for sv in served:
        assert sv.need is not None
        need = sv.need.scope.value
        if need not in lacking:
            lacking[need] = new_operator_token(c, sorted(everyday - {need}) or ["fleet:read"])
    return revoked, expired, lacking


async def http_matrix(
    s: SecureStack,
    score: Score,
    device_token: str,
    tokens: tuple[str, str, dict[str, str]],
    expect: Counter[str],
) -> None:
    """Every protected route x every bad operator credential (and a device token on every
    operator route): 401/403 with the guard's reason."""
    revoked, expired, lacking = tokens
    served = [sv for sv in protected(s.coordinator) if sv.need is not None]
    kinds: list[tuple[str, Any, int, str]] = [
        ("no token", lambda _sv: {}, 401, "missing_token"),
        (
            "malformed token",
            lambda _sv: {"Authorization": "Bearer garbage"},
            401,
            "malformed_token",
        ),
        ("unknown token", lambda _sv: bearer(credentials.new("operator")), 401, "unknown_token"),
        ("revoked token", lambda _sv: bearer(revoked), 401, "revoked_token"),
        ("expired token", lambda _sv: bearer(expired), 401, "expired_token"),
        (
            "token lacking the route's scope",
            lambda sv: bearer(lacking[sv.need.scope.value]),
            403,
            "missing_scope",
        ),
    ]
    for label, headers, status, why in kinds:
        for sv in served:
            r = await s.api.request(sv.method, sv.path, headers=headers(sv))
            got = reason(r.content) if sv.method != "HEAD" else why  # HEAD: no body
            ok = r.status_code == status and got == why
            score.add(f"HTTP: every route, {label}", ok, f"{r.status_code} {got}")
            assert ok, (label, str(sv), r.status_code, r.text)
            expect[why] += 1
    for sv in served:
        assert sv.need is not None
        if sv.need.devices:
            continue
        r = await s.api.request(sv.method, sv.path, headers=bearer(device_token))
        got = reason(r.content) if sv.method != "HEAD" else "device_not_allowed"
        ok = r.status_code == 403 and got == "device_not_allowed"
        score.add("HTTP: every operator route, a device's token", ok, f"{r.status_code} {got}")
        assert ok, (str(sv), r.status_code, r.text)
        expect["device_not_allowed"] += 1


async def device_http(
    s: SecureStack,
    score: Score,
    attack: str,
    token: str,
    blob: str,
    expect: Counter[str],
    *,
    status: int,
    why: str,
    upload: tuple[int, str],
) -> None:
    """``N`` downloads (GET and HEAD) of another device's blob and ``N`` uploads into another
    device's slot with ``token``."""
    path = routes.path(routes.BLOB, digest=blob)
    for i in range(N):
        method = "GET" if i % 2 == 0 else "HEAD"
        r = await s.api.request(method, path, headers=bearer(token))
        # A blob not granted answers as an unknown one does (no reason in the body); the
        # counter tells them apart.
        got = why if status == 401 else "not found (counted blob_not_granted)"
        ok = r.status_code == status and r.content.find(b"weights of") < 0
        score.add(f"HTTP: {attack}, download pi-a's blob", ok, f"{r.status_code} {got}")
        assert ok, (r.status_code, r.text)
        expect[why if status == 401 else "blob_not_granted"] += 1
    up = routes.path(routes.FL_UPLOAD, job_id="job-1", round_no="1", device_id="pi-a")
    for _ in range(N):
        r = await s.api.put(
            up,
            content=b"\x00" * 256,
            headers=bearer(token) | {routes.UPLOAD_TOKEN_HEADER: "x" * 43},
        )
        ok = (r.status_code, reason(r.content)) == upload
        score.add(
            f"HTTP: {attack}, upload into pi-a's slot", ok, f"{r.status_code} {reason(r.content)}"
        )
        assert ok, r.text
        expect[upload[1]] += 1


def mqtt_attacks(s: SecureStack, score: Score, mal: dict[str, Any], observer: MqttClient) -> None:
    """The compromised device ``mal-x`` on the broker, with its own account: publishing as
    and to another device, into another fleet and to the broker's control topic,
    subscribing beyond its own commands, logging in under another name."""
    tls, port = s.tls(), s.tls_port
    user, password = mal["mqtt"]["username"], mal["mqtt"]["password"]
    ours = [
        *(topics.device_topic(FLEET, "pi-b", ch) for ch in sorted(topics.DEVICE_CHANNELS)),
        *(topics.cmd_topic(FLEET, "pi-b", ch) for ch in sorted(topics.CMD_CHANNELS)),
    ]
    groups = {
        "MQTT: mal-x publishes on pi-b's device and command topics": ours,
        "MQTT: mal-x publishes into another fleet": [
            topics.device_topic("f2", user, topics.STATE),
            topics.cmd_topic("f2", "pi-b", topics.TASK),
        ],
        "MQTT: mal-x publishes to the broker's control topic": ["$CONTROL/dynamic-security/v1"],
    }
    x = MqttClient(port, tls, user, password)
    assert x.connect(), x.refused  # the control: its own account works
    try:
        for attack, targets in groups.items():
            for i in range(N * len(targets) if len(targets) < 3 else len(targets) * 2):
                topic = targets[i % len(targets)]
                payload = (
                    MARK + b" " + json.dumps({"commands": [{"command": "createRole"}]}).encode()
                )
                answer = x.publish(topic, payload)
                if answer == "disconnected":  # a refused publish may cost the connection
                    x.close()
                    x = MqttClient(port, tls, user, password)
                    assert x.connect()
                score.add(attack, answer != "puback:0x00", answer)
        for filt in (
            topics.cmd_filter(FLEET, "pi-b"),
            "#",
            "lepton/#",
            topics.device_filter(FLEET, "#"),
            "$CONTROL/#",
            "$SYS/#",
            f"$share/g/{topics.device_filter(FLEET, '#')}",
        ):
            for _ in range(2):
                code = x.subscribe(filt)
                score.add(
                    "MQTT: mal-x subscribes beyond its own commands",
                    code >= 0x80,
                    f"suback:0x{code:02x}",
                )
    finally:
        x.close()
    for _ in range(N):
        other = MqttClient(port, tls, "pi-b", password)  # pi-b's name, mal-x's password
        accepted = other.connect()
        other.close()
        score.add(
            "MQTT: log in as pi-b with mal-x's password", not accepted, other.refused or "accepted"
        )
    # With pi-b's client id: the broker binds the id to the login, so pi-b's own session
    # (an agent) stays; its will would reach the observer if it were taken over.
    pi_b_state = topics.device_topic(FLEET, "pi-b", topics.STATE)
    for _ in range(N):
        seen = sum(1 for t, _p in observer.received if t == pi_b_state)
        other = MqttClient(port, tls, user, password, client_id="pi-b")
        assert other.connect(), other.refused
        time.sleep(0.1)
        other.close()
        time.sleep(0.1)
        kept = sum(1 for t, _p in observer.received if t == pi_b_state) == seen
        score.add(
            "MQTT: mal-x connects with pi-b's client id", kept, "session kept" if kept else "taken"
        )
    for _ in range(N):
        anon = MqttClient(port, tls, "", "")
        anon.client.username_pw_set(None)
        accepted = anon.connect()
        anon.close()
        score.add("MQTT: log in anonymously", not accepted, anon.refused or "accepted")


async def test_hostile_fleet(tmp_path: Any) -> None:
    started = time.monotonic()
    score = Score()
    async with secure_stack(tmp_path) as s:
        c = s.coordinator
        engine = c.store.engine
        for d in AGENTS:
            await s.agent(d)
        for d in AGENTS:
            await eventually(functools.partial(s.online, d), timeout=30, interval=0.1)
        blob = await grant_blob_to(s, "pi-a")
        pi_b = identity(s, "pi-b")["http_token"]
        # The attacker: an enrolled device without an agent, and the claims it tries again.
        (one_use,) = [x["token"] for x in await make_claims(s.api, s.admin)]
        r = await enroll(s.api, one_use, "mal-x")
        assert r.status_code == 201, r.text
        mal = r.json()
        (multi,) = await make_claims(s.api, s.admin, uses=2)
        for d in ("mal-y1", "mal-y2"):
            assert (await enroll(s.api, multi["token"], d)).status_code == 201
        (expired,) = await make_claims(s.api, s.admin, expires_in_s=0.2)
        (revoked,) = await make_claims(s.api, s.admin)
        r = await s.api.delete(
            routes.path(routes.CLAIM, name=revoked["name"]), headers=bearer(s.admin)
        )
        assert r.status_code == 200, r.text
        (fresh,) = await make_claims(s.api, s.admin)
        observer = MqttClient(s.tls_port, s.tls(), OBSERVER, s.observer_password)
        assert observer.connect(), observer.refused
        assert observer.subscribe("#") < 0x80
        await asyncio.sleep(0.3)  # the expired claim expires

        tokens = bad_operator_tokens(c)
        before = digest(engine)
        refusals, ingest = by_reason(c, AUTH_REFUSALS), by_reason(c, "lepton_ingest_rejects_total")
        uploads = by_reason(c, "lepton_fl_upload_rejects_total")
        expect: Counter[str] = Counter()

        await http_matrix(s, score, mal["http_token"], tokens, expect)
        await device_http(
            s,
            score,
            "pi-b's token",
            pi_b,
            blob,
            expect,
            status=404,
            why="blob_not_granted",
            upload=(403, "wrong_device"),
        )
        claims = {
            "replayed one-use claim": (one_use, 401, "claim_used"),
            "used-up two-use claim": (multi["token"], 401, "claim_used"),
            "expired claim": (expired["token"], 401, "claim_expired"),
            "revoked claim": (revoked["token"], 401, "claim_revoked"),
            "good claim for the live id pi-b": (fresh["token"], 409, "already_enrolled"),
        }
        for attack, (claim, status, why) in claims.items():
            for i in range(N):
                device_id = "pi-b" if status == 409 else f"thief-{i}"
                r = await enroll(s.api, claim, device_id)
                ok = (r.status_code, reason(r.content)) == (status, why)
                score.add(f"enrol: {attack}", ok, f"{r.status_code} {reason(r.content)}")
                assert ok, (attack, r.status_code, r.text)
                expect[why] += 1
        await asyncio.to_thread(mqtt_attacks, s, score, mal, observer)
        # Garbage on its own topics reaches the coordinator's decoder: refused and counted.
        x = MqttClient(s.tls_port, s.tls(), mal["mqtt"]["username"], mal["mqtt"]["password"])
        assert await asyncio.to_thread(x.connect)
        payloads = hostile_payloads()
        sent = 0
        for what, data in payloads:
            for ch in (topics.STATE, topics.CAPACITY, topics.RESULT, topics.TASK_ACK):
                answer = await asyncio.to_thread(
                    x.publish, topics.device_topic(FLEET, "mal-x", ch), data
                )
                assert answer == "puback:0x00", (what, answer)
                sent += 1
        await asyncio.to_thread(x.close)
        await eventually(
            lambda: (by_reason(c, "lepton_ingest_rejects_total") - ingest).total() >= sent
        )
        got = by_reason(c, "lepton_ingest_rejects_total") - ingest
        for why, n in got.items():
            score.add_many("MQTT: undecodable messages from mal-x on its own topics", n, why)
        assert got.total() == sent, (got, sent)

        # Nothing got through to anyone, and everything was counted.
        await asyncio.sleep(0.5)
        leaked = [(t, p[:40]) for t, p in observer.received if p.startswith(MARK)]
        assert leaked == [], leaked
        assert by_reason(c, AUTH_REFUSALS) - refusals == expect - Counter(
            {"wrong_device": expect["wrong_device"]}
        )
        assert (by_reason(c, "lepton_fl_upload_rejects_total") - uploads) == Counter(
            {"wrong_device": expect["wrong_device"]}
        )
        assert digest(engine) == before

        # The device is revoked (an operator's act that changes what is stored), then tries
        # again with everything it had.
        r = await s.api.post(
            routes.path(routes.DEVICE_REVOKE, device_id="mal-x"), headers=bearer(s.admin)
        )
        assert r.status_code == 200, r.text
        before = digest(engine)
        refusals, expect = by_reason(c, AUTH_REFUSALS), Counter()
        await device_http(
            s,
            score,
            "mal-x's revoked token",
            mal["http_token"],
            blob,
            expect,
            status=401,
            why="revoked_device",
            upload=(401, "revoked_device"),
        )
        for _ in range(N):
            again = MqttClient(
                s.tls_port, s.tls(), mal["mqtt"]["username"], mal["mqtt"]["password"]
            )
            accepted = await asyncio.to_thread(again.connect)
            await asyncio.to_thread(again.close)
            score.add(
                "MQTT: mal-x reconnects after its revocation",
                not accepted,
                again.refused or "accepted",
            )
            assert not accepted
        assert by_reason(c, AUTH_REFUSALS) - refusals == expect
        assert digest(engine) == before

        # Every process is up and the fleet still works.
        assert (await s.api.get(routes.HEALTH)).status_code == 200
        for d, proc in s.agents.items():
            assert proc.proc is not None, d
            assert proc.proc.poll() is None, d
            assert await s.online(d), d
        r = await s.api.post(
            routes.TASKS, json={"kind": "echo", "params": {"payload": 7}}, headers=bearer(s.admin)
        )
        task_id = r.json()["id"]
        await eventually(lambda: c.store.tasks.get_task(task_id).state == "succeeded", timeout=30)
        await asyncio.to_thread(observer.close)
    for attack, row in score.rows.items():
        assert row.refused == row.attempts, (attack, row)
    print(f"\nHOSTILE FLEET ({time.monotonic() - started:.1f} s)\n{score.table()}")
