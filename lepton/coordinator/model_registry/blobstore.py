"""Content-addressed files: ``{root}/blobs/sha256/ab/abcdef...``, named by their sha256.

Writes are atomic (a temp file in the same file system, fsync, rename, fsync of the
directory) and verified: the bytes are hashed while written, checked against the expected
digest when there is one, and hashed again from disk before the rename. A blob that exists
already is kept when it verifies and replaced when it does not. Stored files are read-only.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Final

from lepton.coordinator.errors import NotFoundError
from lepton.coordinator.model_registry.errors import BlobIntegrityError

DIGEST_PATTERN: Final = r"^[0-9a-f]{64}$"
_DIGEST_RE: Final = re.compile(r"\A[0-9a-f]{64}\Z")
CHUNK: Final = 1 << 20


def check_digest(digest: str) -> str:
    """``digest`` if it is a sha256 in lowercase hex, else ``ValueError``."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise ValueError(f"not a sha256 hex digest: {digest!r:.80}")
    return digest


def hash_stream(fh: BinaryIO) -> tuple[str, int]:
    """sha256 hex digest and length of what is left in ``fh``."""
    h = hashlib.sha256()
    size = 0
    while chunk := fh.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def hash_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """sha256 hex digest and size of the file at ``path``."""
    with open(path, "rb") as fh:
        return hash_stream(fh)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """The file side of the registry; safe for concurrent writers of the same blob."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._dir = self.root / "blobs" / "sha256"
        self._tmp = self.root / "blobs" / "tmp"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        """Where the blob lives (whether or not it exists); ``ValueError`` for a bad digest."""
        check_digest(digest)
        return self._dir / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def existing_path(self, digest: str) -> Path:
        """The blob's path; :class:`NotFoundError` when it is not stored."""
        path = self.path(digest)
        if not path.is_file():
            raise NotFoundError("blob", digest)
        return path

    def verify(self, digest: str) -> int:
        """Re-hash a stored blob; its size, or :class:`BlobIntegrityError` if it is corrupt."""
        path = self.existing_path(digest)
        actual, size = hash_file(path)
        if actual != digest:
            raise BlobIntegrityError(digest, actual, where=str(path))
        return size

    def put_stream(self, fh: BinaryIO, *, expected: str | None = None) -> tuple[str, int]:
        """Store what is left in ``fh``; returns ``(digest, size)``.

        Raises :class:`BlobIntegrityError` (storing nothing) when ``expected`` is given and
        the bytes do not match it, or when the bytes read back from disk differ.
        """
        if expected is not None:
            check_digest(expected)
        fd, tmp_name = tempfile.mkstemp(prefix="put-", dir=self._tmp)
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = h.hexdigest()
            if expected is not None and digest != expected:
                raise BlobIntegrityError(expected, digest, where="incoming bytes")
            on_disk, _ = hash_file(tmp)
            if on_disk != digest:
                raise BlobIntegrityError(digest, on_disk, where="written file")
            dest = self.path(digest)
            if dest.is_file() and hash_file(dest)[0] == digest:
                return digest, size  # already stored and intact: deduplicated
            dest.parent.mkdir(exist_ok=True)
            tmp.chmod(0o444)
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
            return digest, size
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(
        self, path: str | os.PathLike[str], *, expected: str | None = None
    ) -> tuple[str, int]:
        with open(path, "rb") as fh:
            return self.put_stream(fh, expected=expected)

    def put_bytes(self, data: bytes, *, expected: str | None = None) -> tuple[str, int]:
        import io

        return self.put_stream(io.BytesIO(data), expected=expected)
