"""Publishing signed bundles through the coordinator's real HTTP API: a good one is stored
(its envelope and files in the blob store, its record listed), again is a no-op; every
refusal answers with its reason and stores nothing; scopes and tokens are enforced."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx

from lepton.common.signing import load_private_key
from lepton.coordinator.model_registry.feature import ModelRegistryFeature
from lepton.coordinator.releases.builder import build_bundle, manifest_digest
from lepton.coordinator.releases.feature import ReleasesFeature
from lepton.coordinator.releases.keys import KeyStore
from lepton.coordinator.service import Coordinator
from lepton.protocol import routes
from tests.coordinator.auth.enrolling import metric
from tests.coordinator.releases.buildkit import make_kit
from tests.coordinator.releases.conftest import MakeCoordinator
from tests.support.api import api_client, endpoint
from tests.support.release_bundles import Trust, bundle, manifest_of, signed, write_bundle

FILES = {"wheels/lepton_fleet-1.1.0-py3-none-any.whl": b"wheel " * 100, "notes.txt": b"hi"}


async def _publish(
    c: Coordinator, path: Path, scopes: tuple[str, ...] = ("rollouts:write",)
) -> httpx.Response:
    async with api_client(c, scopes, timeout=30) as api:
        return await api.post(routes.RELEASES, content=path.read_bytes())


def _stored(c: Coordinator, digest: str) -> bool:
    return c.feature(ModelRegistryFeature).registry.blobs.exists(digest)


async def test_a_signed_bundle_is_published_once_and_listed(
    releasing: Coordinator, trust: Trust, tmp_path: Path
) -> None:
    c = releasing
    path, m, envelope = bundle(tmp_path / "b.tar", trust, FILES, version="1.1.0")
    r = await _publish(c, path)
    assert r.status_code == 201, r.text
    (rec,) = r.json()["releases"]
    digest = hashlib.sha256(envelope).hexdigest()
    assert rec["name"] == "lepton-agent"
    assert rec["version"] == "1.1.0"
    assert rec["manifest_digest"] == digest
    assert rec["manifest_size"] == len(envelope)
    assert rec["file_count"] == 2
    assert rec["total_bytes"] == sum(len(b) for b in FILES.values())
    assert rec["device_classes"] == ["rpi5"]
    assert rec["published_by"].startswith("operator:")
    assert _stored(c, digest)
    for f in m.files:
        assert _stored(c, f.sha256)
    # The same bundle again: nothing new.
    again = await _publish(c, path)
    assert again.status_code == 200, again.text
    assert again.json()["releases"] == [rec]
    async with api_client(c, ("fleet:read",)) as api:
        listed = (await api.get(routes.RELEASES)).json()["releases"]
        assert listed == [rec]
        shown = await api.get(routes.path(routes.RELEASE, name="lepton-agent", version="1.1.0"))
        assert shown.status_code == 200
        (manifest,) = shown.json()["manifests"]
        assert {f["path"]: f["sha256"] for f in manifest["files"]} == {
            f.path: f.sha256 for f in m.files
        }
        missing = await api.get(routes.path(routes.RELEASE, name="lepton-agent", version="9.9.9"))
        assert missing.status_code == 404
    feature = c.feature(ReleasesFeature)
    assert [r.version for r in feature.releases.list("lepton-agent")] == ["1.1.0"]
    assert feature.releases.for_device("lepton-agent", "1.1.0", "rpi5") is not None
    assert feature.releases.for_device("lepton-agent", "1.1.0", "jetson-orin") is None
    assert metric(c, "lepton_release_publishes_total", {"outcome": "published"}) == 1
    assert metric(c, "lepton_release_publishes_total", {"outcome": "unchanged"}) == 1


async def test_refused_bundles_answer_their_reason_and_store_nothing(
    releasing: Coordinator, trust: Trust, tmp_path: Path
) -> None:
    c = releasing
    stranger = Trust()
    cases: dict[str, Path] = {}
    cases["tampered"], _, _ = bundle(tmp_path / "t.tar", trust, FILES, served={"notes.txt": b"ho"})
    cases["unknown_key"], _, _ = bundle(tmp_path / "u.tar", trust, FILES, key=stranger.release_key)
    cases["unlisted_file"], _, _ = bundle(
        tmp_path / "x.tar", trust, FILES, extra={"../../escape.txt": b"out"}
    )
    cases["expired"], _, _ = bundle(tmp_path / "e.tar", trust, FILES, expires_in=-10)
    cases["floor_above_version"], _, _ = bundle(
        tmp_path / "f.tar", trust, FILES, version="1.0.0", floor="2.0.0"
    )
    m = manifest_of(FILES)
    cases["missing_file"] = write_bundle(
        tmp_path / "m.tar", signed(m, trust.release_key), {"notes.txt": FILES["notes.txt"]}
    )
    # A signed manifest naming a path out of the bundle: refused as it is decoded, before
    # any member is extracted (the signature is good: the release key signed it).
    evil = {"../../outside.txt": b"out"}
    cases["malformed"] = write_bundle(
        tmp_path / "p.tar", signed(manifest_of(evil), trust.release_key), evil
    )
    garbage = tmp_path / "g.tar"
    garbage.write_bytes(os.urandom(4096))
    cases["garbage"] = garbage
    for case, path in cases.items():
        reason = "malformed" if case == "garbage" else case
        r = await _publish(c, path)
        assert r.status_code == 422, (case, r.text)
        assert r.json()["reason"] == reason, (case, r.json())
    assert metric(c, "lepton_release_publishes_total", {"outcome": "malformed"}) == 2
    assert metric(c, "lepton_release_publishes_total", {"outcome": "tampered"}) == 1
    data = Path(c.config.data_dir)
    for name in ("escape.txt", "outside.txt"):
        assert not list(tmp_path.parent.rglob(name))
        assert not list(data.parent.rglob(name))
    assert c.feature(ReleasesFeature).releases.list() == []
    # Nothing published: no file of any of them in the blob store.
    assert not _stored(c, hashlib.sha256(FILES["notes.txt"]).hexdigest())
    incoming = Path(c.config.data_dir) / "releases" / "incoming"
    assert list(incoming.iterdir()) == []  # uploads and scratch directories removed


async def test_another_manifest_of_a_published_version_conflicts(
    releasing: Coordinator, trust: Trust, tmp_path: Path
) -> None:
    c = releasing
    first, _, _ = bundle(tmp_path / "a.tar", trust, FILES, classes=("rpi*",))
    assert (await _publish(c, first)).status_code == 201
    other = {**FILES, "notes.txt": b"other notes"}
    clash, _, _ = bundle(tmp_path / "b.tar", trust, other, classes=("rpi5",))
    r = await _publish(c, clash)
    assert (r.status_code, r.json()["reason"]) == (409, "conflict"), r.text
    # The same version built for another architecture is a second manifest of it.
    jetson, _, _ = bundle(tmp_path / "c.tar", trust, other, classes=("jetson-*",))
    r = await _publish(c, jetson)
    assert r.status_code == 201, r.text
    feature = c.feature(ReleasesFeature)
    assert len(feature.releases.get("lepton-agent", "1.1.0")) == 2
    for_jetson = feature.releases.for_device("lepton-agent", "1.1.0", "jetson-orin")
    assert for_jetson is not None
    assert for_jetson.manifest_digest == r.json()["releases"][0]["manifest_digest"]


async def test_hostile_callers_are_refused(
    releasing: Coordinator, trust: Trust, tmp_path: Path
) -> None:
    c = releasing
    path, _, _ = bundle(tmp_path / "b.tar", trust, FILES)
    assert (await _publish(c, path, ("fleet:read",))).status_code == 403
    url = str(c.api_url)
    async with httpx.AsyncClient(base_url=url, timeout=10) as anonymous:
        r = await anonymous.post(routes.RELEASES, content=path.read_bytes())
        assert r.status_code == 401
        assert (await anonymous.get(routes.RELEASES)).status_code == 401
    # Over max_bundle_bytes: refused from Content-Length, and while streaming without one.
    big = tmp_path / "big.tar"
    big.write_bytes(b"\0" * ((1 << 20) + 1))
    r = await _publish(c, big)
    assert (r.status_code, r.json()["reason"]) == (413, "oversized")

    async def chunks() -> object:
        for _ in range(20):
            yield b"\0" * (64 << 10)

    async with endpoint(c, ("rollouts:write",)).client(timeout=10) as api:
        r = await api.post(routes.RELEASES, content=chunks())  # type: ignore[arg-type]
        assert (r.status_code, r.json()["reason"]) == (413, "oversized")
        r = await api.post(routes.RELEASES, content=b"")
        assert (r.status_code, r.json()["reason"]) == (422, "malformed")
    async with api_client(c, ("fleet:read",)) as api:
        for bad in ("..%2F..%2Fetc", "a%20b", "x" * 65):
            r = await api.get(f"/v1/releases/{bad}/1.0.0")
            assert r.status_code in (404, 422), (bad, r.status_code)
        r = await api.get("/v1/releases/lepton-agent/1.0")
        assert r.status_code == 422
        r = await api.get(routes.RELEASES, params={"name": "../x"})
        assert r.status_code == 422
    assert c.feature(ReleasesFeature).releases.list() == []


async def test_without_a_trust_root_publishing_is_off(
    make_coordinator: MakeCoordinator, trust: Trust, tmp_path: Path
) -> None:
    async with make_coordinator() as c:
        path, _, _ = bundle(tmp_path / "b.tar", trust, FILES)
        r = await _publish(c, path)
        assert (r.status_code, r.json()["reason"]) == (409, "no_trust_root")


async def test_a_bundle_from_the_release_builder_is_published(
    make_coordinator: MakeCoordinator, tmp_path: Path
) -> None:
    """What `lepton release build` writes (real pip over a local wheelhouse, the key
    directory's release key) publishes against that key directory's root.json."""
    kit = make_kit(tmp_path / "kit")
    built = build_bundle(
        kit.definition,
        version="1.2.0",
        wheelhouse=kit.wheelhouse,
        out_dir=kit.out,
        keys=[load_private_key(kit.release_key)],
        roots=KeyStore(kit.keys).chain(),
    )
    async with make_coordinator(releases__root_file=str(kit.root_json)) as c:
        r = await _publish(c, built)
        assert r.status_code == 201, r.text
        (rec,) = r.json()["releases"]
        assert (rec["name"], rec["version"]) == ("tinyagent", "1.2.0")
        assert (rec["manifest_digest"], rec["manifest_size"]) == manifest_digest(built)
        assert rec["device_classes"] == ["rpi4", "jetson-orin-*"]
        files = c.feature(ReleasesFeature).releases.files(rec["id"])
        assert len(files) == rec["file_count"] > 3
        assert all(_stored(c, f.sha256) for f in files)
