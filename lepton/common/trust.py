"""Trust roots and signed manifests: which keys a device trusts, and what it accepts.

A device pins a trust root (:class:`~lepton.protocol.releases.Root`) at provisioning. A new
root is accepted by TUF's rules: a threshold of the *old* root's keys and a threshold of its
*own* keys signed it, its version is exactly the next one, and it has not expired. A manifest
is accepted when a threshold of the root's release keys (not revoked, not expired) signed its
exact bytes; only then is it decoded, and then it must be unexpired (freeze) and its security
floor must not be above its own version. :func:`check_policy` is the device's side: kind,
device class, no rollback, nothing below the device's floor.

Public names are re-exported by :mod:`lepton.common.releases`; import them from there.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import msgspec

from lepton.common.signing import (
    ReleaseRefused,
    decode_envelope,
    payload_of,
    trusted_public,
    verify_envelope,
)
from lepton.protocol.releases import (
    MANIFEST_TYPE,
    MAX_ENVELOPE_BYTES,
    ROOT_TYPE,
    Manifest,
    Root,
    parse_version,
)

#: Where a bundle carries newer trust roots: ``trust/root.<N>.json``.
ROOT_CHAIN_DIR = "trust"
_ROOT_FILE = re.compile(r"\Aroot\.([1-9][0-9]{0,9})\.json\Z")


def _decode_root(payload: bytes) -> Root:
    try:
        root = msgspec.json.decode(payload, type=Root)
    except msgspec.DecodeError as exc:
        raise ReleaseRefused("malformed", f"root: {exc}") from None
    for key in (*root.root_keys, *root.release_keys):
        if trusted_public(key) is None:
            raise ReleaseRefused("malformed", f"root names key {key.keyid[:16]} wrongly")
    if root.root_threshold > len({k.keyid for k in root.root_keys}):
        raise ReleaseRefused("malformed", "root threshold above the number of root keys")
    return root


def _unverified_payload(raw: bytes) -> bytes:
    """The payload of an envelope before any signature check: only for a first root, whose
    keys are inside it (it is then verified against them at once)."""
    return payload_of(decode_envelope(raw))


def _by_threshold(raw: bytes, root: Root, *, now: float, revoked: list[str]) -> bytes:
    return verify_envelope(
        raw,
        ROOT_TYPE,
        {k.keyid: k for k in root.root_keys},
        root.root_threshold,
        revoked=set(revoked),
        now=now,
    )


def load_root(raw: bytes, *, trusted: Root | None, now: float, check_expiry: bool = True) -> Root:
    """The root in ``raw`` (a DSSE envelope of a :class:`Root`), once it is trusted.

    ``trusted=None``: a first root (a device's pinned file), accepted when a threshold of its
    own root keys signed it. Otherwise a rotation from ``trusted``: a threshold of the old
    root keys *and* of the new one's signed it, and its version is ``trusted.version + 1``
    (``root_version`` otherwise). ``root_expired`` when it expired at ``now``, unless
    ``check_expiry`` is false (TUF checks expiry on the last root of a chain only, so a
    device that slept through a root's life can still walk the chain).
    """
    if trusted is None:
        root = _decode_root(_unverified_payload(raw))
        _by_threshold(raw, root, now=now, revoked=root.revoked)
    else:
        payload = _by_threshold(raw, trusted, now=now, revoked=trusted.revoked)
        root = _decode_root(payload)
        if root.version != trusted.version + 1:
            raise ReleaseRefused("root_version", f"root v{root.version} after v{trusted.version}")
        _by_threshold(raw, root, now=now, revoked=root.revoked)
    if check_expiry and root.expires <= now:
        raise ReleaseRefused("root_expired", f"root v{root.version} expired at {root.expires}")
    return root


def root_chain(directory: Path) -> list[tuple[int, Path]]:
    """The ``root.<N>.json`` files in ``directory`` (a bundle's ``trust/``), by N."""
    if not directory.is_dir():
        return []
    found = [(_ROOT_FILE.match(p.name), p) for p in directory.iterdir()]
    return sorted((int(m.group(1)), p) for m, p in found if m is not None)


def apply_root_chain(trusted: Root, directory: Path, *, now: float) -> tuple[Root, bytes | None]:
    """Walk the newer roots in ``directory`` (``root.<N>.json``, N above the trusted
    version) in order, each by :func:`load_root` from the one before; the last must not be
    expired. Returns the newest root and its raw envelope (None when nothing was newer): the
    device pins those bytes as its new root. A gap, a file whose version is not its name's,
    or any refusal refuses the whole chain."""
    current, latest = trusted, None
    for number, path in root_chain(directory):
        if number <= trusted.version:
            continue
        if number != current.version + 1:
            raise ReleaseRefused("root_version", f"{path.name} after v{current.version}")
        raw = path.read_bytes()[: MAX_ENVELOPE_BYTES + 1]
        current = load_root(raw, trusted=current, now=now, check_expiry=False)
        latest = raw
    if latest is not None and current.expires <= now:
        raise ReleaseRefused("root_expired", f"root v{current.version} expired")
    return current, latest


def _folders(paths: set[str]) -> set[str]:
    """Every folder the paths lie in: ``a/b/c`` -> ``a``, ``a/b``."""
    return {p[:i] for p in paths for i, ch in enumerate(p) if ch == "/"}


def verify_manifest(raw: bytes, root: Root, *, now: float) -> Manifest:
    """The manifest in ``raw`` once a threshold of ``root``'s release keys signed its exact
    bytes (before they are decoded); then decoded strictly, ``expired`` past its expiry,
    ``floor_above_version`` when its floor is above its version, ``malformed`` when a file is
    listed twice or inside another listed file, the self-test names an unlisted file, or an
    agent image says not how to install it."""
    payload = verify_envelope(
        raw,
        MANIFEST_TYPE,
        {k.keyid: k for k in root.release_keys},
        root.release_threshold,
        revoked=set(root.revoked),
        now=now,
    )
    try:
        m = msgspec.json.decode(payload, type=Manifest)
    except msgspec.DecodeError as exc:
        raise ReleaseRefused("malformed", f"manifest: {exc}") from None
    paths = {f.path for f in m.files}
    if len(paths) != len(m.files):
        raise ReleaseRefused("malformed", "a file is listed twice")
    if _folders(paths) & paths:
        raise ReleaseRefused("malformed", "a listed file is also a listed file's folder")
    if m.self_test is not None:
        needed = {m.self_test.model, m.self_test.inputs, m.self_test.expected}
        if not needed <= paths:
            raise ReleaseRefused("malformed", "the self-test names a file that is not listed")
    if m.kind == "agent" and m.install is None:
        raise ReleaseRefused("malformed", "an agent release without install instructions")
    if m.expires <= now:
        raise ReleaseRefused("expired", f"{m.name} {m.version} expired at {m.expires}")
    if parse_version(m.security_floor) > parse_version(m.version):
        raise ReleaseRefused(
            "floor_above_version", f"floor {m.security_floor} above version {m.version}"
        )
    return m


def class_matches(m: Manifest, device_class: str) -> bool:
    """Whether ``device_class`` matches one of the manifest's patterns (fnmatch, case
    sensitive: ``jetson-orin-*`` matches ``jetson-orin-nano``)."""
    return any(fnmatch.fnmatchcase(device_class, p) for p in m.device_classes)


def check_policy(
    m: Manifest, *, kind: str, device_class: str, running: str | None, floor: str | None
) -> None:
    """Whether a device of ``device_class`` that runs ``running`` with security floor
    ``floor`` may take ``m`` as a ``kind`` release: ``wrong_kind``, ``wrong_class``,
    ``rollback`` (not above the running version, equal included), ``below_floor``."""
    if m.kind != kind:
        raise ReleaseRefused("wrong_kind", f"a {m.kind} release, wanted {kind}")
    if not class_matches(m, device_class):
        raise ReleaseRefused(
            "wrong_class", f"for {', '.join(m.device_classes)}, not {device_class}"
        )
    version = parse_version(m.version)
    if running is not None and version <= parse_version(running):
        raise ReleaseRefused("rollback", f"{m.version} is not above the running {running}")
    if floor is not None and version < parse_version(floor):
        raise ReleaseRefused("below_floor", f"{m.version} is below the floor {floor}")
