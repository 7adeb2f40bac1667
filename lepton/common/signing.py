"""Ed25519 keys and DSSE envelopes: sign release manifests and trust roots, and check them.

Keys are Ed25519 (:mod:`cryptography`); a key's id is the sha256 of its 32 raw public bytes in
hex (:class:`~lepton.protocol.releases.Key`). :func:`sign` makes a DSSE envelope whose
signatures cover :func:`~lepton.protocol.releases.pae` of the exact payload bytes, serialised
as canonical JSON (sorted keys, no whitespace), so the same payload and keys always give the
same bytes and the envelope's sha256 names it.

:func:`verify_envelope` is the one place signatures are checked. It bounds the input, decodes
the envelope only (never the payload), and returns the payload bytes only once a threshold
of *distinct*, known, unrevoked, unexpired keys signed them; every other outcome is a
:class:`ReleaseRefused` with one of the :data:`~lepton.protocol.releases.RefusalReason`
labels.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lepton.common.errors import LeptonError
from lepton.protocol.releases import (
    MAX_ENVELOPE_BYTES,
    MAX_SIGNATURES,
    Envelope,
    Key,
    RefusalReason,
    Signature,
    pae,
)

__all__ = [
    "KeyFileError",
    "ReleaseRefused",
    "add_signatures",
    "canonical_json",
    "decode_envelope",
    "generate_key",
    "key_id",
    "load_private_key",
    "payload_of",
    "public_key",
    "save_private_key",
    "sign",
    "trusted_public",
    "verify_envelope",
]


#: Why no trusted key signed, most telling first.
_KEY_REASONS: tuple[RefusalReason, ...] = ("revoked_key", "expired_key", "unknown_key")


class ReleaseRefused(LeptonError):  # noqa: N818 (the design's name: a refusal, not a fault)
    """A release, a manifest or a trust root was refused; ``reason`` says why in one of the
    :data:`~lepton.protocol.releases.RefusalReason` labels, ``detail`` in words."""

    def __init__(self, reason: RefusalReason, detail: str = "") -> None:
        self.reason: RefusalReason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class KeyFileError(LeptonError):
    """A private key file cannot be used: missing, unreadable, not an Ed25519 PEM key, or
    readable by the group or others."""


def generate_key() -> Ed25519PrivateKey:
    """A new Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_raw: bytes) -> str:
    """The id of a public key: sha256 of its 32 raw bytes, hex."""
    return hashlib.sha256(public_raw).hexdigest()


def public_key(k: Ed25519PrivateKey | Ed25519PublicKey, expires: int | None = None) -> Key:
    """The protocol :class:`Key` of ``k`` (its public half), expiring at ``expires`` (unix
    seconds) when given."""
    public = k.public_key() if isinstance(k, Ed25519PrivateKey) else k
    raw = _raw(public)
    return Key(keyid=key_id(raw), public=base64.b64encode(raw).decode(), expires=expires)


def save_private_key(path: str | Path, k: Ed25519PrivateKey, *, overwrite: bool = False) -> Path:
    """Write ``k`` to ``path`` as unencrypted PKCS#8 PEM, mode 0600, created that way (never
    readable by others, even for a moment). ``FileExistsError`` when the file exists and
    ``overwrite`` is false."""
    path = Path(path)
    pem = k.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_TRUNC
        fh.write(pem)
        fh.flush()
        os.fsync(fd)
    return path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 key in ``path`` (PEM). :class:`KeyFileError` when the file is missing,
    not such a key, or readable or writable by its group or others (a leaked signing key
    is a compromised release channel: refuse to use one that may have leaked)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise KeyFileError(f"cannot open key file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise KeyFileError(f"{path} is not a regular file")
        if mode & 0o077:
            raise KeyFileError(
                f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):04o});"
                f" chmod 600 {path}"
            )
        pem = fh.read(64 * 1024)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key")
    return key


def canonical_json(value: object) -> bytes:
    """``value`` as canonical JSON: keys sorted, no whitespace."""
    return msgspec.json.encode(value, order="sorted")


def _signature(k: Ed25519PrivateKey, message: bytes) -> Signature:
    return Signature(keyid=public_key(k).keyid, sig=base64.b64encode(k.sign(message)).decode())


def sign(payload: bytes, payload_type: str, keys: Sequence[Ed25519PrivateKey]) -> bytes:
    """A DSSE envelope of ``payload`` signed by each of ``keys`` (at least one), as canonical
    JSON bytes. Signatures are ordered by key id, one per distinct key."""
    if not keys:
        raise ValueError("sign needs at least one key")
    message = pae(payload_type, payload)
    sigs = {s.keyid: s for s in (_signature(k, message) for k in keys)}
    envelope = Envelope(
        payloadType=payload_type,
        payload=base64.b64encode(payload).decode(),
        signatures=[sigs[i] for i in sorted(sigs)],
    )
    return canonical_json(envelope)


def add_signatures(raw: bytes, keys: Sequence[Ed25519PrivateKey]) -> bytes:
    """``raw`` (an envelope) with signatures by ``keys`` added over the same payload bytes; a
    key that already signed is signed afresh. The payload is not checked here."""
    envelope = decode_envelope(raw)
    payload = payload_of(envelope)
    message = pae(envelope.payloadType, payload)
    sigs = {s.keyid: s for s in envelope.signatures}
    sigs.update((s.keyid, s) for s in (_signature(k, message) for k in keys))
    if len(sigs) > MAX_SIGNATURES:
        raise ValueError(f"an envelope holds at most {MAX_SIGNATURES} signatures")
    return canonical_json(
        Envelope(
            payloadType=envelope.payloadType,
            payload=envelope.payload,
            signatures=[sigs[i] for i in sorted(sigs)],
        )
    )


def decode_envelope(raw: bytes) -> Envelope:
    """The envelope in ``raw`` (payload not decoded): ``oversized`` or ``malformed``."""
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise ReleaseRefused("oversized", f"{len(raw)} bytes > {MAX_ENVELOPE_BYTES}")
    try:
        return msgspec.json.decode(raw, type=Envelope)
    except msgspec.DecodeError as exc:
        raise ReleaseRefused("malformed", f"not a DSSE envelope: {exc}") from None


def payload_of(envelope: Envelope) -> bytes:
    """The envelope's payload bytes (``malformed`` when not base64); not verified."""
    try:
        return envelope.payload_bytes()
    except (ValueError, binascii.Error):
        raise ReleaseRefused("malformed", "payload is not base64") from None


def trusted_public(key: Key) -> Ed25519PublicKey | None:
    """The key's public half, or None when it is not 32 bytes whose sha256 is its id (a
    root that names a key under another key's id must not lend it that id's trust)."""
    try:
        raw = base64.b64decode(key.public, validate=True)
        public = Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error):
        return None
    return public if key_id(raw) == key.keyid else None


def verify_envelope(
    raw: bytes,
    payload_type: str,
    keys: Mapping[str, Key],
    threshold: int,
    *,
    revoked: Collection[str],
    now: float,
) -> bytes:
    """The payload of ``raw`` once at least ``threshold`` distinct keys among ``keys`` (key id
    -> key), none of them revoked or expired at ``now``, signed it as ``payload_type``.

    Refusals (:class:`ReleaseRefused`): ``oversized`` past MAX_ENVELOPE_BYTES, ``malformed``
    for anything that is not an envelope, ``wrong_type``, ``unsigned`` with no signature at
    all; below the threshold, ``bad_signature`` when some signature by a trusted key failed
    or too few were valid, else the most specific of ``revoked_key``, ``expired_key`` and
    ``unknown_key``. Several signatures by one key count once.
    """
    if threshold < 1:
        raise ValueError("threshold must be at least 1")
    envelope = decode_envelope(raw)
    if envelope.payloadType != payload_type:
        raise ReleaseRefused(
            "wrong_type", f"payloadType {envelope.payloadType[:60]!r}, wanted {payload_type!r}"
        )
    payload = payload_of(envelope)
    if not envelope.signatures:
        raise ReleaseRefused("unsigned", "the envelope has no signature")
    message = pae(payload_type, payload)
    valid: set[str] = set()
    seen: dict[str, RefusalReason] = {}
    for s in envelope.signatures:
        if s.keyid in valid:
            continue
        key = keys.get(s.keyid)
        public = trusted_public(key) if key is not None else None
        if s.keyid in revoked:
            seen[s.keyid] = "revoked_key"
        elif key is None or public is None:
            seen.setdefault(s.keyid, "unknown_key")
        elif key.expires is not None and key.expires <= now:
            seen[s.keyid] = "expired_key"
        else:
            try:
                public.verify(base64.b64decode(s.sig, validate=True), message)
            except (InvalidSignature, ValueError, binascii.Error):
                seen[s.keyid] = "bad_signature"
                continue
            valid.add(s.keyid)
    if len(valid) >= threshold:
        return payload
    reasons = set(seen.values())
    detail = f"{len(valid)} valid signature(s) of {threshold} needed"
    if valid or "bad_signature" in reasons:
        raise ReleaseRefused("bad_signature", detail)
    # Every signature left a reason; name the most telling one.
    reason: RefusalReason = next((r for r in _KEY_REASONS if r in reasons), "unknown_key")
    raise ReleaseRefused(reason, detail)
