"""Verifying releases: the one interface a device (and ``lepton release verify``) calls.

What a device does with a bundle, in order, each step refusing with a
:class:`ReleaseRefused` whose ``reason`` is a
:data:`~lepton.protocol.releases.RefusalReason`:

1. :func:`load_root` its pinned trust root (and later roots by TUF's rotation rules;
   :func:`apply_root_chain` walks a bundle's ``trust/root.<N>.json`` files);
2. :func:`open_bundle`: the signed manifest (the bundle's first member) by
   :func:`verify_manifest` before any other member is read, then only the listed regular
   files, then :func:`verify_files` (exactly that set, each length and sha256);
3. :func:`check_policy`: kind, device class, no rollback, not below the device's floor.

Signatures (Ed25519, DSSE) are :mod:`lepton.common.signing`; the trust rules are
:mod:`lepton.common.trust`, the bundle and files :mod:`lepton.common.bundle`. This module and
those need only ``msgspec`` and ``cryptography`` (both in the agent extra).
"""

from __future__ import annotations

from lepton.common.bundle import (
    BUNDLE_MANIFEST,
    open_bundle,
    open_bundle_raw,
    read_bundle_manifest,
    verify_files,
)
from lepton.common.signing import ReleaseRefused
from lepton.common.trust import (
    ROOT_CHAIN_DIR,
    apply_root_chain,
    check_policy,
    class_matches,
    load_root,
    root_chain,
    verify_manifest,
)

__all__ = [
    "BUNDLE_MANIFEST",
    "ROOT_CHAIN_DIR",
    "ReleaseRefused",
    "apply_root_chain",
    "check_policy",
    "class_matches",
    "load_root",
    "open_bundle",
    "open_bundle_raw",
    "read_bundle_manifest",
    "root_chain",
    "verify_files",
    "verify_manifest",
]
