"""The in-memory set of revoked devices: reloads, and local changes a reload overlapped."""

from __future__ import annotations

from lepton.coordinator.auth.revoked import RevokedDevices


def test_a_reload_that_overlapped_a_local_change_is_not_applied() -> None:
    db = {"a"}
    revoked = RevokedDevices(lambda: frozenset(db))
    assert revoked.refresh()
    assert "a" in revoked
    assert "b" not in revoked

    def slow_load() -> frozenset[str]:
        snapshot = frozenset(db)  # read before the enrolment below commits
        revoked.discard("a")  # this process re-enrolled "a" meanwhile
        return snapshot

    revoked.bind(slow_load)
    assert not revoked.refresh()
    assert "a" not in revoked  # the stale snapshot did not bring it back
    db.clear()
    revoked.bind(lambda: frozenset(db))
    assert revoked.refresh()
    assert len(revoked) == 0
