"""Build a signed agent image (a release bundle) from an image definition.

The bundle holds, under fixed paths: ``wheels/`` (the pinned requirement and everything it
needs, for the definition's platforms, resolved by pip from a local wheelhouse: nothing is
downloaded unless asked), ``config/agent.toml``, ``systemd/`` (units, and drop-ins under
``systemd/lepton-agent.service.d/``), ``models/``, ``selftest/`` and ``trust/root.<N>.json``
(the root chain a device walks to the newest root). The manifest lists every file, sorted by
path, with its sha256 and length, is signed by the release key(s) as canonical JSON, and is
the tar's first member (:data:`~lepton.common.releases.BUNDLE_MANIFEST`).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lepton.common.errors import LeptonError
from lepton.common.releases import BUNDLE_MANIFEST, ROOT_CHAIN_DIR, read_bundle_manifest
from lepton.common.signing import add_signatures, canonical_json, sign
from lepton.coordinator.releases.definition import (
    ImageDefinition,
    load_definition,
    source_root,
)
from lepton.protocol.releases import (
    MANIFEST_TYPE,
    AgentInstall,
    FileEntry,
    Manifest,
    SelfTest,
    parse_version,
)

DAY: Final = 86400
PIP_TIMEOUT_S: Final = 900
_CHUNK: Final = 1 << 20


class BuildError(LeptonError):
    """The image cannot be built (a file is missing, pip cannot resolve the requirement)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_download(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", *args]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"pip download took over {PIP_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
        raise BuildError("pip could not gather the wheels:\n  " + "\n  ".join(tail))


def gather_wheels(
    d: ImageDefinition,
    requirement: str,
    *,
    wheelhouse: Path,
    extra: Sequence[Path],
    dest: Path,
    download: bool = False,
) -> list[Path]:
    """The wheels ``requirement`` needs on the definition's platforms and Python, copied to
    ``dest``: resolved by ``pip download --no-index`` from ``wheelhouse`` and the ``extra``
    wheels (only what the requirement pulls in, binary wheels only). With ``download``, pip
    first fetches what is missing from the package index into the wheelhouse."""
    target = ["--only-binary=:all:", "--python-version", d.python]
    for platform in d.platforms:
        target += ["--platform", platform]
    with tempfile.TemporaryDirectory() as tmp:
        links = Path(tmp)
        for wheel in extra:
            if not wheel.is_file() or wheel.suffix != ".whl":
                raise BuildError(f"{wheel} is not a wheel file")
            shutil.copy(wheel, links / wheel.name)
        finds = ["--find-links", str(wheelhouse), "--find-links", str(links)]
        if download:
            wheelhouse.mkdir(parents=True, exist_ok=True)
            _pip_download([*target, *finds, "--dest", str(wheelhouse), requirement])
        dest.mkdir(parents=True, exist_ok=True)
        _pip_download([*target, "--no-index", *finds, "--dest", str(dest), requirement])
    return sorted(dest.glob("*.whl"))


def _copy(src: Path, staging: Path, path: str) -> None:
    if not src.is_file():
        raise BuildError(f"{src} is not a file")
    target = staging / path
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)


def _stage_files(
    d: ImageDefinition,
    staging: Path,
    *,
    base: Path,
    models: Sequence[Path],
    roots: Sequence[Path],
) -> SelfTest | None:
    if d.config:
        _copy(base / d.config, staging, "config/agent.toml")
    for unit in d.units:
        _copy(base / unit, staging, f"systemd/{Path(unit).name}")
    for dropin in d.dropins:
        _copy(base / dropin, staging, f"systemd/lepton-agent.service.d/{Path(dropin).name}")
    for model in [*(base / m for m in d.models), *models]:
        _copy(model, staging, f"models/{model.name}")
    for root in roots:
        _copy(root, staging, f"{ROOT_CHAIN_DIR}/{root.name}")
    if d.self_test is None:
        return None
    t = d.self_test
    paths = {}
    for role, src in (("model", t.model), ("inputs", t.inputs), ("expected", t.expected)):
        paths[role] = f"selftest/{role}{Path(src).suffix}"
        _copy(base / src, staging, paths[role])
    return SelfTest(min_agreement=t.min_agreement, **paths)


def _entries(staging: Path) -> list[FileEntry]:
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    return [
        FileEntry(
            path=p.relative_to(staging).as_posix(), sha256=_sha256(p), length=p.stat().st_size
        )
        for p in files
    ]


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed owner, mode and time: the same inputs give the same tar.
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_bundle(out: Path, manifest_raw: bytes, files: Sequence[tuple[str, Path]]) -> Path:
    """An uncompressed tar at ``out``: the manifest first, then ``files`` (bundle path,
    source) in the order given; written beside and renamed into place."""
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, mode="w:", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(_tarinfo(BUNDLE_MANIFEST, len(manifest_raw)), io.BytesIO(manifest_raw))
        for name, src in files:
            with src.open("rb") as fh:
                tf.addfile(_tarinfo(name, src.stat().st_size), fh)
    tmp.replace(out)
    return out


def build_bundle(
    definition: Path,
    *,
    version: str,
    wheelhouse: Path,
    out_dir: Path,
    keys: Sequence[Ed25519PrivateKey],
    wheels: Sequence[Path] = (),
    floor: str | None = None,
    expires_days: int | None = None,
    models: Sequence[Path] = (),
    roots: Sequence[Path] = (),
    download: bool = False,
    now: float | None = None,
    base: Path | None = None,
) -> Path:
    """Build, sign (by every key in ``keys``) and write the image ``definition`` describes
    at ``version``: ``<out_dir>/<name>-<version>-<image>.bundle.tar``. ``floor`` and
    ``expires_days`` override the definition's; ``roots`` are ``root.<N>.json`` files for
    ``trust/``; ``base`` is the tree the definition's paths are relative to."""
    d = load_definition(definition)
    parse_version(version)
    security_floor = floor or d.security_floor
    if parse_version(security_floor) > parse_version(version):
        raise BuildError(f"security floor {security_floor} is above version {version}")
    if not keys:
        raise BuildError("a release needs at least one signing key")
    if d.kind == "agent" and not d.platforms:
        raise BuildError(f"{definition}: an agent image needs pip platforms (`platforms`)")
    created = int(time.time() if now is None else now)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        staging = Path(tmp) / "files"
        requirement = d.requirement_for(version)
        if d.kind == "agent":
            gather_wheels(
                d,
                requirement,
                wheelhouse=wheelhouse,
                extra=wheels,
                dest=staging / "wheels",
                download=download,
            )
        self_test = _stage_files(
            d, staging, base=base or source_root(definition), models=models, roots=roots
        )
        entries = _entries(staging)
        if not entries:
            raise BuildError("the image holds no files")
        manifest = Manifest(
            kind=d.kind,
            name=d.name,
            version=version,
            device_classes=list(d.device_classes),
            files=entries,
            security_floor=security_floor,
            created=created,
            expires=created + (expires_days or d.expires_days) * DAY,
            install=AgentInstall(requirement=requirement, python=d.python)
            if d.kind == "agent"
            else None,
            self_test=self_test,
            notes=d.notes,
        )
        raw = sign(canonical_json(manifest), MANIFEST_TYPE, keys)
        out = out_dir / f"{d.name}-{version}-{definition.stem}.bundle.tar"
        return write_bundle(out, raw, [(e.path, staging / e.path) for e in entries])


def manifest_digest(bundle: Path) -> tuple[str, int]:
    """The sha256 (hex) and size of a bundle's manifest envelope: what an install task names."""
    raw = read_bundle_manifest(bundle)
    return hashlib.sha256(raw).hexdigest(), len(raw)


def resign_bundle(bundle: Path, keys: Sequence[Ed25519PrivateKey], out: Path | None = None) -> Path:
    """``bundle`` with signatures by ``keys`` added to its manifest (for a threshold of
    release keys held by different people), written to ``out`` (default: in place)."""
    raw = add_signatures(read_bundle_manifest(bundle), keys)
    target = out or bundle
    tmp = target.with_name(f".{target.name}.tmp")
    with (
        tarfile.open(bundle, mode="r:") as src,
        tarfile.open(tmp, mode="w:", format=tarfile.PAX_FORMAT) as dst,
    ):
        dst.addfile(_tarinfo(BUNDLE_MANIFEST, len(raw)), io.BytesIO(raw))
        for member in src.getmembers()[1:]:
            if not member.isreg():
                raise BuildError(f"{member.name} is not a regular file")
            dst.addfile(_tarinfo(member.name, member.size), src.extractfile(member))
    tmp.replace(target)
    return target
