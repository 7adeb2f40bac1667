"""A published release as an ``install`` task's parameters: where a device fetches the
signed manifest envelope (the blob route of its digest) and its files (the blob route
prefix, to which the device appends each file's sha256)."""

from __future__ import annotations

from lepton.coordinator.releases.records import ReleaseRecord
from lepton.protocol import routes
from lepton.protocol.releases import InstallParams


def blob_base(base_url: str) -> str:
    """The prefix a file's sha256 is appended to: ``{base_url}/v1/blobs/``."""
    return base_url.rstrip("/") + routes.BLOB.removesuffix("{digest}")


def install_params(
    r: ReleaseRecord,
    base_url: str,
    *,
    health_deadline_s: float = 300.0,
    rollout: str | None = None,
) -> InstallParams:
    """The parameters of an ``install`` task taking ``r`` from the coordinator at
    ``base_url`` (the device's view of it: ``http.public_url`` or the API's address)."""
    base = blob_base(base_url)
    return InstallParams(
        release=r.name,
        version=r.version,
        manifest_digest=r.manifest_digest,
        manifest_size=r.manifest_size,
        manifest_url=base + r.manifest_digest,
        blob_base=base,
        health_deadline_s=health_deadline_s,
        rollout=rollout,
    )
