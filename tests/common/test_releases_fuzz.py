"""Random corruption of a real signed bundle: every change is refused with a reason, never
another exception; a change the device accepts (tar header fields and padding carry nothing
that is installed) leaves exactly the signed files."""

from __future__ import annotations

import atexit
import shutil
import tarfile
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton.common.releases import ReleaseRefused, open_bundle
from tests.common.releasekit import FILES, NOW, bundle, good, make_trust

TRUST = make_trust()
_DIR = Path(tempfile.mkdtemp(prefix="lepton-fuzz-"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
ORIGINAL = bundle(_DIR / "good.tar", good(TRUST)[1], FILES).read_bytes()


def _signed_ranges() -> list[tuple[int, int]]:
    """Byte ranges of member contents (the manifest and every file): signed bytes."""
    with tarfile.open(_DIR / "good.tar") as tf:
        return [(m.offset_data, m.offset_data + m.size) for m in tf.getmembers()]


SIGNED = _signed_ranges()
SIGNED_BYTES = [i for a, b in SIGNED for i in range(a, b)]


def _open(data: bytes) -> dict[str, bytes] | ReleaseRefused:
    work = Path(tempfile.mkdtemp(dir=_DIR))
    try:
        (work / "b.tar").write_bytes(data)
        try:
            open_bundle(work / "b.tar", work / "out", TRUST.root, now=NOW)
        except ReleaseRefused as exc:
            assert not (work / "out").exists()
            return exc
        out = work / "out"
        return {
            p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()
        }
    finally:
        shutil.rmtree(work)


def test_the_original_opens() -> None:
    assert _open(ORIGINAL) == FILES


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(at=st.integers(0, len(ORIGINAL) - 1), xor=st.integers(1, 255))
def test_any_flipped_byte_is_refused_or_changes_nothing_installed(at: int, xor: int) -> None:
    data = bytearray(ORIGINAL)
    data[at] ^= xor
    got = _open(bytes(data))
    assert isinstance(got, ReleaseRefused) or got == FILES


@FUZZ
@given(index=st.integers(0, len(SIGNED_BYTES) - 1), xor=st.integers(1, 255))
def test_a_flipped_signed_byte_is_always_refused(index: int, xor: int) -> None:
    data = bytearray(ORIGINAL)
    data[SIGNED_BYTES[index]] ^= xor
    assert isinstance(_open(bytes(data)), ReleaseRefused)


@FUZZ
@given(cut=st.integers(0, SIGNED[-1][1] - 1))
def test_a_truncated_bundle_is_refused(cut: int) -> None:
    assert isinstance(_open(ORIGINAL[:cut]), ReleaseRefused)


@FUZZ
@given(at=st.integers(0, len(ORIGINAL)), junk=st.binary(min_size=1, max_size=600))
def test_inserted_bytes_are_refused_or_change_nothing_installed(at: int, junk: bytes) -> None:
    got = _open(ORIGINAL[:at] + junk + ORIGINAL[at:])
    assert isinstance(got, ReleaseRefused) or got == FILES
