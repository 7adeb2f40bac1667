"""Real agent images for the A/B tests: a wheelhouse, patched-version wheels of this tree,
signed bundles, and a device root provisioned with one of them.

Images are lean: the agent's dependencies without onnxruntime and numpy (the gate's self-test
is exercised with the real runtime in test_health.py, in this interpreter). The wheelhouse is
downloaded once per machine from the local package mirror (pip.conf's indexes) into
``$TMPDIR/lepton-update-wheelhouse``.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from lepton.common import releases, signing
from lepton.protocol.releases import (
    MANIFEST_TYPE,
    ROOT_TYPE,
    AgentInstall,
    FileEntry,
    Manifest,
    Root,
)

REPO = Path(__file__).resolve().parents[3]
DEPS = [
    "aiomqtt>=2.3,<3",
    "paho-mqtt>=2.1,<3",
    "psutil>=5.9",
    "httpx>=0.27",
    "h11>=0.14",
    "msgspec>=0.18",
    "cryptography>=42",
]
PIP_INDEX = [
    "--index-url", "file:///opt/pypi/simple",
    "--extra-index-url", "file:///opt/pypi-more/simple",
    "--find-links", "/opt/wheels",
]  # fmt: skip
DEVICE_CLASS = "test-x86"


def wheelhouse() -> Path:
    """The dependency wheels (downloaded once; reused by later runs)."""
    path = Path(tempfile.gettempdir()) / "lepton-update-wheelhouse"
    done = path / ".complete"
    if not done.exists():
        path.mkdir(exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "-d", str(path), *PIP_INDEX, *DEPS],
            check=True, timeout=300, capture_output=True,
        )  # fmt: skip
        done.touch()
    return path


@dataclass(frozen=True)
class Keys:
    root_key: Any
    release_key: Any
    root_json: bytes


def make_keys() -> Keys:
    root_key, release_key = signing.generate_key(), signing.generate_key()
    root = Root(
        version=1,
        expires=int(time.time()) + 86400,
        root_keys=[signing.public_key(root_key)],
        release_keys=[signing.public_key(release_key)],
    )
    raw = signing.sign(msgspec.json.encode(root), ROOT_TYPE, [root_key])
    return Keys(root_key, release_key, raw)


def build_wheel(version: str, out: Path, *, variant: str = "good") -> Path:
    """A wheel of this tree as ``lepton-fleet==version``; ``variant``: ``good``, ``crash``
    (``lepton-agent run`` exits 3 at once), ``no_broker`` (connects to the wrong port)."""
    src = out / f"src-{version}-{variant}"
    shutil.copytree(REPO / "lepton", src / "lepton", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "README.md", src / "README.md")
    pyproject = (REPO / "pyproject.toml").read_text()
    pyproject = re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', pyproject, count=1)
    lean = "agent = [\n" + "".join(f'    "{d}",\n' for d in DEPS if d[:7] != "msgspec") + "]\n"
    pyproject = re.sub(r"(?ms)^agent = \[\n.*?^\]\n", lean, pyproject, count=1)
    (src / "pyproject.toml").write_text(pyproject)
    init = src / "lepton/agent/__init__.py"
    init.write_text(re.sub(r'__version__ = ".*"', f'__version__ = "{version}"', init.read_text()))
    if variant == "crash":
        cli = src / "lepton/agent/cli.py"
        text = cli.read_text().replace(
            "    from lepton.agent.daemon import Agent\n",
            "    raise SystemExit(3)  # a broken image\n",
        )
        cli.write_text(text)
    elif variant == "no_broker":
        link = src / "lepton/agent/link.py"
        text = link.read_text().replace("cfg.broker.port,", "cfg.broker.port + 1,  # a bug", 1)
        assert text != link.read_text()
        link.write_text(text)
    dist = out / f"dist-{version}-{variant}"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(dist), str(src)],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    return next(dist.glob("lepton_fleet-*.whl"))


def build_bundle(
    keys: Keys, version: str, out: Path, *, variant: str = "good", floor: str = "0.0.0"
) -> Path:
    """A signed bundle tar: ``manifest.dsse.json`` first, then ``wheels/*.whl``."""
    wheel = build_wheel(version, out, variant=variant)
    files = {f"wheels/{p.name}": p for p in wheelhouse().glob("*.whl")}
    files[f"wheels/{wheel.name}"] = wheel
    entries = [
        FileEntry(path=name, sha256=hashlib.sha256(p.read_bytes()).hexdigest(),
                  length=p.stat().st_size)
        for name, p in sorted(files.items())
    ]  # fmt: skip
    now = int(time.time())
    manifest = Manifest(
        kind="agent",
        name="lepton-agent",
        version=version,
        device_classes=["test-*"],
        files=entries,
        security_floor=floor,
        created=now,
        expires=now + 86400,
        install=AgentInstall(requirement="lepton-fleet[agent]"),
    )
    raw = signing.sign(msgspec.json.encode(manifest), MANIFEST_TYPE, [keys.release_key])
    bundle = out / f"agent-{version}-{variant}.tar"
    with tarfile.open(bundle, "w") as tar:
        info = tarfile.TarInfo(releases.BUNDLE_MANIFEST)
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
        for name, p in sorted(files.items()):
            tar.add(p, arcname=name)
    return bundle


def provision(root: Path, bundle: Path, keys: Keys, work: Path) -> str:
    """A factory install, as an operator does it: ``lepton-agent update provision BUNDLE``
    (verified against the pinned root, slot a built and committed, ``bin/lepton-slot`` in
    place). Returns the version it printed."""
    etc = work / "provision-etc"
    etc.mkdir(parents=True, exist_ok=True)
    root_file = etc / "release-root.json"
    root_file.write_bytes(keys.root_json)
    config = etc / "agent.toml"
    config.write_text(
        f'[device]\nclass = "{DEVICE_CLASS}"\n[agent]\nstate_dir = "{work / "provision-state"}"\n'
        f'[update]\nroot = "{root}"\nroot_file = "{root_file}"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "lepton.agent", "update", "--config", str(config),
         "provision", str(bundle)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (root / "bin" / "lepton-slot").is_file()
    return done.stdout.split()[1]
