"""Signed release bundles for tests, made the way ``lepton release build`` lays them out: a
tar whose first member is the DSSE manifest envelope, then the listed files. Keys are fresh
Ed25519 keys (:mod:`lepton.common.signing`); :class:`Trust` holds a root key, a release key
and the signed ``root.json`` naming them. Options make the hostile variants: files whose
bytes differ from the manifest, unlisted members, a manifest signed by another key."""

from __future__ import annotations

import hashlib
import io
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lepton.common.signing import canonical_json, generate_key, public_key, sign
from lepton.protocol.releases import (
    MANIFEST_TYPE,
    ROOT_TYPE,
    AgentInstall,
    FileEntry,
    Manifest,
    ReleaseKind,
    Root,
)

DAY = 86400


@dataclass
class Trust:
    """A root key and a release key, and the root that trusts them."""

    root_key: Ed25519PrivateKey = field(default_factory=generate_key)
    release_key: Ed25519PrivateKey = field(default_factory=generate_key)

    @property
    def root(self) -> Root:
        return Root(
            version=1,
            expires=int(time.time()) + 365 * DAY,
            root_keys=[public_key(self.root_key)],
            release_keys=[public_key(self.release_key)],
        )

    def root_bytes(self) -> bytes:
        return sign(canonical_json(self.root), ROOT_TYPE, [self.root_key])

    def write_root(self, path: Path) -> Path:
        path.write_bytes(self.root_bytes())
        return path


def manifest_of(
    files: Mapping[str, bytes],
    *,
    name: str = "lepton-agent",
    version: str = "1.1.0",
    classes: tuple[str, ...] = ("rpi5",),
    kind: ReleaseKind = "agent",
    floor: str = "0.0.0",
    expires_in: int = 30 * DAY,
) -> Manifest:
    now = int(time.time())
    return Manifest(
        kind=kind,
        name=name,
        version=version,
        device_classes=list(classes),
        files=[
            FileEntry(path=p, sha256=hashlib.sha256(b).hexdigest(), length=len(b))
            for p, b in sorted(files.items())
        ],
        security_floor=floor,
        created=now,
        expires=now + expires_in,
        install=AgentInstall(requirement="lepton-fleet") if kind == "agent" else None,
    )


def signed(m: Manifest, key: Ed25519PrivateKey) -> bytes:
    """The manifest's DSSE envelope, signed by ``key``."""
    return sign(canonical_json(m), MANIFEST_TYPE, [key])


def write_bundle(
    path: Path,
    envelope: bytes,
    files: Mapping[str, bytes],
    *,
    extra: Mapping[str, bytes] | None = None,
) -> Path:
    """A bundle tar at ``path``: the envelope, then ``files`` (their bytes as given, which
    may differ from the manifest's), then ``extra`` members (unlisted)."""
    with tarfile.open(path, "w") as tar:
        for member, data in [
            ("manifest.dsse.json", envelope),
            *sorted(files.items()),
            *(extra or {}).items(),
        ]:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def bundle(
    path: Path,
    trust: Trust,
    files: Mapping[str, bytes],
    *,
    key: Ed25519PrivateKey | None = None,
    served: Mapping[str, bytes] | None = None,
    extra: Mapping[str, bytes] | None = None,
    **manifest: object,
) -> tuple[Path, Manifest, bytes]:
    """A signed bundle of ``files`` (manifest options as in :func:`manifest_of`), signed by
    the trust's release key or ``key``; ``served``: other bytes put in the tar for some
    paths. Returns its path, manifest and envelope."""
    m = manifest_of(files, **manifest)  # type: ignore[arg-type]
    envelope = signed(m, key or trust.release_key)
    write_bundle(path, envelope, {**files, **(served or {})}, extra=extra)
    return path, m, envelope
