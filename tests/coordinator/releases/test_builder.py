"""Building signed agent images from a definition and a local wheelhouse (real pip, real
keys, real tars), and the definitions shipped in firmware_images/."""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path

import pytest

from lepton.common.releases import (
    BUNDLE_MANIFEST,
    ReleaseRefused,
    apply_root_chain,
    check_policy,
    load_root,
    open_bundle,
    read_bundle_manifest,
)
from lepton.common.signing import generate_key, load_private_key
from lepton.coordinator.releases.builder import (
    BuildError,
    build_bundle,
    manifest_digest,
    resign_bundle,
)
from lepton.coordinator.releases.definition import load_definition
from lepton.coordinator.releases.keys import KeyStore
from tests.coordinator.releases.buildkit import Kit, make_kit, make_wheel

REPO = Path(__file__).resolve().parents[3]
NOW = time.time()


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return make_kit(tmp_path)


def build(kit: Kit, version: str = "1.2.0", **kw: object) -> Path:
    return build_bundle(
        kit.definition,
        version=version,
        wheelhouse=kit.wheelhouse,
        out_dir=kit.out,
        keys=[load_private_key(kit.release_key)],
        roots=KeyStore(kit.keys).chain(),
        now=NOW,
        **kw,  # type: ignore[arg-type]
    )


def test_a_built_bundle_verifies_and_holds_exactly_the_image(kit: Kit, tmp_path: Path) -> None:
    bundle = build(kit)
    assert bundle.name == "tinyagent-1.2.0-tiny-arm64.bundle.tar"
    with tarfile.open(bundle) as tf:
        names = tf.getnames()
    assert names[0] == BUNDLE_MANIFEST
    root = load_root(kit.root_json.read_bytes(), trusted=None, now=NOW)
    m = open_bundle(bundle, tmp_path / "files", root, now=NOW)
    paths = [f.path for f in m.files]
    assert paths == sorted(paths) == names[1:]
    assert paths == [
        "config/agent.toml",
        "selftest/expected.npz",
        "selftest/inputs.npz",
        "selftest/model.onnx",
        "systemd/lepton-agent.service",
        "systemd/lepton-agent.service.d/jetson.conf",
        "trust/root.1.json",
        "wheels/tinyapp-1.2.0-py3-none-any.whl",  # the pinned version and its dependency,
        "wheels/tinydep-1.0-py3-none-any.whl",  # not the older one or an unrelated wheel
    ]
    assert m.install is not None
    assert m.install.requirement == "tinyapp==1.2.0"
    assert m.self_test is not None
    assert m.self_test.model == "selftest/model.onnx"
    assert m.security_floor == "1.0.0"
    assert m.expires == int(NOW) + 30 * 86400
    check_policy(m, kind="agent", device_class="jetson-orin-nano", running="1.1.0", floor="1.0.0")
    assert apply_root_chain(root, tmp_path / "files/trust", now=NOW) == (root, None)
    digest, size = manifest_digest(bundle)
    assert size == len(read_bundle_manifest(bundle))
    assert len(digest) == 64


def test_the_same_inputs_build_the_same_bytes(kit: Kit) -> None:
    first = build(kit).read_bytes()
    assert build(kit).read_bytes() == first


def test_overrides_and_extra_wheels(kit: Kit, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    make_wheel(extra, "tinyapp", "2.0.0", ("tinydep>=1.0",))
    bundle = build(
        kit,
        "2.0.0",
        wheels=[extra / "tinyapp-2.0.0-py3-none-any.whl"],
        floor="1.5.0",
        expires_days=2,
    )
    root = load_root(kit.root_json.read_bytes(), trusted=None, now=NOW)
    m = open_bundle(bundle, tmp_path / "files", root, now=NOW)
    assert "wheels/tinyapp-2.0.0-py3-none-any.whl" in {f.path for f in m.files}
    assert (m.security_floor, m.expires) == ("1.5.0", int(NOW) + 2 * 86400)


def test_a_version_the_wheelhouse_lacks_fails_without_downloading(kit: Kit) -> None:
    with pytest.raises(BuildError, match="pip could not gather"):
        build(kit, "3.0.0")
    assert not kit.out.exists() or not list(kit.out.glob("*.tar"))


def test_a_floor_above_the_version_is_not_built(kit: Kit) -> None:
    with pytest.raises(BuildError, match="floor"):
        build(kit, floor="1.3.0")


def test_a_second_signature_meets_a_threshold_of_two(kit: Kit, tmp_path: Path) -> None:
    store = KeyStore(kit.keys)
    change = store.add_release_key(now=NOW)
    import msgspec

    root = msgspec.structs.replace(change.root, release_threshold=2)
    bundle = build(kit)
    with pytest.raises(ReleaseRefused) as info:
        open_bundle(bundle, tmp_path / "a", root, now=NOW)
    assert info.value.reason == "bad_signature"
    second = next(p for p in kit.keys.glob("release-*.key") if p != kit.release_key)
    resign_bundle(bundle, [load_private_key(second)])
    assert len(json.loads(read_bundle_manifest(bundle))["signatures"]) == 2
    assert open_bundle(bundle, tmp_path / "b", root, now=NOW).version == "1.2.0"


def test_a_bundle_signed_by_a_key_the_root_does_not_name_is_refused(
    kit: Kit, tmp_path: Path
) -> None:
    bundle = build_bundle(
        kit.definition,
        version="1.2.0",
        wheelhouse=kit.wheelhouse,
        out_dir=kit.out,
        keys=[generate_key()],
        now=NOW,
    )
    root = load_root(kit.root_json.read_bytes(), trusted=None, now=NOW)
    with pytest.raises(ReleaseRefused) as info:
        open_bundle(bundle, tmp_path / "files", root, now=NOW)
    assert info.value.reason == "unknown_key"


def test_a_model_release_ships_no_wheels(kit: Kit, tmp_path: Path) -> None:
    model_def = kit.definition.parent / "digits-model.toml"
    model_def.write_text(
        'name = "digits"\nkind = "model"\ndevice_classes = ["*"]\nconfig = ""\n'
        'models = ["models/m.onnx"]\n'
    )
    bundle = build_bundle(
        model_def,
        version="3.0.0",
        wheelhouse=kit.wheelhouse,
        out_dir=kit.out,
        keys=[load_private_key(kit.release_key)],
        now=NOW,
    )
    root = load_root(kit.root_json.read_bytes(), trusted=None, now=NOW)
    m = open_bundle(bundle, tmp_path / "files", root, now=NOW)
    assert (m.kind, m.install) == ("model", None)
    assert [f.path for f in m.files] == ["models/m.onnx"]
    check_policy(m, kind="model", device_class="rpi5", running=None, floor=None)
    with pytest.raises(ReleaseRefused) as info:
        check_policy(m, kind="agent", device_class="rpi5", running=None, floor=None)
    assert info.value.reason == "wrong_kind"


def test_an_agent_image_without_platforms_is_not_built(kit: Kit) -> None:
    kit.definition.write_text(kit.definition.read_text().replace("platforms", "#platforms"))
    with pytest.raises(BuildError, match="platforms"):
        build(kit)


# The A/B updater's units (deploy/systemd/lepton-update.*) come with the device updater; the
# definitions name them already.
PENDING = {
    "deploy/systemd/lepton-update.path",
    "deploy/systemd/lepton-update.service",
    "deploy/systemd/lepton-update.timer",
}


@pytest.mark.parametrize(
    "path", sorted((REPO / "firmware_images").glob("*.toml")), ids=lambda p: p.stem
)
def test_shipped_definitions_load_and_name_files_that_exist(path: Path) -> None:
    d = load_definition(path)
    assert d.kind == "agent"
    assert d.requirement_for("1.2.3") == "lepton-fleet[agent]==1.2.3"
    named = [d.config, *d.units, *d.dropins, *d.models]
    if d.self_test is not None:
        named += [d.self_test.model, d.self_test.inputs, d.self_test.expected]
    missing = [n for n in named if n and n not in PENDING and not (REPO / n).is_file()]
    assert not missing


def test_shipped_definitions_cover_the_classes_agents_report() -> None:
    import fnmatch

    classes = [
        c
        for p in (REPO / "firmware_images").glob("*.toml")
        for c in load_definition(p).device_classes
    ]
    for reported in (
        "rpi4",
        "rpi5",
        "jetson-orin-nano",
        "jetson-orin-nx",
        "jetson-agx-orin",
        "x86_64",
        "x86-gateway",
    ):
        hits = [c for c in classes if fnmatch.fnmatchcase(reported, c)]
        assert len(hits) == 1, (reported, hits)
