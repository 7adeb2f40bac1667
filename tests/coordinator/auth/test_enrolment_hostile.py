"""Hostile ``POST /v1/enroll`` bodies on a running coordinator, with a valid claim: every
one is refused with a 4xx and a reason (never a 5xx), and uses nothing of the claim."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton.coordinator.service import Coordinator
from lepton.protocol import routes
from lepton.protocol.enrolment import MAX_PEM_CHARS
from tests.coordinator.auth.enrolling import bearer, make_claims, operator_token

MakeCoordinator = Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
# Objects with the contract's keys holding wrong things, plus keys it does not know.
bodies = (
    st.fixed_dictionaries(
        {},
        optional={
            "device_id": json_values,
            "device_class": json_values,
            "csr_pem": json_values,
            "extra": json_values,
        },
    ).map(lambda d: json.dumps(d).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=300)
)

NAMED: list[tuple[bytes, int, str]] = [
    # A body past the enrolment cap is refused before it is read whole.
    (json.dumps({"device_id": "d", "csr_pem": "x" * 2 * MAX_PEM_CHARS}).encode(), 413, "oversized"),
    # Within it, a CSR past its own cap.
    (
        json.dumps({"device_id": "d", "csr_pem": "x" * (MAX_PEM_CHARS + 1)}).encode(),
        422,
        "malformed_request",
    ),
    (json.dumps({"device_id": "d", "admin": True}).encode(), 422, "malformed_request"),
    (json.dumps({"device_id": 7}).encode(), 422, "malformed_request"),
    (json.dumps({"device_id": "a/b/#"}).encode(), 422, "malformed_request"),
    (json.dumps({"device_id": "d" * 65}).encode(), 422, "malformed_request"),
    (b"[" * 5000 + b"]" * 5000, 400, ""),
    (b'{"device_id": "d", "device_class": NaN}', 422, ""),
    (b"", 422, "malformed_request"),
    (b"\xff\xfe", 422, "malformed_request"),
]


async def test_hostile_enrolment_bodies_get_a_4xx_with_a_reason(
    make_coordinator: MakeCoordinator,
) -> None:
    async with (
        make_coordinator() as c,
        httpx.AsyncClient(base_url=str(c.api_url), timeout=10) as api,
    ):
        op = operator_token(c)
        (claim,) = await make_claims(api, op, uses=100_000)
        url = f"{c.api_url}{routes.ENROLL}"
        headers = {**bearer(claim["token"]), "content-type": "application/json"}

        def post(body: bytes) -> tuple[int, Any]:
            r = httpx.post(url, content=body, headers=headers, timeout=10)
            return r.status_code, r.json()

        for body, status, reason in NAMED:
            got, answer = await asyncio.to_thread(post, body)
            assert 400 <= got < 500, (body[:80], got, answer)
            assert answer["reason"], answer
            if reason:
                assert (got, answer["reason"]) == (status, reason), (body[:80], answer)

        @settings(
            max_examples=150,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(body=bodies)
        def hostile(body: bytes) -> None:
            status, answer = post(body)
            assert status < 500, (body, answer)
            if status != 201:
                assert 400 <= status < 500
                assert isinstance(answer.get("reason"), str), answer

        await asyncio.to_thread(hostile)
        listed = (await api.get(routes.CLAIMS, headers=bearer(op))).json()
        enrolled = listed[0]["uses"]
        assert enrolled <= 1  # a random body may be a valid enrolment, at most once per id
