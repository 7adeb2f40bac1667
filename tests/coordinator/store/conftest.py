"""Fixtures of the schema migration tests: the previous release's database, the CLI as a
process, the schema a database has."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine

from lepton.coordinator.store import migrations

REPO = Path(__file__).resolve().parents[3]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PREVIOUS_DB = FIXTURES / "prev-95214ac.db"
LEPTON = [sys.executable, "-m", "lepton.coordinator.cli"]


@pytest.fixture
def previous_db(tmp_path: Path) -> Path:
    """A copy of the database the release before migrations wrote (make_prev_db.py)."""
    path = tmp_path / "data" / "coordinator.db"
    path.parent.mkdir()
    shutil.copyfile(PREVIOUS_DB, path)
    return path


def lepton(*argv: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``lepton ARGV`` as an operator runs it: a process of its own."""
    return subprocess.run(
        [*LEPTON, *argv],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def schema_differences(engine: Engine) -> list[object]:
    """What the database on ``engine`` lacks or has beyond what the models declare."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, migrations.target_metadata()))
