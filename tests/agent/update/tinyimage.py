"""A tiny agent image for installer tests: one hand-made wheel whose ``lepton-agent version``
prints the image's version (a real venv and a real offline pip install, in seconds), signed
into a staged request like the one :class:`~lepton.agent.update.updater.Updater` writes."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import zipfile
from pathlib import Path
from typing import Any

import msgspec

from lepton.common import signing
from lepton.protocol.releases import MANIFEST_TYPE, AgentInstall, FileEntry, Manifest
from tests.agent.update import images


def tiny_wheel(version: str, out: Path) -> Path:
    name = "lepton_tiny"
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"def main():\n    print({version!r})\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: lepton-tiny\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
        f"{dist}/entry_points.txt": f"[console_scripts]\nlepton-agent = {name}:main\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    wheel = out / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


def stage_request(
    keys: images.Keys,
    state_dir: Path,
    version: str,
    *,
    device_classes: tuple[str, ...] = ("test-*",),
    floor: str = "0.0.0",
    signer: Any = None,
    expires_in: int = 3600,
    deadline_s: float = 60.0,
) -> tuple[Path, Manifest]:
    """Stage a tiny image for ``version`` and write ``request.json``; the staging dir."""
    staging = state_dir / "update" / "staging" / f"t-{version}"
    wheel = tiny_wheel(version, staging / "wheels")
    entries = [
        FileEntry(
            path=f"wheels/{wheel.name}",
            sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
            length=wheel.stat().st_size,
        )
    ]
    now = int(time.time())
    manifest = Manifest(
        kind="agent",
        name="lepton-agent",
        version=version,
        device_classes=list(device_classes),
        files=entries,
        security_floor=floor,
        created=now,
        expires=now + expires_in,
        install=AgentInstall(requirement="lepton-tiny"),
    )
    raw = signing.sign(msgspec.json.encode(manifest), MANIFEST_TYPE, [signer or keys.release_key])
    request = {
        "kind": "install",
        "task_id": f"t-{version}",
        "version": version,
        "manifest_b64": base64.b64encode(raw).decode(),
        "files": str(staging),
        "deadline_s": deadline_s,
    }
    (state_dir / "update" / "request.json").write_text(json.dumps(request))
    return staging, manifest
