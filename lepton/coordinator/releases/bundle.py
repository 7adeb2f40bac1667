"""Opening an uploaded release bundle on the coordinator: the signed manifest envelope (the
tar's first member, bounded) and the listed files, verified against the coordinator's trust
root by :func:`lepton.common.releases.open_bundle` exactly as a device verifies them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lepton.common.releases import open_bundle, read_bundle_manifest
from lepton.protocol.releases import Manifest, Root


@dataclass(frozen=True, slots=True)
class OpenedBundle:
    """A verified bundle: its manifest, the exact envelope bytes, and where its files are."""

    manifest: Manifest
    envelope: bytes
    files_dir: Path


def open_verified(tar_path: Path, dest: Path, root: Root, *, now: float) -> OpenedBundle:
    """Verify the bundle at ``tar_path`` against ``root`` and extract its listed files under
    ``dest/files`` (``ReleaseRefused`` with the reason when anything fails). The caller owns
    ``tar_path``: nobody changes it between the two reads of its first member."""
    files_dir = dest / "files"
    manifest = open_bundle(tar_path, files_dir, root, now=now)
    return OpenedBundle(
        manifest=manifest, envelope=read_bundle_manifest(tar_path), files_dir=files_dir
    )
