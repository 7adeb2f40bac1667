"""Real keys, roots, manifests and bundle tars for the release tests (no mocks: every bundle
is signed with real Ed25519 keys, and hostile tars are written with tarfile)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lepton.common.releases import BUNDLE_MANIFEST
from lepton.common.signing import canonical_json, generate_key, public_key, sign
from lepton.protocol.releases import (
    MANIFEST_TYPE,
    ROOT_TYPE,
    AgentInstall,
    FileEntry,
    Manifest,
    Root,
)

NOW = 1_800_000_000.0
HOUR = 3600


@dataclass
class Trust:
    """A root key, release keys and the root naming them."""

    root_keys: list[Ed25519PrivateKey]
    release: list[Ed25519PrivateKey]
    root: Root
    extra: dict[str, Ed25519PrivateKey] = field(default_factory=dict)

    def root_raw(self, signers: Sequence[Ed25519PrivateKey] | None = None) -> bytes:
        return sign(canonical_json(self.root), ROOT_TYPE, signers or self.root_keys)


def make_trust(
    *,
    releases: int = 1,
    release_threshold: int = 1,
    release_expires: int | None = None,
    revoked: Sequence[str] = (),
    version: int = 1,
    expires: float = NOW + 365 * 24 * HOUR,
) -> Trust:
    root_key = generate_key()
    release = [generate_key() for _ in range(releases)]
    root = Root(
        version=version,
        expires=int(expires),
        root_keys=[public_key(root_key)],
        release_keys=[public_key(k, expires=release_expires) for k in release],
        release_threshold=release_threshold,
        revoked=list(revoked),
    )
    return Trust(root_keys=[root_key], release=release, root=root)


def manifest_for(
    files: dict[str, bytes],
    *,
    version: str = "1.2.0",
    classes: Sequence[str] = ("rpi4",),
    floor: str = "1.0.0",
    kind: str = "agent",
    expires: float = NOW + HOUR,
) -> Manifest:
    return Manifest(
        kind=kind,  # type: ignore[arg-type]
        name="lepton-agent",
        version=version,
        device_classes=list(classes),
        files=[
            FileEntry(path=p, sha256=hashlib.sha256(b).hexdigest(), length=len(b))
            for p, b in sorted(files.items())
        ],
        security_floor=floor,
        created=int(NOW - HOUR),
        expires=int(expires),
        install=AgentInstall(requirement=f"lepton-fleet[agent]=={version}")
        if kind == "agent"
        else None,
    )


def signed(m: Manifest, keys: Sequence[Ed25519PrivateKey]) -> bytes:
    return sign(canonical_json(m), MANIFEST_TYPE, keys)


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def write_tar(path: Path, members: Sequence[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def bundle(path: Path, manifest_raw: bytes, files: dict[str, bytes]) -> Path:
    """A well-formed bundle: the manifest first, then the files in path order."""
    members = [regular(BUNDLE_MANIFEST, manifest_raw)]
    members += [regular(p, b) for p, b in sorted(files.items())]
    return write_tar(path, members)


FILES = {
    "wheels/lepton_fleet-1.2.0-py3-none-any.whl": b"wheel bytes " * 50,
    "config/agent.toml": b'[device]\nfleet = "default"\n',
    "systemd/lepton-agent.service": b"[Service]\nExecStart=/bin/true\n",
}


def good(trust: Trust, **manifest: object) -> tuple[Manifest, bytes]:
    m = manifest_for(FILES, **manifest)  # type: ignore[arg-type]
    return m, signed(m, trust.release)
