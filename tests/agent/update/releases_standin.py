"""A minimal stand-in for :mod:`lepton.common.releases` and :mod:`lepton.common.signing`,
used by these tests ONLY while that module (another branch's) is not in this tree.

It follows the interface in the release design (verify the DSSE signatures over the exact
bytes, then decode; key expiry and revocation; manifest expiry; policy; files) closely enough
for the A/B tests, and is never imported by lepton itself: when the real module exists, the
tests use it instead (``ensure_releases``).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import shutil
import sys
import tarfile
import types
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from lepton.common.errors import LeptonError
from lepton.protocol.releases import (
    MANIFEST_TYPE,
    ROOT_TYPE,
    Envelope,
    Key,
    Manifest,
    Root,
    Signature,
    pae,
    parse_version,
)

BUNDLE_MANIFEST = "manifest.dsse.json"


class ReleaseRefused(LeptonError):  # noqa: N818 (the real module's name)
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def public_key(k: Ed25519PrivateKey, expires: int | None = None) -> Key:
    raw = k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return Key(
        keyid=hashlib.sha256(raw).hexdigest(),
        public=base64.b64encode(raw).decode(),
        expires=expires,
    )


def sign(payload: bytes, payload_type: str, keys: list[Ed25519PrivateKey]) -> bytes:
    sigs = [
        Signature(
            keyid=public_key(k).keyid,
            sig=base64.b64encode(k.sign(pae(payload_type, payload))).decode(),
        )
        for k in keys
    ]
    env = Envelope(
        payloadType=payload_type, payload=base64.b64encode(payload).decode(), signatures=sigs
    )
    return msgspec.json.encode(env)


def _check(
    raw: bytes, ptype: str, keys: list[Key], threshold: int, revoked: list[str], now: float
) -> bytes:
    try:
        env = msgspec.json.decode(raw, type=Envelope)
        payload = env.payload_bytes()
    except (msgspec.DecodeError, ValueError) as exc:
        raise ReleaseRefused("malformed", str(exc)) from exc
    if env.payloadType != ptype:
        raise ReleaseRefused("wrong_type", env.payloadType)
    if not env.signatures:
        raise ReleaseRefused("unsigned")
    by_id = {k.keyid: k for k in keys}
    good: set[str] = set()
    reason = "unknown_key"
    for s in env.signatures:
        if s.keyid in revoked:
            reason = "revoked_key"
            continue
        key = by_id.get(s.keyid)
        if key is None:
            continue
        if key.expires is not None and key.expires < now:
            reason = "expired_key"
            continue
        try:
            Ed25519PublicKey.from_public_bytes(base64.b64decode(key.public)).verify(
                base64.b64decode(s.sig), pae(ptype, payload)
            )
        except Exception:
            reason = "bad_signature"
            continue
        good.add(s.keyid)
    if len(good) < threshold:
        raise ReleaseRefused(reason, f"{len(good)} of {threshold}")
    return payload


def load_root(raw: bytes, *, trusted: Root | None, now: float) -> Root:
    env = msgspec.json.decode(raw, type=Envelope)
    root = msgspec.json.decode(env.payload_bytes(), type=Root)
    ref = trusted or root
    _check(raw, ROOT_TYPE, ref.root_keys, ref.root_threshold, ref.revoked, now)
    if root.expires < now:
        raise ReleaseRefused("root_expired")
    return root


def verify_manifest(raw: bytes, root: Root, *, now: float) -> Manifest:
    payload = _check(
        raw, MANIFEST_TYPE, root.release_keys, root.release_threshold, root.revoked, now
    )
    try:
        m = msgspec.json.decode(payload, type=Manifest)
    except msgspec.DecodeError as exc:
        raise ReleaseRefused("malformed", str(exc)) from exc
    if m.expires < now:
        raise ReleaseRefused("expired")
    if parse_version(m.security_floor) > parse_version(m.version):
        raise ReleaseRefused("floor_above_version")
    return m


def class_matches(m: Manifest, device_class: str) -> bool:
    return any(fnmatch.fnmatchcase(device_class, p) for p in m.device_classes)


def check_policy(
    m: Manifest, *, kind: str, device_class: str, running: str | None, floor: str | None
) -> None:
    if m.kind != kind:
        raise ReleaseRefused("wrong_kind", m.kind)
    if not class_matches(m, device_class):
        raise ReleaseRefused("wrong_class", device_class)
    if running and parse_version(m.version) <= parse_version(running):
        raise ReleaseRefused("rollback", f"{m.version} <= {running}")
    if floor and parse_version(m.version) < parse_version(floor):
        raise ReleaseRefused("below_floor", f"{m.version} < {floor}")


def verify_files(m: Manifest, directory: Path) -> None:
    listed = {f.path: f for f in m.files}
    found = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    extra = found - set(listed)
    if extra:
        raise ReleaseRefused("unlisted_file", sorted(extra)[0])
    for path, f in listed.items():
        p = directory / path
        if not p.is_file():
            raise ReleaseRefused("missing_file", path)
        data = p.read_bytes()
        if len(data) != f.length or hashlib.sha256(data).hexdigest() != f.sha256:
            raise ReleaseRefused("tampered", path)


def open_bundle(tar_path: Path, dest: Path, root: Root, *, now: float) -> Manifest:
    with tarfile.open(tar_path) as tar:
        first = tar.next()
        if first is None or first.name != BUNDLE_MANIFEST:
            raise ReleaseRefused("malformed", "no manifest first")
        fh = tar.extractfile(first)
        assert fh is not None
        raw = fh.read()
        m = verify_manifest(raw, root, now=now)
        listed = {f.path for f in m.files}
        dest.mkdir(parents=True, exist_ok=True)
        for member in tar:
            if member.offset == first.offset:
                continue
            if member.name not in listed or not member.isfile():
                raise ReleaseRefused("unlisted_file", member.name)
            src = tar.extractfile(member)
            assert src is not None
            out = dest / member.name
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("wb") as fh2:
                shutil.copyfileobj(src, fh2)
    verify_files(m, dest)
    return m


def manifest_bytes(m: Manifest) -> bytes:
    return json.dumps(msgspec.to_builtins(m)).encode()


def ensure_releases() -> types.ModuleType:
    """The real :mod:`lepton.common.releases` if present, else this stand-in under its name."""
    try:
        import lepton.common.releases as real

        return real
    except ImportError:
        me = sys.modules[__name__]
        sys.modules["lepton.common.releases"] = me
        import lepton.common

        lepton.common.releases = me  # type: ignore[attr-defined]
        return me


def source_text() -> str:
    """This module's text, made importable as ``lepton.common.releases`` in a built image."""
    return Path(__file__).read_text()
