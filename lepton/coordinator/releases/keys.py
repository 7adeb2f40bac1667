"""The release key directory: root and release keys, and the chain of signed trust roots.

Layout of a key directory (kept offline, or at least off the coordinator; every key 0600)::

    root-<id16>.key        a root key (PEM PKCS#8 Ed25519); signs roots only
    release-<id16>.key     a release key; signs manifests (CI holds it)
    root.<N>.json          every root version ever signed (the chain devices walk)
    root.json              a copy of the newest: what a device is provisioned with

Every change (a release key added, one revoked, the root key rotated, the expiry renewed)
writes the next root version, signed by the current root keys and, on rotation, by the new
ones too, so a device holding any earlier root can walk to it
(:func:`lepton.common.releases.apply_root_chain`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lepton.common.errors import LeptonError
from lepton.common.releases import load_root, root_chain
from lepton.common.signing import (
    KeyFileError,
    canonical_json,
    generate_key,
    load_private_key,
    public_key,
    save_private_key,
    sign,
)
from lepton.protocol.releases import ROOT_TYPE, Key, Root

ROOT_JSON: Final = "root.json"
DAY: Final = 86400
ROOT_DAYS: Final = 365
RELEASE_KEY_DAYS: Final = 365


class KeyStoreError(LeptonError):
    """The key directory cannot do what was asked (missing, already set up, no such key,
    not enough root keys to sign)."""


@dataclass(frozen=True, kw_only=True)
class RootChange:
    """A root version written: the root, where, and the key id the change is about."""

    root: Root
    path: Path
    keyid: str | None = None


def _key_path(directory: Path, role: str, k: Ed25519PrivateKey) -> Path:
    return directory / f"{role}-{public_key(k).keyid[:16]}.key"


class KeyStore:
    """One key directory (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def chain(self) -> list[Path]:
        """``root.<N>.json`` files, oldest first."""
        return [p for _, p in root_chain(self.directory)]

    def current(self, *, now: float | None = None) -> Root:
        """The newest root, walked from ``root.1.json`` by the rotation rules (so a
        directory whose files were swapped or mis-signed fails here, not on a device).
        Expiry is not checked: an expired root can still sign its successor."""
        chain = self.chain()
        if not chain:
            raise KeyStoreError(f"{self.directory} holds no root.<N>.json; run `keys init`")
        t = time.time() if now is None else now
        root: Root | None = None
        for path in chain:
            root = load_root(path.read_bytes(), trusted=root, now=t, check_expiry=False)
        assert root is not None
        return root

    def private_keys(self, keyids: Sequence[str]) -> list[Ed25519PrivateKey]:
        """The private keys in the directory whose ids are in ``keyids``."""
        wanted, found = set(keyids), []
        for path in sorted(self.directory.glob("*.key")):
            try:
                k = load_private_key(path)
            except KeyFileError as exc:
                raise KeyStoreError(str(exc)) from exc
            if public_key(k).keyid in wanted:
                found.append(k)
        return found

    def _signers(self, root: Root) -> list[Ed25519PrivateKey]:
        keys = self.private_keys([k.keyid for k in root.root_keys])
        if len(keys) < root.root_threshold:
            raise KeyStoreError(
                f"root v{root.version} needs {root.root_threshold} root key(s);"
                f" {len(keys)} found in {self.directory}"
            )
        return keys

    def _write(self, root: Root, signers: Sequence[Ed25519PrivateKey]) -> Path:
        raw = sign(canonical_json(root), ROOT_TYPE, signers)
        path = self.directory / f"root.{root.version}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        tmp = self.directory / f".{ROOT_JSON}.tmp"
        tmp.write_bytes(raw)
        tmp.replace(self.directory / ROOT_JSON)
        return path

    def _next(
        self,
        old: Root,
        *,
        now: float,
        root_days: int,
        root_keys: list[Key] | None = None,
        release_keys: list[Key] | None = None,
        revoked: list[str] | None = None,
        extra_signers: Sequence[Ed25519PrivateKey] = (),
    ) -> tuple[Root, Path]:
        new = Root(
            version=old.version + 1,
            expires=int(now) + root_days * DAY,
            root_keys=old.root_keys if root_keys is None else root_keys,
            root_threshold=old.root_threshold,
            release_keys=old.release_keys if release_keys is None else release_keys,
            release_threshold=old.release_threshold,
            revoked=old.revoked if revoked is None else revoked,
        )
        return new, self._write(new, [*self._signers(old), *extra_signers])

    def init(
        self,
        *,
        now: float | None = None,
        root_days: int = ROOT_DAYS,
        release_days: int = RELEASE_KEY_DAYS,
    ) -> tuple[RootChange, str]:
        """A root key, a first release key and root v1 signed by the root key. Returns the
        change (keyid: the root key) and the release key's id."""
        t = int(time.time() if now is None else now)
        if self.chain() or list(self.directory.glob("*.key")):
            raise KeyStoreError(f"{self.directory} already holds keys or roots")
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        root_key, release_key = generate_key(), generate_key()
        save_private_key(_key_path(self.directory, "root", root_key), root_key)
        save_private_key(_key_path(self.directory, "release", release_key), release_key)
        release = public_key(release_key, expires=t + release_days * DAY)
        root = Root(
            version=1,
            expires=t + root_days * DAY,
            root_keys=[public_key(root_key)],
            release_keys=[release],
        )
        path = self._write(root, [root_key])
        return RootChange(root=root, path=path, keyid=public_key(root_key).keyid), release.keyid

    def add_release_key(
        self, *, now: float | None = None, days: int = RELEASE_KEY_DAYS, root_days: int = ROOT_DAYS
    ) -> RootChange:
        """A new release key, and the next root naming it besides the others."""
        t = time.time() if now is None else now
        old = self.current(now=t)
        k = generate_key()
        key = public_key(k, expires=int(t) + days * DAY)
        save_private_key(_key_path(self.directory, "release", k), k)
        new, path = self._next(
            old, now=t, root_days=root_days, release_keys=[*old.release_keys, key]
        )
        return RootChange(root=new, path=path, keyid=key.keyid)

    def revoke(
        self, keyid: str, *, now: float | None = None, root_days: int = ROOT_DAYS
    ) -> RootChange:
        """The next root without release key ``keyid`` and with it revoked (devices then
        refuse anything it signed, even under an older root that named it)."""
        t = time.time() if now is None else now
        old = self.current(now=t)
        if keyid not in {k.keyid for k in old.release_keys}:
            raise KeyStoreError(f"{keyid[:16]} is not a release key of root v{old.version}")
        new, path = self._next(
            old,
            now=t,
            root_days=root_days,
            release_keys=[k for k in old.release_keys if k.keyid != keyid],
            revoked=sorted({*old.revoked, keyid}),
        )
        return RootChange(root=new, path=path, keyid=keyid)

    def renew(self, *, now: float | None = None, root_days: int = ROOT_DAYS) -> RootChange:
        """The next root, unchanged but for a fresh expiry (a root must be renewed before
        it expires: a device refuses an expired pinned root)."""
        t = time.time() if now is None else now
        old = self.current(now=t)
        new, path = self._next(old, now=t, root_days=root_days)
        return RootChange(root=new, path=path)

    def rotate_root(self, *, now: float | None = None, root_days: int = ROOT_DAYS) -> RootChange:
        """A new root key replacing the current ones: the next root names only it and is
        signed by the old root keys *and* the new one (the old key files stay, unused)."""
        t = time.time() if now is None else now
        old = self.current(now=t)
        k = generate_key()
        save_private_key(_key_path(self.directory, "root", k), k)
        new, path = self._next(
            old, now=t, root_days=root_days, root_keys=[public_key(k)], extra_signers=[k]
        )
        return RootChange(root=new, path=path, keyid=public_key(k).keyid)
