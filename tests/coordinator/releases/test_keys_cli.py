"""``lepton release``: keys, build, sign and verify, through the real command line (the
``lepton`` entry point in a subprocess for exit codes; in-process for the rest)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lepton.common.releases import (
    apply_root_chain,
    load_root,
    read_bundle_manifest,
    verify_manifest,
)
from lepton.coordinator.cli.main import main
from lepton.coordinator.releases.keys import KeyStore
from tests.coordinator.releases.buildkit import Kit, make_kit

REPO = Path(__file__).resolve().parents[3]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    code = main(["release", *argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else {}


def lepton(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "lepton.coordinator.cli", "release", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_keys_init_writes_0600_keys_and_a_self_signed_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(capsys, "keys", "init", "--dir", str(tmp_path / "k"))
    assert code == 0
    keys = sorted((tmp_path / "k").glob("*.key"))
    assert [p.name.split("-")[0] for p in keys] == ["release", "root"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in keys)
    root = load_root((tmp_path / "k/root.json").read_bytes(), trusted=None, now=time.time())
    assert root.version == 1
    assert [k.keyid for k in root.root_keys] == [out["root_key"]]
    assert [k.keyid for k in root.release_keys] == [out["release_key"]]
    assert (tmp_path / "k/root.1.json").read_bytes() == (tmp_path / "k/root.json").read_bytes()
    code, _ = run(capsys, "keys", "init", "--dir", str(tmp_path / "k"))
    assert code == 1  # never overwrites a key directory


def test_every_key_change_is_the_next_root_and_a_device_walks_the_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "k"
    _, first = run(capsys, "keys", "init", "--dir", str(d))
    pinned = load_root((d / "root.json").read_bytes(), trusted=None, now=time.time())
    code, added = run(capsys, "keys", "add-release", "--dir", str(d))
    assert (code, added["root_version"]) == (0, 2)
    code, revoked = run(capsys, "keys", "revoke", first["release_key"][:12], "--dir", str(d))
    assert (code, revoked["root_version"], revoked["keyid"]) == (0, 3, first["release_key"])
    code, rotated = run(capsys, "keys", "rotate-root", "--dir", str(d))
    assert (code, rotated["root_version"]) == (0, 4)
    # A device pinned at v1 walks root.2..4 (each signed by its predecessor's root keys).
    root, raw = apply_root_chain(pinned, d, now=time.time())
    assert root.version == 4
    assert raw == (d / "root.json").read_bytes()
    assert [k.keyid for k in root.root_keys] == [rotated["keyid"]]
    assert [k.keyid for k in root.release_keys] == [added["keyid"]]
    assert root.revoked == [first["release_key"]]
    # The new root key alone now signs v5.
    for old in d.glob("root-*.key"):
        if rotated["keyid"][:16] not in old.name:
            old.unlink()
    assert run(capsys, "keys", "add-release", "--dir", str(d))[0] == 0
    assert KeyStore(d).current().version == 5
    code, renewed = run(capsys, "keys", "renew", "--dir", str(d), "--root-days", "2")
    assert (code, renewed["root_version"]) == (0, 6)
    assert abs(KeyStore(d).current().expires - (time.time() + 2 * 86400)) < 60
    code, _ = run(capsys, "keys", "revoke", "0000000000", "--dir", str(d))
    assert code == 2


def test_build_sign_verify_with_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kit: Kit = make_kit(tmp_path)
    args = [
        "build",
        str(kit.definition),
        "--version",
        "1.2.0",
        "--wheelhouse",
        str(kit.wheelhouse),
        "--key",
        str(kit.release_key),
        "--out",
        str(kit.out),
        "--trust",
        str(kit.keys),
    ]
    code, built = run(capsys, *args)
    assert code == 0
    bundle = Path(built["bundle"])
    assert bundle.name == "tinyagent-1.2.0-tiny-arm64.bundle.tar"
    root = str(kit.root_json)
    ok = lepton(
        "verify", str(bundle), "--root", root, "--device-class", "rpi4", "--running", "1.1.0"
    )
    assert ok.returncode == 0, ok.stderr
    assert "ok: tinyagent 1.2.0" in ok.stdout
    assert built["manifest_digest"] in ok.stdout
    for extra, reason in [
        (["--device-class", "rpi5"], "wrong_class"),
        (["--running", "1.2.0"], "rollback"),
        (["--floor", "1.3.0"], "below_floor"),
        (["--kind", "model"], "wrong_kind"),
    ]:
        refused = lepton("verify", str(bundle), "--root", root, *extra)
        assert refused.returncode == 3, refused.stderr
        assert reason in refused.stderr
    # Revoke the release key: the same bundle is refused under the new root.
    first = load_root(kit.root_json.read_bytes(), trusted=None, now=time.time()).release_keys[0]
    assert run(capsys, "keys", "revoke", first.keyid, "--dir", str(kit.keys))[0] == 0
    refused = lepton("verify", str(bundle), "--root", root)
    assert refused.returncode == 3
    assert "revoked_key" in refused.stderr
    # A second release key signs it; the manifest bytes change, the files do not.
    code, added = run(capsys, "keys", "add-release", "--dir", str(kit.keys))
    new_key = next(p for p in kit.keys.glob("release-*.key") if added["keyid"][:16] in p.name)
    code, signed = run(capsys, "sign", str(bundle), "--key", str(new_key))
    assert code == 0
    assert signed["manifest_digest"] != built["manifest_digest"]
    assert lepton("verify", str(bundle), "--root", root).returncode == 0
    now = time.time()
    latest = load_root(kit.root_json.read_bytes(), trusted=None, now=now)
    assert verify_manifest(read_bundle_manifest(bundle), latest, now=now).version == "1.2.0"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    kit = make_kit(tmp_path)
    kit.release_key.chmod(0o644)
    done = lepton(
        "build",
        str(kit.definition),
        "--version",
        "1.2.0",
        "--wheelhouse",
        str(kit.wheelhouse),
        "--key",
        str(kit.release_key),
        "--out",
        str(kit.out),
    )
    assert done.returncode == 2
    assert "group or others" in done.stderr
    kit.release_key.chmod(0o600)
    bad = tmp_path / "bad.toml"
    bad.write_text('device_classes = ["rpi4"]\nplatforms = ["linux_aarch64"]\nbogus = 1\n')
    done = lepton(
        "build",
        str(bad),
        "--version",
        "1.2.0",
        "--wheelhouse",
        str(kit.wheelhouse),
        "--key",
        str(kit.release_key),
        "--out",
        str(kit.out),
    )
    assert done.returncode == 2
    assert "bogus" in done.stderr
    assert (
        lepton(
            "verify", str(tmp_path / "none.tar"), "--root", str(tmp_path / "none.json")
        ).returncode
        == 2
    )
    not_a_bundle = tmp_path / "x.tar"
    not_a_bundle.write_bytes(b"junk" * 300)
    done = lepton("verify", str(not_a_bundle), "--root", str(kit.root_json))
    assert done.returncode == 3
    assert "malformed" in done.stderr
