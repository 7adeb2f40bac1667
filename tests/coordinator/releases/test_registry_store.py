"""The release store and device update repository on SQLite and PostgreSQL: publishing is
idempotent (also when two publishers race), versions sort numerically, an overlapping
manifest of a published version conflicts; an update status is written only when it
changed and never replaced by an older one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lepton.common.releases import load_root
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.coordinator.releases.store import (
    DeviceUpdateRepo,
    ReleaseConflictError,
    ReleaseStore,
)
from lepton.coordinator.store import Store
from lepton.protocol.messages import UpdateStatus
from tests.support.release_bundles import Trust, bundle


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'c.db'}"
    else:
        url = str(request.getfixturevalue("pg_url"))
    s = Store.open(url, sqlite_synchronous="normal")
    yield s
    s.close()


@pytest.fixture
def trust() -> Trust:
    return Trust()


@pytest.fixture
def releases(store: Store, trust: Trust, tmp_path: Path) -> ReleaseStore:
    registry = ModelRegistry(store.engine, tmp_path / "data", create_tables=False)
    root = load_root(trust.root_bytes(), trusted=None, now=time.time())
    return ReleaseStore(store.engine, registry, lambda: root, work_dir=tmp_path / "incoming")


def test_publishing_is_idempotent_and_versions_sort_numerically(
    releases: ReleaseStore, trust: Trust, tmp_path: Path
) -> None:
    for version in ("1.9.0", "1.10.0", "1.2.0"):
        path, _, _ = bundle(
            tmp_path / f"{version}.tar", trust, {"f": version.encode()}, version=version
        )
        (first,) = releases.publish(path, published_by="operator:ci")
        (again,) = releases.publish(path)
        assert again == first
    assert [r.version for r in releases.list()] == ["1.2.0", "1.9.0", "1.10.0"]
    assert [r.version for r in releases.list("nothing")] == []
    (rec,) = releases.get("lepton-agent", "1.10.0")
    assert rec.published_by == "operator:ci"
    assert releases.by_manifest(rec.manifest_digest) == rec
    assert [f.path for f in releases.files(rec.id)] == ["f"]


def test_two_publishers_of_one_bundle_make_one_release(
    releases: ReleaseStore, trust: Trust, tmp_path: Path
) -> None:
    path, _, _ = bundle(tmp_path / "b.tar", trust, {"f": b"x" * 1000})
    got: list[object] = []
    barrier = threading.Barrier(4)

    def publish() -> None:
        barrier.wait()
        got.append(releases.publish(path))

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 4
    assert len({repr(g) for g in got}) == 1
    assert len(releases.list()) == 1


def test_overlapping_manifests_of_one_version_conflict(
    releases: ReleaseStore, trust: Trust, tmp_path: Path
) -> None:
    a, _, _ = bundle(tmp_path / "a.tar", trust, {"f": b"a"}, classes=("rpi5", "rpi4"))
    releases.publish(a)
    b, _, _ = bundle(tmp_path / "b.tar", trust, {"f": b"b"}, classes=("rpi?",))
    with pytest.raises(ReleaseConflictError):
        releases.publish(b)
    model, _, _ = bundle(tmp_path / "m.tar", trust, {"f": b"m"}, kind="model", classes=("x86_64",))
    with pytest.raises(ReleaseConflictError, match="published already as agent"):
        releases.publish(model)
    assert len(releases.get("lepton-agent", "1.1.0")) == 1


def test_update_status_is_written_only_when_it_changed(store: Store) -> None:
    repo = DeviceUpdateRepo(store.engine)
    now = time.time()
    trial = UpdateStatus(version="1.1.0", outcome="trial", target="1.1.0", slot="b", at=now)
    assert repo.put("pi-1", trial)
    assert not repo.put("pi-1", trial)  # the same, received again
    assert not repo.put("pi-1", UpdateStatus(version="1.0.0", outcome="committed", at=now - 1))
    done = UpdateStatus(
        version="1.1.0", outcome="committed", target="1.1.0", slot="b", floor="1.1.0", at=now + 1
    )
    changed = repo.put_many([("pi-1", done), ("pi-2", trial)], received_at=now + 2)
    assert [(d.device_id, d.outcome) for d in changed] == [("pi-1", "committed"), ("pi-2", "trial")]
    stored = repo.get_many(["pi-1", "pi-2", "pi-3"])
    assert set(stored) == {"pi-1", "pi-2"}
    assert (stored["pi-1"].floor, stored["pi-1"].received_at) == ("1.1.0", now + 2)
