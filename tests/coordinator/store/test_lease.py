"""The scheduling lease on both backends: compare-and-set, expiry, fencing epochs."""

from __future__ import annotations

import threading

from lepton.coordinator.store import Store

T0 = 1_700_000_000.0


def test_acquire_renew_takeover_release(store: Store) -> None:
    mine = store.leases.acquire_lease("scheduler", "a", T0, 10)
    assert mine is not None
    assert mine.epoch == 1
    assert store.leases.acquire_lease("scheduler", "b", T0 + 5, 10) is None
    again = store.leases.acquire_lease("scheduler", "a", T0 + 5, 10)
    assert again is not None
    assert again.epoch == 1
    assert again.expires_at == T0 + 15
    renewed = store.leases.renew_lease(mine, T0 + 6, 10)
    assert renewed is not None
    assert renewed.expires_at == T0 + 16
    theirs = store.leases.acquire_lease("scheduler", "b", T0 + 17, 10)
    assert theirs is not None
    assert theirs.epoch == 2
    assert store.leases.renew_lease(mine, T0 + 18, 10) is None  # lost: another epoch
    assert store.leases.release_lease(mine) is False
    assert store.leases.release_lease(theirs) is True
    back = store.leases.acquire_lease("scheduler", "a", T0 + 19, 10)
    assert back is not None
    assert back.epoch == 3
    holder = store.leases.lease_holder("scheduler")
    assert holder is not None
    assert holder.holder == "a"


def test_only_one_of_many_contenders_wins(store: Store) -> None:
    wins: list[str] = []
    barrier = threading.Barrier(6)

    def contend(name: str) -> None:
        barrier.wait()
        if store.leases.acquire_lease("scheduler", name, T0, 10) is not None:
            wins.append(name)

    threads = [threading.Thread(target=contend, args=(f"r{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
