"""The release contract: signed manifests, trust roots, and a device's update status.

A release (an agent image for a device class, or a model) is described by a
:class:`Manifest`: its name, version, the device classes it is for, every file it holds with
its sha256 and length, a security floor (the lowest version a device that installs it may ever
go back to) and an expiry. Manifests and trust roots travel inside a DSSE envelope
(:class:`Envelope`, https://github.com/secure-systems-lab/dsse): the signatures cover the exact
payload bytes (through :func:`pae`), so a receiver checks them *before* it decodes the payload.

Trust follows TUF's root role: a :class:`Root`, signed by a threshold of the offline root keys,
names the root keys, the release keys (which sign manifests) with their expiries, and the key
ids that are revoked. A new root is accepted only when a threshold of the old root's keys *and*
of its own keys signed it, and its version is the next one (:mod:`lepton.common.releases`
checks all of it; this module is pure structure and arithmetic, no cryptography and no I/O).

:class:`~lepton.protocol.messages.UpdateStatus`, in the birth message, is what a device reports
about its updates: which version it runs, whether the last one was committed or rolled back,
and why.
"""

from __future__ import annotations

import base64
import re
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

#: ``payloadType`` of a signed release manifest and of a signed trust root.
MANIFEST_TYPE: Final = "application/vnd.lepton.manifest+json"
ROOT_TYPE: Final = "application/vnd.lepton.root+json"

#: A signed envelope (a manifest with thousands of files, or a root) stays under this.
MAX_ENVELOPE_BYTES: Final = 1 << 20
MAX_FILES: Final = 4096
MAX_SIGNATURES: Final = 16
MAX_KEYS: Final = 64
#: A single file in a bundle (a wheel, a model): 2 GiB.
MAX_FILE_BYTES: Final = 2 << 30

VERSION_PATTERN: Final = r"\A(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\Z"
_VERSION = re.compile(VERSION_PATTERN)
#: A relative POSIX path inside a bundle: no leading ``/``, no component that starts with a dot
#: (so no ``..``), no backslash, no empty component.
_SEGMENT: Final = r"[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*"
PATH_PATTERN: Final = rf"\A{_SEGMENT}(?:/{_SEGMENT})*\Z"
HEX64: Final = r"\A[0-9a-f]{64}\Z"
#: A device class label as agents report it (``rpi5``, ``jetson-orin-nano``, ``x86_64``), or
#: an fnmatch pattern of them in a manifest (``jetson-orin-*``).
CLASS_PATTERN: Final = r"\A[A-Za-z0-9._:/*?-]{1,64}\Z"
RELEASE_NAME_PATTERN: Final = r"\A[A-Za-z0-9._-]{1,64}\Z"

VersionText = Annotated[str, Meta(pattern=VERSION_PATTERN)]
KeyId = Annotated[str, Meta(pattern=HEX64)]
Digest = Annotated[str, Meta(pattern=HEX64)]
Base64 = Annotated[str, Meta(max_length=4 * (MAX_ENVELOPE_BYTES // 3 + 1))]
UnixTime = Annotated[int, Meta(ge=0, le=10**11)]
ReleaseName = Annotated[str, Meta(pattern=RELEASE_NAME_PATTERN)]
DeviceClass = Annotated[str, Meta(pattern=CLASS_PATTERN)]
ReleaseKind = Literal["agent", "model"]
Url = Annotated[str, Meta(min_length=1, max_length=4096)]


def parse_version(text: str) -> tuple[int, int, int]:
    """``"1.4.0"`` as ``(1, 4, 0)``; ``ValueError`` for anything but three plain integers."""
    found = _VERSION.match(text)
    if found is None:
        raise ValueError(f"not a MAJOR.MINOR.PATCH version: {text[:40]!r}")
    major, minor, patch = (int(g) for g in found.groups())
    return major, minor, patch


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what a signature covers."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


class Signature(msgspec.Struct, frozen=True, kw_only=True):
    keyid: KeyId
    sig: Annotated[str, Meta(max_length=128)]


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """A DSSE envelope: base64 payload, its type, and signatures over :func:`pae`."""

    payloadType: Annotated[str, Meta(max_length=128)]  # noqa: N815 (DSSE's field name)
    payload: Base64
    signatures: Annotated[list[Signature], Meta(max_length=MAX_SIGNATURES)]

    def payload_bytes(self) -> bytes:
        """The decoded payload (``ValueError`` when it is not base64)."""
        return base64.b64decode(self.payload, validate=True)


class FileEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    path: Annotated[str, Meta(max_length=255, pattern=PATH_PATTERN)]
    sha256: Digest
    length: Annotated[int, Meta(ge=0, le=MAX_FILE_BYTES)]


class AgentInstall(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a device installs an agent image: ``requirement`` from the bundle's ``wheels/``
    only (``pip install --no-index --find-links wheels``) into a fresh virtual environment."""

    requirement: Annotated[str, Meta(max_length=256, pattern=r"\A[A-Za-z0-9._\[\],=<>!~ -]+\Z")]
    python: Annotated[str, Meta(max_length=16, pattern=r"\A3\.[0-9]{1,2}\Z")] = "3.11"


class SelfTest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The health check a new version must pass before it is committed: the bundle's model at
    ``model`` run on the reference inputs at ``inputs`` (an ``.npz`` with ``x``) must give the
    labels at ``expected`` (``.npz`` with ``y``) for at least ``min_agreement`` of them."""

    model: Annotated[str, Meta(max_length=255, pattern=PATH_PATTERN)]
    inputs: Annotated[str, Meta(max_length=255, pattern=PATH_PATTERN)]
    expected: Annotated[str, Meta(max_length=255, pattern=PATH_PATTERN)]
    min_agreement: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.99


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """One release for one or more device classes: what is in it and the rules for taking it."""

    type: Literal["release"] = "release"
    kind: ReleaseKind
    name: ReleaseName
    version: VersionText
    device_classes: Annotated[list[DeviceClass], Meta(min_length=1, max_length=16)]
    files: Annotated[list[FileEntry], Meta(min_length=1, max_length=MAX_FILES)]
    security_floor: VersionText
    created: UnixTime
    expires: UnixTime
    install: AgentInstall | None = None
    self_test: SelfTest | None = None
    notes: Annotated[str, Meta(max_length=4096)] = ""


class Key(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An Ed25519 public key; ``keyid`` is the sha256 of its 32 raw bytes, in hex."""

    keyid: KeyId
    scheme: Literal["ed25519"] = "ed25519"
    public: Annotated[str, Meta(min_length=44, max_length=44)]
    expires: UnixTime | None = None


class Root(msgspec.Struct, frozen=True, kw_only=True):
    """The trust root: who may sign roots and releases, and which keys are revoked."""

    type: Literal["root"] = "root"
    version: Annotated[int, Meta(ge=1, le=2**31)]
    expires: UnixTime
    root_keys: Annotated[list[Key], Meta(min_length=1, max_length=MAX_KEYS)]
    root_threshold: Annotated[int, Meta(ge=1, le=MAX_KEYS)] = 1
    release_keys: Annotated[list[Key], Meta(max_length=MAX_KEYS)]
    release_threshold: Annotated[int, Meta(ge=1, le=MAX_KEYS)] = 1
    revoked: Annotated[list[KeyId], Meta(max_length=4096)] = msgspec.field(default_factory=list)


#: Why a device refused a release (each is a :class:`~lepton.common.releases.ReleaseRefused`
#: reason and a label of its refusal counter).
RefusalReason = Literal[
    "malformed",  # not an envelope, or a payload that does not decode
    "oversized",
    "wrong_type",  # payloadType is not a manifest (or a root)
    "unsigned",  # no signature at all
    "unknown_key",  # signed only by keys the root does not name
    "revoked_key",
    "expired_key",
    "bad_signature",  # below the threshold of valid signatures
    "expired",  # the manifest's expiry passed (freeze attack)
    "wrong_class",
    "wrong_kind",
    "rollback",  # not above the running version
    "below_floor",  # below the device's security floor
    "floor_above_version",  # a manifest whose own floor is above its version
    "tampered",  # a file's length or sha256 differs from the manifest
    "missing_file",
    "unlisted_file",  # a file the manifest does not name (mix-and-match)
    "root_version",  # a new root that is not the next version
    "root_expired",
]


# ---------------------------------------------------------------- the install and revert tasks
# (their parameter and output structs; lepton.protocol.tasks registers them with the other
# kinds' and uses the same base configuration: defaults left out of parameters on the wire)


class _Params(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    pass


class _Output(msgspec.Struct, frozen=True, kw_only=True):
    pass


#: How long a new version has to prove itself healthy before its device goes back by itself.
MAX_HEALTH_DEADLINE_S: Final = 3600.0


class InstallParams(_Params, frozen=True, kw_only=True):
    """``install``: fetch the signed manifest envelope at ``manifest_url`` (``manifest_size``
    bytes, sha256 ``manifest_digest``), check it against the device's trust root, fetch each
    file it names from ``blob_base`` + its sha256, verify, and hand the bundle to the device's
    installer. The task's result says the bundle was staged (or refused, and why); what became
    of it (committed, rolled back) arrives in the device's :class:`~lepton.protocol.messages.
    UpdateStatus`."""

    release: Annotated[str, Meta(pattern=r"\A[A-Za-z0-9._-]{1,64}\Z")]
    version: VersionText
    manifest_digest: Annotated[str, Meta(pattern=HEX64)]
    manifest_size: Annotated[int, Meta(gt=0, le=1 << 20)]
    manifest_url: Url
    blob_base: Url
    health_deadline_s: Annotated[float, Meta(gt=0.0, le=MAX_HEALTH_DEADLINE_S)] = 300.0
    rollout: Annotated[str, Meta(max_length=64)] | None = None


class InstallOutput(_Output, frozen=True, kw_only=True):
    release: str
    version: str
    outcome: Literal["staged", "refused", "already_running"]
    reason: str = ""
    bytes_downloaded: int = 0
    running_version: str = ""


class RevertParams(_Params, frozen=True, kw_only=True):
    """``revert``: go back to the version in the other slot, ``to_version``, with the same
    health check as an install; refused when that slot holds another version or one below
    the device's security floor."""

    to_version: VersionText
    health_deadline_s: Annotated[float, Meta(gt=0.0, le=MAX_HEALTH_DEADLINE_S)] = 300.0
    rollout: Annotated[str, Meta(max_length=64)] | None = None


class RevertOutput(_Output, frozen=True, kw_only=True):
    outcome: Literal["staged", "refused", "already_running"]
    version: str
    reason: str = ""
    running_version: str = ""
