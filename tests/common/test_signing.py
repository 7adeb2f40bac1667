"""Ed25519 keys and DSSE envelopes (lepton.common.signing), with real keys."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from lepton.common.signing import (
    KeyFileError,
    ReleaseRefused,
    add_signatures,
    generate_key,
    load_private_key,
    public_key,
    save_private_key,
    sign,
    verify_envelope,
)
from lepton.protocol.releases import MAX_ENVELOPE_BYTES, Key, pae

TYPE = "application/vnd.test+json"
NOW = 1_800_000_000.0


def keymap(*keys: Key) -> dict[str, Key]:
    return {k.keyid: k for k in keys}


def test_key_id_is_the_sha256_of_the_raw_public_key() -> None:
    k = generate_key()
    raw = k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key = public_key(k, expires=123)
    assert key.keyid == hashlib.sha256(raw).hexdigest()
    assert base64.b64decode(key.public) == raw
    assert key.expires == 123


def test_private_key_file_is_0600_and_round_trips(tmp_path: Path) -> None:
    k = generate_key()
    path = save_private_key(tmp_path / "release.key", k)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_key(load_private_key(path)) == public_key(k)
    with pytest.raises(FileExistsError):
        save_private_key(path, generate_key())


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_key_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = save_private_key(tmp_path / "k.key", generate_key())
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="group or others"):
        load_private_key(path)


def test_not_a_key_and_a_symlinked_key_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"not a key")
    junk.chmod(0o600)
    with pytest.raises(KeyFileError, match="not an unencrypted PEM"):
        load_private_key(junk)
    real = save_private_key(tmp_path / "real.key", generate_key())
    (tmp_path / "link.key").symlink_to(real)
    with pytest.raises(KeyFileError):
        load_private_key(tmp_path / "link.key")


def test_envelope_is_canonical_and_deterministic() -> None:
    a, b = generate_key(), generate_key()
    raw = sign(b'{"x":1}', TYPE, [a, b])
    assert raw == sign(b'{"x":1}', TYPE, [b, a])  # order of keys does not matter
    doc = json.loads(raw)
    assert list(doc) == sorted(doc)
    assert b" " not in raw
    ids = [s["keyid"] for s in doc["signatures"]]
    assert ids == sorted(ids)
    assert len(ids) == 2


def test_verify_returns_the_exact_payload() -> None:
    k = generate_key()
    payload = b'{"b":2,"a":1}'
    raw = sign(payload, TYPE, [k])
    assert verify_envelope(raw, TYPE, keymap(public_key(k)), 1, revoked=(), now=NOW) == payload


def test_signature_covers_pae_of_type_and_payload() -> None:
    k = generate_key()
    sig = base64.b64decode(json.loads(sign(b"p", TYPE, [k]))["signatures"][0]["sig"])
    k.public_key().verify(sig, pae(TYPE, b"p"))


def test_threshold_counts_distinct_keys() -> None:
    a, b, c = generate_key(), generate_key(), generate_key()
    keys = keymap(public_key(a), public_key(b), public_key(c))
    two = sign(b"p", TYPE, [a, b])
    assert verify_envelope(two, TYPE, keys, 2, revoked=(), now=NOW) == b"p"
    with pytest.raises(ReleaseRefused) as info:
        verify_envelope(two, TYPE, keys, 3, revoked=(), now=NOW)
    assert info.value.reason == "bad_signature"
    # The same key's signature twice is one signature.
    doc = json.loads(sign(b"p", TYPE, [a]))
    doc["signatures"] *= 2
    with pytest.raises(ReleaseRefused) as info:
        verify_envelope(json.dumps(doc).encode(), TYPE, keys, 2, revoked=(), now=NOW)
    assert info.value.reason == "bad_signature"


def test_add_signatures_keeps_the_payload_and_adds_a_key() -> None:
    a, b = generate_key(), generate_key()
    raw = add_signatures(sign(b"p", TYPE, [a]), [b])
    assert raw == sign(b"p", TYPE, [a, b])
    keys = keymap(public_key(a), public_key(b))
    assert verify_envelope(raw, TYPE, keys, 2, revoked=(), now=NOW) == b"p"


def test_a_root_key_entry_whose_id_is_not_its_key_lends_no_trust() -> None:
    real, impostor = generate_key(), generate_key()
    # A key entry that carries the impostor's public key under the real key's id.
    forged = Key(keyid=public_key(real).keyid, public=public_key(impostor).public)
    raw = sign(b"p", TYPE, [impostor])
    with pytest.raises(ReleaseRefused) as info:
        verify_envelope(raw, TYPE, keymap(public_key(real)), 1, revoked=(), now=NOW)
    assert info.value.reason == "unknown_key"
    doc = json.loads(raw)
    doc["signatures"][0]["keyid"] = forged.keyid
    with pytest.raises(ReleaseRefused) as info:
        verify_envelope(
            json.dumps(doc).encode(), TYPE, {forged.keyid: forged}, 1, revoked=(), now=NOW
        )
    assert info.value.reason == "unknown_key"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "malformed"),
        (b'{"payloadType":"x"}', "malformed"),
        (b'{"payloadType":"' + TYPE.encode() + b'","payload":"***","signatures":[]}', "malformed"),
        (b" " * (MAX_ENVELOPE_BYTES + 1), "oversized"),
    ],
)
def test_garbage_is_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(ReleaseRefused) as info:
        verify_envelope(raw, TYPE, {}, 1, revoked=(), now=NOW)
    assert info.value.reason == reason


def test_threshold_below_one_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="threshold"):
        verify_envelope(sign(b"p", TYPE, [generate_key()]), TYPE, {}, 0, revoked=(), now=NOW)


def test_release_verification_needs_only_msgspec_and_cryptography() -> None:
    """What a device imports to verify a release loads nothing of the coordinator's or the
    agent's (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys, lepton.common.releases\n"
        "tops = {m.split('.')[0] for m in sys.modules if not m.startswith('_')}\n"
        "print(sorted(tops - set(sys.stdlib_module_names)))\n"
        "print(sorted(m for m in sys.modules if m.startswith('lepton.')))\n"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
        timeout=60,
        check=True,
    )
    external, ours = (json.loads(line.replace("'", '"')) for line in done.stdout.splitlines())
    assert set(external) <= {"cryptography", "lepton", "msgspec", "typing_extensions"}
    assert all(m.startswith(("lepton.common", "lepton.protocol")) for m in ours), ours
