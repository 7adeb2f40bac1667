"""A new device's first image (``lepton-agent update provision``): verified against the pinned
root like any update, installed into slot a with its venv, the boot step put in place and
committed; refused when tampered, for another class, or on a device that already has one."""

from __future__ import annotations

import base64
import json
import tarfile
from pathlib import Path

import pytest

from lepton.agent.update import installer, slots
from lepton.common import releases
from tests.agent.update import images
from tests.agent.update.tinyimage import stage_request


def _bundle(keys: images.Keys, tmp: Path, version: str, **kwargs: object) -> Path:
    """A bundle tar (manifest first, then the files) of the tiny image."""
    state = tmp / f"stage-{version}"
    (state / "update").mkdir(parents=True)
    staging, _ = stage_request(keys, state, version, **kwargs)  # type: ignore[arg-type]
    request = json.loads((state / "update" / "request.json").read_text())
    raw = base64.b64decode(request["manifest_b64"])
    bundle = tmp / f"tiny-{version}.bundle.tar"
    with tarfile.open(bundle, "w") as tar:
        info = tarfile.TarInfo(releases.BUNDLE_MANIFEST)
        info.size = len(raw)
        (tmp / "m").write_bytes(raw)
        with (tmp / "m").open("rb") as fh:
            tar.addfile(info, fh)
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(staging)))
    return bundle


def _provision(root: Path, bundle: Path, keys: images.Keys, tmp: Path, cls: str) -> str:
    root_file = tmp / "release-root.json"
    root_file.write_bytes(keys.root_json)
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    return installer.provision(
        root, bundle, trust_root_file=root_file, device_class=cls, work_dir=work
    )


def test_provision_installs_and_commits_slot_a(tmp_path: Path) -> None:
    keys = images.make_keys()
    root = tmp_path / "opt-lepton"
    bundle = _bundle(keys, tmp_path, "1.0.0", floor="0.9.0")
    assert _provision(root, bundle, keys, tmp_path, images.DEVICE_CLASS) == "1.0.0"
    state = slots.read_state(root)
    assert state["committed"] == {"slot": "a", "version": "1.0.0"}
    assert state["floor"] == "0.9.0"
    assert (root / "current").resolve() == (root / "slots" / "a").resolve()
    assert (root / "bin" / "lepton-slot").stat().st_mode & 0o111
    assert (root / "current" / "venv" / "bin" / "lepton-agent").exists()
    # A device that already runs an image takes updates, not a second first image.
    with pytest.raises(installer.InstallError) as err:
        _provision(root, _bundle(keys, tmp_path, "1.1.0"), keys, tmp_path, images.DEVICE_CLASS)
    assert err.value.reason == "busy"


@pytest.mark.parametrize(
    ("kwargs", "cls", "reason"),
    [
        ({}, "rpi5", "wrong_class"),
        ({"expires_in": -10}, images.DEVICE_CLASS, "expired"),
        ({"signer": "other"}, images.DEVICE_CLASS, "unknown_key"),
    ],
)
def test_provision_refusals_leave_nothing(
    tmp_path: Path, kwargs: dict[str, object], cls: str, reason: str
) -> None:
    keys = images.make_keys()
    if kwargs.get("signer") == "other":
        kwargs["signer"] = images.make_keys().release_key
    root = tmp_path / "opt-lepton"
    with pytest.raises(installer.InstallError) as err:
        _provision(root, _bundle(keys, tmp_path, "1.0.0", **kwargs), keys, tmp_path, cls)
    assert err.value.reason == reason
    assert not slots.read_state(root).get("committed")
    assert not (root / "slots" / "a").exists()
