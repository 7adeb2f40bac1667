"""Claim redemption in SQL, on SQLite and PostgreSQL: one use is one identity, however many
enrolments race for it, and a refused redemption writes nothing."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from lepton.coordinator.auth import credentials
from lepton.coordinator.auth.enrolment_store import EnrolmentRefusedError, EnrolmentStore
from lepton.coordinator.store import Store


def unique(name: str) -> str:
    """PostgreSQL's tests share one database: names of their own."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def uses_of(s: EnrolmentStore, *names: str) -> dict[str, int]:
    return {c.name: c.uses for c in s.list_claims() if c.name in names}


def claim(s: EnrolmentStore, name: str, *, uses: int = 1, expires_in: float = 3600.0) -> str:
    token = credentials.new("claim")
    s.create_claims(
        [
            {
                "name": name,
                "token_hash": credentials.digest(token),
                "created_by": "test",
                "expires_at": time.time() + expires_in,
                "max_uses": uses,
                "device_class": None,
                "device_group": None,
            }
        ]
    )
    return credentials.digest(token)


def redeem(s: EnrolmentStore, claim_hash: str, device_id: str) -> str:
    return s.redeem(
        claim_hash,
        device_id,
        credentials.digest(credentials.new("device")),
        device_class=None,
        device_group=None,
    )


@pytest.mark.parametrize("uses", [1, 3])
def test_racing_redemptions_get_exactly_the_claims_uses(store: Store, uses: int) -> None:
    s = EnrolmentStore(store.engine)
    name, dev = unique("c1"), unique("dev")
    h = claim(s, name, uses=uses)
    n = 12
    start = threading.Barrier(n)
    won: list[str] = []
    lost: list[str] = []

    def one(i: int) -> None:
        start.wait()
        try:
            redeem(s, h, f"{dev}-{i}")
            won.append(f"{dev}-{i}")
        except EnrolmentRefusedError as exc:
            lost.append(exc.reason)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == uses
    assert lost == ["claim_used"] * (n - uses)
    assert uses_of(s, name) == {name: uses}
    assert {d for d in won if s.identity(d) is not None} == set(won)
    others = [f"{dev}-{i}" for i in range(n) if f"{dev}-{i}" not in won]
    assert all(s.identity(d) is None for d in others)


def test_a_live_identity_is_never_replaced_and_the_refusal_uses_nothing(store: Store) -> None:
    s = EnrolmentStore(store.engine)
    c1, c2, dev = unique("c1"), unique("c2"), unique("dev")
    first, second = claim(s, c1), claim(s, c2)
    redeem(s, first, dev)
    with pytest.raises(EnrolmentRefusedError) as refused:
        redeem(s, second, dev)
    assert refused.value.reason == "already_enrolled"
    assert uses_of(s, c1, c2) == {c1: 1, c2: 0}
    s.revoke_device(dev, "operator:t")
    assert dev in s.revoked_ids()
    redeem(s, second, dev)
    assert dev not in s.revoked_ids()
    identity = s.identity(dev)
    assert identity is not None
    assert identity.claim == c2


def test_expired_revoked_and_unknown_claims_redeem_nothing(store: Store) -> None:
    s = EnrolmentStore(store.engine)
    gone, dev = unique("gone"), unique("dev")
    expired = claim(s, unique("old"), expires_in=-1)
    revoked = claim(s, gone)
    s.revoke_claim(gone)
    for h, reason in (
        (expired, "claim_expired"),
        (revoked, "claim_revoked"),
        ("0" * 64, "unknown_claim"),
    ):
        with pytest.raises(EnrolmentRefusedError) as refused:
            redeem(s, h, dev)
        assert refused.value.reason == reason
    assert s.identity(dev) is None
