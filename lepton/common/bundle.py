"""Release bundles and the files of a release: what is on disk is exactly what was signed.

A bundle is an uncompressed tar whose *first* member is the signed manifest
(:data:`BUNDLE_MANIFEST`). :func:`open_bundle` reads and verifies that member (bounded) before
it looks at any other, then extracts only regular files the manifest lists, each no longer
than its declared length and hashed as it is written, and finally checks the whole set with
:func:`verify_files`. Links, devices, directories, absolute or ``..`` names, duplicates and
oversized extended headers are refused, never followed.

Public names are re-exported by :mod:`lepton.common.releases`; import them from there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
from pathlib import Path
from typing import IO, Final

from lepton.common.signing import ReleaseRefused
from lepton.common.trust import verify_manifest
from lepton.protocol.releases import MAX_ENVELOPE_BYTES, MAX_FILES, FileEntry, Manifest, Root

#: The first member of a bundle tar: the manifest's DSSE envelope.
BUNDLE_MANIFEST: Final = "manifest.dsse.json"
CHUNK: Final = 1 << 20
#: A pax or GNU long-name header is read into memory whole by tarfile: bound it first.
MAX_EXTENDED_HEADER: Final = 64 * 1024
_BLOCK: Final = 512


def _hash_file(path: Path, entry: FileEntry) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise ReleaseRefused("tampered", f"{entry.path} cannot be opened as a file") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ReleaseRefused("tampered", f"{entry.path} is not a regular file")
        digest, size = hashlib.sha256(), 0
        while chunk := fh.read(CHUNK):
            size += len(chunk)
            if size > entry.length:
                raise ReleaseRefused("tampered", f"{entry.path} is longer than {entry.length}")
            digest.update(chunk)
    if size != entry.length:
        raise ReleaseRefused("tampered", f"{entry.path}: {size} bytes, {entry.length} listed")
    if digest.hexdigest() != entry.sha256:
        raise ReleaseRefused("tampered", f"{entry.path}: sha256 differs")


def verify_files(m: Manifest, directory: Path) -> None:
    """Whether ``directory`` holds exactly the manifest's files: ``missing_file``,
    ``unlisted_file`` (anything else, a symlink or an empty directory included) or
    ``tampered`` (a listed path that is not a regular file, or whose length or sha256
    differs; hashed in 1 MiB chunks)."""
    listed = {f.path: f for f in m.files}
    parents = {str(p) for f in m.files for p in Path(f.path).parents if str(p) != "."}
    found: set[str] = set()
    for top, dirs, files in os.walk(directory):
        rel_top = Path(top).relative_to(directory)
        for name in (*dirs, *files):
            rel = (rel_top / name).as_posix()
            full = Path(top) / name
            if rel in parents and full.is_dir() and not full.is_symlink():
                continue
            if rel not in listed:
                raise ReleaseRefused("unlisted_file", f"{rel[:200]} is not in the manifest")
            found.add(rel)
    missing = sorted(set(listed) - found)
    if missing:
        raise ReleaseRefused("missing_file", f"{missing[0]} (and {len(missing) - 1} more)")
    for path in sorted(listed):
        _hash_file(directory / path, listed[path])


def _check_next_header(tf: tarfile.TarFile) -> None:
    """Refuse an extended header (pax, GNU long name) over MAX_EXTENDED_HEADER before
    tarfile reads it into memory."""
    fileobj: IO[bytes] = tf.fileobj  # type: ignore[assignment]
    fileobj.seek(tf.offset)
    block = fileobj.read(_BLOCK)
    if len(block) < _BLOCK or block.count(0) == _BLOCK:
        return
    if block[156:157] in (b"x", b"g", b"L", b"K"):
        try:
            size = tarfile.nti(block[124:136])  # type: ignore[attr-defined]
        except (tarfile.HeaderError, ValueError):
            raise ReleaseRefused("malformed", "a tar header that does not parse") from None
        if size > MAX_EXTENDED_HEADER:
            raise ReleaseRefused("oversized", f"a {size}-byte extended tar header")


def _first_member(tf: tarfile.TarFile) -> bytes:
    member = tf.next()  # the header tarfile.open already read: the first member
    if member is None or member.name != BUNDLE_MANIFEST or not member.isreg():
        raise ReleaseRefused("malformed", f"the bundle's first member is not {BUNDLE_MANIFEST}")
    if member.size > MAX_ENVELOPE_BYTES:
        raise ReleaseRefused("oversized", f"a {member.size}-byte manifest")
    fh = tf.extractfile(member)
    raw = fh.read(member.size) if fh is not None else b""
    if len(raw) != member.size:
        raise ReleaseRefused("malformed", "the manifest member is truncated")
    return raw


def _open_tar(tar_path: Path) -> tarfile.TarFile:
    with open(tar_path, "rb") as fh:  # the first header, bounded, before tarfile parses it
        head = fh.read(_BLOCK)
    if len(head) == _BLOCK and head[156:157] in (b"x", b"g", b"L", b"K"):
        raise ReleaseRefused("malformed", f"the bundle's first member is not {BUNDLE_MANIFEST}")
    return tarfile.open(tar_path, mode="r:")


def read_bundle_manifest(tar_path: Path) -> bytes:
    """The raw (unverified) manifest envelope of a bundle: its first member, bounded;
    ``malformed`` or ``oversized`` otherwise."""
    try:
        with _open_tar(tar_path) as tf:
            return _first_member(tf)
    except (tarfile.TarError, EOFError, UnicodeError, ValueError) as exc:
        raise ReleaseRefused("malformed", f"not a bundle tar: {exc}") from None


def _extract(tf: tarfile.TarFile, member: tarfile.TarInfo, entry: FileEntry, dest: Path) -> None:
    if not member.isreg():
        raise ReleaseRefused("tampered", f"{entry.path} is not a regular file in the bundle")
    if member.size != entry.length:
        raise ReleaseRefused(
            "tampered", f"{entry.path}: {member.size} bytes, {entry.length} listed"
        )
    src = tf.extractfile(member)
    if src is None:  # pragma: no cover - a regular member always has a file object
        raise ReleaseRefused("tampered", entry.path)
    target = dest / entry.path
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(min(CHUNK, entry.length - size)):
            size += len(chunk)
            digest.update(chunk)
            out.write(chunk)
    if size != entry.length:
        raise ReleaseRefused("tampered", f"{entry.path} is truncated in the bundle")
    if digest.hexdigest() != entry.sha256:
        raise ReleaseRefused("tampered", f"{entry.path}: sha256 differs")


def _extract_all(tf: tarfile.TarFile, m: Manifest, dest: Path) -> None:
    listed = {f.path: f for f in m.files}
    done: set[str] = set()
    for count in range(MAX_FILES + 2):
        _check_next_header(tf)
        member = tf.next()
        if member is None:
            return
        if count > MAX_FILES:
            raise ReleaseRefused("malformed", "more members than a manifest may list")
        entry = listed.get(member.name)
        if entry is None:
            raise ReleaseRefused("unlisted_file", f"{member.name[:200]!r} is not in the manifest")
        if member.name in done:
            raise ReleaseRefused("tampered", f"{member.name} appears twice in the bundle")
        done.add(member.name)
        _extract(tf, member, entry, dest)


def open_bundle(tar_path: Path, dest: Path, root: Root, *, now: float) -> Manifest:
    """Verify the bundle at ``tar_path`` against ``root`` and extract its files into
    ``dest`` (absent or empty): the manifest member first, by :func:`verify_manifest`, then
    only listed regular files, then :func:`verify_files`. On any refusal
    (:class:`ReleaseRefused`; a tar that does not parse is ``malformed``) nothing is left
    in ``dest``. :func:`open_bundle_raw` also gives the manifest's verified bytes."""
    return open_bundle_raw(tar_path, dest, root, now=now)[0]


def open_bundle_raw(
    tar_path: Path, dest: Path, root: Root, *, now: float
) -> tuple[Manifest, bytes]:
    """:func:`open_bundle`, also returning the exact manifest envelope bytes it verified
    (what a device keeps beside the installed files; they are not written to ``dest``)."""
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty")
    existed = dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with _open_tar(tar_path) as tf:
            raw = _first_member(tf)
            m = verify_manifest(raw, root, now=now)
            _extract_all(tf, m, dest)
        verify_files(m, dest)
    except BaseException as exc:
        shutil.rmtree(dest, ignore_errors=True)
        if existed:
            dest.mkdir(exist_ok=True)
        if isinstance(exc, tarfile.TarError | EOFError | UnicodeError):
            raise ReleaseRefused("malformed", f"not a bundle tar: {exc}") from None
        raise
    return m, raw
