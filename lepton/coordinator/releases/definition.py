"""An image definition (``firmware_images/<image>.toml``): what goes into an agent image for
one device class. See firmware_images/README.md for every key.

Paths in a definition are relative to the source tree (the folder above firmware_images/),
so the same definition builds from any checkout. Unknown keys are an error that names them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from lepton.common.errors import ConfigError
from lepton.protocol.releases import (
    CLASS_PATTERN,
    RELEASE_NAME_PATTERN,
    VERSION_PATTERN,
)

#: A pip platform tag (``manylinux_2_28_aarch64``, ``linux_x86_64``).
PLATFORM_PATTERN = r"\A[a-z0-9_]{3,64}\Z"


class SelfTestFiles(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The self-test a new version must pass: model, reference inputs (``.npz`` with ``x``)
    and expected labels (``.npz`` with ``y``), paths in the source tree."""

    model: str
    inputs: str
    expected: str
    min_agreement: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.99


class ImageDefinition(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One agent image for a set of device classes."""

    name: Annotated[str, Meta(pattern=RELEASE_NAME_PATTERN)] = "lepton-agent"
    kind: Literal["agent", "model"] = "agent"
    device_classes: Annotated[
        list[Annotated[str, Meta(pattern=CLASS_PATTERN)]], Meta(min_length=1, max_length=16)
    ]
    #: pip platform tags for ``pip download --platform ... --only-binary=:all:`` (an agent
    #: image needs at least one; a model release ships no wheels).
    platforms: list[Annotated[str, Meta(pattern=PLATFORM_PATTERN)]] = msgspec.field(
        default_factory=list
    )
    python: Annotated[str, Meta(pattern=r"\A3\.[0-9]{1,2}\Z")] = "3.11"
    #: What the device installs from the bundle's wheels; ``{version}`` is the release's.
    requirement: Annotated[str, Meta(max_length=200)] = "lepton-fleet[agent]=={version}"
    #: The default agent configuration, installed as ``config/agent.toml`` ("": none).
    config: str = "deploy/agent.example.toml"
    #: systemd units (``systemd/<file name>``) and drop-ins for lepton-agent.service
    #: (``systemd/lepton-agent.service.d/<file name>``).
    units: list[str] = msgspec.field(default_factory=list)
    dropins: list[str] = msgspec.field(default_factory=list)
    #: Models shipped with the image (``models/<file name>``).
    models: list[str] = msgspec.field(default_factory=list)
    self_test: SelfTestFiles | None = None
    security_floor: Annotated[str, Meta(pattern=VERSION_PATTERN)] = "0.0.0"
    expires_days: Annotated[int, Meta(ge=1, le=3650)] = 90
    notes: Annotated[str, Meta(max_length=4096)] = ""

    def requirement_for(self, version: str) -> str:
        """The pinned requirement of ``version``."""
        return self.requirement.replace("{version}", version)


def load_definition(path: Path) -> ImageDefinition:
    """The definition in ``path``; :class:`ConfigError` naming the file (and key) when it
    cannot be read or does not validate."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", source=str(path)) from exc
    try:
        return msgspec.toml.decode(data, type=ImageDefinition)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: {exc}", source=str(path)) from exc


def source_root(definition: Path) -> Path:
    """The tree a definition's paths are relative to: the folder above its own."""
    return definition.resolve().parent.parent
