"""The update upload endpoint: what is accepted, what is refused and how it is counted.

The app runs behind the real auth guard: each request carries the enrolled device's own
token (``Authorization``) and the slot's credential (``X-Lepton-Upload-Token``)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from lepton.coordinator.auth import credentials
from lepton.coordinator.auth.enrolment_store import EnrolmentStore
from lepton.coordinator.auth.guard import Authenticator, AuthGuard
from lepton.coordinator.auth.metrics import AuthMetrics
from lepton.coordinator.auth.store import AuthStore
from lepton.coordinator.fl import tables
from lepton.coordinator.fl.credentials import SCHEME, UploadSigner
from lepton.coordinator.fl.metrics import FLMetrics
from lepton.coordinator.fl.routes_uploads import UploadContext, make_upload_router
from lepton.coordinator.fl.store import FLStore
from lepton.coordinator.model_registry import tables as model_tables
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.coordinator.store import Store
from lepton.protocol.routes import UPLOAD_TOKEN_HEADER
from lepton.protocol.weights import encode_weights

JOB = "digits-0000abcd"
WEIGHTS: dict[str, np.ndarray[Any, Any]] = {
    "w": np.zeros((16, 8), dtype=np.float32),
    "b": np.zeros(8, dtype=np.float32),
    "n": np.zeros((), dtype=np.int64),
}


@dataclass
class Env:
    app: FastAPI
    fl: FLStore
    metrics: FLMetrics
    base: str
    woken: list[int]
    signer: UploadSigner
    bearers: dict[str, str]  # device id (or "operator") -> its token

    def token(self, device: str, round_no: int = 1, job: str = JOB) -> str:
        """The credential the coordinator puts in ``device``'s train task message."""
        return self.signer.token(job, round_no, device)

    def put(
        self,
        body: bytes,
        *,
        device: str = "d1",
        token: str | None = None,
        round_no: int = 1,
        digest: str | None = None,
        job: str = JOB,
        headers: dict[str, str] | None = None,
        caller: str | None = None,
    ) -> tuple[int, str]:
        """PUT ``body`` into ``device``'s slot as ``caller`` (default: that device; "":
        no Authorization) with the slot credential ``token`` (default: the slot's own)."""
        h = {"X-Lepton-Digest": f"sha256:{digest or hashlib.sha256(body).hexdigest()}"}
        if token is None:
            token = self.token(device, round_no, job)
        if token:
            h[UPLOAD_TOKEN_HEADER] = token
        caller = device if caller is None else caller
        if caller:
            h["Authorization"] = f"Bearer {self.bearers[caller]}"
        h.update(headers or {})
        url = f"/v1/fl/uploads/{job}/{round_no}/{device}"

        async def put() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://fl") as client:
                return await client.put(url, content=body, headers=h)

        r = asyncio.run(put())
        return r.status_code, r.json().get("reason", "ok")

    def rejects(self, reason: str) -> float:
        v = self.metrics.rejects.labels(reason)._value.get()
        return float(v)

    def update(self, scale: float = 0.1, **kw: object) -> bytes:
        delta = {
            k: (v + scale).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in WEIGHTS.items()
        }
        args: dict[str, object] = {"round": 1, "base": self.base, "job": JOB}
        args.update(kw)
        return encode_weights(delta, kind="update", compression="int8", **args)  # type: ignore[arg-type]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    store = Store.open(f"sqlite:///{tmp_path / 'c.db'}", sqlite_synchronous="normal")
    store.create_schema(model_tables.metadata)
    store.create_schema(tables.metadata)
    fl = FLStore(store.engine)
    registry = ModelRegistry(store.engine, tmp_path / "data", create_tables=False)
    blob = encode_weights(WEIGHTS, kind="weights", job=JOB)
    base = registry.put_bytes(blob)
    now = time.time()
    fl.create_job(JOB, "digits", {"name": "digits"}, now)
    fl.update_job(
        JOB,
        state="running",
        round=1,
        global_digest=base,
        tensors={k: list(v.shape) for k, v in WEIGHTS.items()},
        max_update_bytes=4096,
    )
    fl.open_round(
        JOB,
        1,
        selected=["d1", "d2"],
        tokens={"d1": SCHEME, "d2": SCHEME},
        tasks={"d1": "t1", "d2": "t2"},
        selection={},
        base_digest=base,
        started_at=now,
        deadline=now + 60,
    )
    metrics = FLMetrics(CollectorRegistry())
    woken: list[int] = []
    signer = UploadSigner(b"k" * 32)
    bearers = _identities(store, "d1", "d2", "d9")
    app = FastAPI()
    router = make_upload_router(
        UploadContext(
            store=fl,
            registry=registry,
            metrics=metrics,
            signer=signer,
            on_update=lambda: woken.append(1),
        )
    )
    app.include_router(router)
    auth = Authenticator(AuthStore(store.engine), AuthMetrics(CollectorRegistry()))
    app.add_middleware(AuthGuard, routes=router.routes, auth=auth, public=frozenset())
    yield Env(app, fl, metrics, base, woken, signer, bearers)
    store.close()


def _identities(store: Store, *devices: str) -> dict[str, str]:
    """Enrolled devices' tokens, and an operator's with every scope."""
    enrolment = EnrolmentStore(store.engine)
    out = {}
    for device in devices:
        claim = credentials.new("claim")
        enrolment.create_claims(
            [
                {
                    "name": f"claim-{device}",
                    "token_hash": credentials.digest(claim),
                    "created_by": "test",
                    "expires_at": time.time() + 60,
                    "max_uses": 1,
                    "device_class": None,
                    "device_group": None,
                }
            ]
        )
        out[device] = credentials.new("device")
        enrolment.redeem(
            credentials.digest(claim),
            device,
            credentials.digest(out[device]),
            device_class=None,
            device_group=None,
        )
    out["operator"] = credentials.new("operator")
    AuthStore(store.engine).create_token(
        "op", credentials.digest(out["operator"]), ["admin"], created_by="test"
    )
    return out


def test_a_good_update_is_recorded_once(env: Env) -> None:
    body = env.update()
    assert env.put(body) == (200, "ok")
    assert env.put(body) == (200, "ok")  # a retry after a lost answer
    ups = env.fl.updates_for(JOB, 1)
    assert [(u.device_id, u.size, u.compression) for u in ups] == [("d1", len(body), "int8")]
    assert env.metrics.uploads._value.get() == 1
    assert env.metrics.duplicates._value.get() == 1
    assert env.woken == [1, 1]
    # Another update for the same slot: the first one stays.
    assert env.put(env.update(0.2)) == (409, "conflict")
    assert env.fl.updates_for(JOB, 1)[0].digest == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"device": "d9", "token": "x"}, (403, "not_selected")),
        ({"token": UploadSigner(b"k" * 32).token(JOB, 1, "d2")}, (403, "bad_token")),
        ({"token": UploadSigner(b"k" * 32).token(JOB, 2, "d1")}, (403, "bad_token")),
        ({"token": UploadSigner(b"x" * 32).token(JOB, 1, "d1")}, (403, "bad_token")),
        ({"token": ""}, (403, "bad_token")),
        ({"round_no": 2}, (409, "wrong_round")),
        ({"job": "other-1"}, (404, "unknown_job")),
        ({"digest": "0" * 64}, (400, "digest_mismatch")),
        ({"headers": {"X-Lepton-Digest": "md5:abc"}}, (400, "bad_digest_header")),
    ],
)
def test_slot_and_header_checks(
    env: Env, kwargs: dict[str, object], expected: tuple[int, str]
) -> None:
    assert env.put(env.update(), **kwargs) == expected  # type: ignore[arg-type]
    assert env.rejects(expected[1]) == 1
    assert env.fl.updates_for(JOB, 1) == []


def test_the_credential_travels_in_a_header_only(env: Env) -> None:
    """Finding 3 of the hardening review: the credential is the slot's and a header's; a
    query string (which URLs, access logs and error messages carry) is not read."""
    valid = env.token("d1")
    assert env.put(env.update(), token="", headers={"X-Token": valid}) == (403, "bad_token")
    # In Authorization (where it travelled before devices had tokens) it is no device token.
    moved = {"Authorization": f"Bearer {valid}"}
    assert env.put(env.update(), token="", headers=moved) == (401, "malformed_token")
    assert env.put(env.update(), token="a" * 4000) == (403, "bad_token")
    assert env.put(env.update(), token=valid) == (200, "ok")
    assert repr(env.signer) == "UploadSigner(key=***)"


def test_only_the_slots_own_device_uploads(env: Env) -> None:
    body = env.update()
    # Another enrolled device, even holding the right slot credential.
    assert env.put(body, caller="d2") == (403, "wrong_device")
    assert env.rejects("wrong_device") == 1
    assert env.put(body, caller="operator") == (403, "device_only")
    assert env.put(body, caller="") == (401, "missing_token")
    assert env.fl.updates_for(JOB, 1) == []
    assert env.put(body) == (200, "ok")


def test_blob_checks(env: Env) -> None:
    assert env.put(b"\x93not a blob") == (400, "malformed")
    assert env.put(env.update(base="1" * 64)) == (400, "wrong_base")
    assert env.put(env.update(round=2)) == (400, "wrong_job")
    assert env.put(env.update(job="another-job")) == (400, "wrong_job")
    weights = encode_weights(WEIGHTS, kind="weights", job=JOB)
    assert env.put(weights) == (400, "not_update")
    odd = encode_weights(
        {"w": np.zeros((8, 16), dtype=np.float32), "b": WEIGHTS["b"], "n": WEIGHTS["n"]},
        kind="update",
        base=env.base,
        round=1,
        job=JOB,
    )
    assert env.put(odd) == (400, "shape_mismatch")
    assert env.fl.updates_for(JOB, 1) == []
    # Refusals are counted against the round too.
    rnd = env.fl.get_round(JOB, 1)
    assert rnd is not None
    assert rnd.rejects == {
        "malformed": 1,
        "wrong_base": 1,
        "wrong_job": 2,
        "not_update": 1,
        "shape_mismatch": 1,
    }


def test_oversized_is_refused_before_reading(env: Env) -> None:
    big = b"\0" * 10_000  # the job's cap is 4096 bytes
    assert env.put(big) == (413, "oversized")
    assert env.rejects("oversized") == 1


def test_late_update_after_the_round_closed(env: Env) -> None:
    assert env.put(env.update()) == (200, "ok")
    assert env.fl.close_round(JOB, 1, state="closed", now=time.time())
    assert env.put(env.update(), device="d2") == (409, "late")
    assert env.fl.get_round(JOB, 1).rejects == {"late": 1}  # type: ignore[union-attr]


def test_late_update_is_taken_when_the_job_folds_late_updates(env: Env) -> None:
    late = {"policy": "fold", "max_rounds": 2, "exponent": 0.5}
    env.fl.update_job(JOB, spec={"name": "digits", "late": late})
    assert env.fl.close_round(JOB, 1, state="closed", now=time.time())
    env.fl.update_job(JOB, round=3)  # two rounds on: still within max_rounds
    body = env.update()
    assert env.put(body, device="d2") == (200, "ok")
    assert env.put(body, device="d2") == (200, "ok")  # a retry: once
    [up] = env.fl.updates_for(JOB, 1)
    assert (up.device_id, up.digest) == ("d2", hashlib.sha256(body).hexdigest())
    # Its round's checks still hold: token, selection, base weights.
    assert env.put(body, device="d1", token=env.token("d2")) == (403, "bad_token")
    assert env.put(body, device="d9", token=env.token("d2")) == (403, "not_selected")
    assert env.put(env.update(base="0" * 64), device="d1") == (400, "wrong_base")
    env.fl.update_job(JOB, round=4)  # three rounds on: too late
    assert env.put(env.update(), device="d1") == (409, "late")
    assert env.fl.get_round(JOB, 1).rejects == {  # type: ignore[union-attr]
        "bad_token": 1,
        "not_selected": 1,
        "wrong_base": 1,
        "late": 1,
    }


def test_stopped_job_takes_nothing(env: Env) -> None:
    env.fl.update_job(JOB, state="stopped")
    assert env.put(env.update()) == (409, "job_not_running")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.binary(max_size=3000))
def test_hostile_bytes_are_refused_never_crash(env: Env, body: bytes) -> None:
    status, reason = env.put(body)
    assert status == 400
    assert reason == "malformed"
