"""The test tree mirrors the source tree: the folder of every test file is the folder of the
package it tests (tests/coordinator/store/ tests lepton/coordinator/store/), so a test is
found where its code is and a new package gets its tests in the right place.

Outside the mirror: tests/support (shared helpers, no tests), tests/integration (several
packages at once), tests/deploy (deploy/: systemd units, broker templates), tests/bench (the
smoke tests of bench/), and the cross-cutting tests directly in tests/.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
SOURCE = REPO / "lepton"
OUTSIDE_THE_MIRROR = {"support", "integration", "deploy", "bench"}


def test_every_test_folder_is_a_source_package() -> None:
    strays = []
    for path in sorted(TESTS.rglob("test_*.py")):
        folder = path.parent.relative_to(TESTS)
        if folder == Path() or folder.parts[0] in OUTSIDE_THE_MIRROR:
            continue
        if not (SOURCE / folder / "__init__.py").is_file():
            strays.append(f"{path.relative_to(REPO)}: lepton/{folder.as_posix()} is no package")
    assert not strays, "\n".join(strays)


def test_support_modules_hold_no_tests() -> None:
    assert not list((TESTS / "support").rglob("test_*.py"))


def test_every_test_folder_is_a_package() -> None:
    """An ``__init__.py`` in each folder: two test files of one name in different folders
    (tests/coordinator/cli/test_cli.py, tests/sim/test_cli.py) are then distinct modules."""
    missing = [
        str(folder.relative_to(REPO))
        for folder in sorted({p.parent for p in TESTS.rglob("test_*.py")})
        if not (folder / "__init__.py").is_file()
    ]
    assert not missing, missing


def test_paths_up_from_a_test_reach_the_repository() -> None:
    """``Path(__file__).resolve().parents[N]`` in the tests names the repository root: a
    moved test with a stale N would read files from the wrong place."""
    pattern = re.compile(r"Path\(__file__\)\.resolve\(\)\.parents\[(\d+)\]")
    wrong = [
        f"{path.relative_to(REPO)}: parents[{n}]"
        for path in sorted(TESTS.rglob("*.py"))
        for n in pattern.findall(path.read_text())
        if path.resolve().parents[int(n)] != REPO
    ]
    assert not wrong, wrong
