"""What the release registry hands out: frozen records of releases, their files, and the last
update status each device reported."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lepton.protocol.releases import parse_version


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseRecord:
    """One published manifest: a release ``name`` at ``version`` for ``device_classes``
    (fnmatch patterns). ``manifest_digest`` / ``manifest_size``: the signed envelope in the
    blob store, as devices fetch it; ``created`` / ``expires``: the manifest's own times."""

    id: int
    kind: str
    name: str
    version: str
    device_classes: tuple[str, ...]
    manifest_digest: str
    manifest_size: int
    security_floor: str
    created: float
    expires: float
    published_at: float
    file_count: int
    total_bytes: int
    published_by: str = ""

    @classmethod
    def of(cls, row: Mapping[Any, Any]) -> ReleaseRecord:
        values = dict(row)
        values["device_classes"] = tuple(values["device_classes"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["device_classes"] = list(self.device_classes)
        return out

    @property
    def sort_key(self) -> tuple[str, tuple[int, int, int], int]:
        """Name, then version numerically, then publication order."""
        return self.name, parse_version(self.version), self.id


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseFile:
    """A file of a release: its path in the bundle, sha256 (its blob) and length."""

    path: str
    sha256: str
    length: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceUpdate:
    """The last :class:`~lepton.protocol.messages.UpdateStatus` a device reported, as the
    coordinator stored it (``at``: the device's clock; ``received_at``: the coordinator's)."""

    device_id: str
    version: str
    outcome: str
    target: str
    reason: str
    slot: str
    floor: str
    task_id: str | None
    at: float
    received_at: float

    @classmethod
    def of(cls, row: Mapping[Any, Any]) -> DeviceUpdate:
        return cls(**dict(row))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
