"""The fleet CA on disk: ``ca.crt``/``ca.key`` and issued ``<stem>.crt``/``<stem>.key`` pairs
in one directory. Private keys are written 0600 from their first byte (created with that
mode, then renamed into place), certificates 0644."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from lepton.coordinator.auth.pki import FleetCA, Issued, PkiError

CA_CERT: Final = "ca.crt"
CA_KEY: Final = "ca.key"


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically, the file having ``mode`` from the start."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widened past mode
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        if fd >= 0:
            os.close(fd)
    os.replace(tmp, path)


def has_ca(directory: Path) -> bool:
    return (directory / CA_CERT).exists() or (directory / CA_KEY).exists()


def save_ca(directory: Path, ca: FleetCA, *, force: bool = False) -> None:
    """Write the CA; an existing one is kept (:class:`PkiError` ``exists``) unless ``force``."""
    if has_ca(directory) and not force:
        raise PkiError("exists", f"{directory} already holds a CA (--force replaces it)")
    directory.mkdir(parents=True, exist_ok=True)
    write_file(directory / CA_KEY, ca.key_pem, 0o600)
    write_file(directory / CA_CERT, ca.cert_pem, 0o644)


def load_ca(directory: Path) -> FleetCA:
    try:
        cert = (directory / CA_CERT).read_bytes()
        key = (directory / CA_KEY).read_bytes()
    except OSError as exc:
        raise PkiError("no_ca", f"cannot read the CA in {directory}: {exc}") from exc
    return FleetCA.from_pem(cert, key)


def save_issued(
    directory: Path, stem: str, issued: Issued, chain: bytes = b""
) -> tuple[Path, Path]:
    """``<stem>.crt`` (followed by ``chain``, PEM) and ``<stem>.key`` (0600); returns their
    paths."""
    cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    write_file(key, issued.key_pem, 0o600)
    write_file(cert, issued.cert_pem + chain, 0o644)
    return cert, key
