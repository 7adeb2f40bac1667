"""``lepton coordinator run`` refuses a database at another schema revision, with a message
that says what to do and exit code 8, and leaves the database as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from lepton.coordinator.cli.exitcodes import EXIT_SCHEMA
from lepton.coordinator.store import Store, migrations
from lepton.coordinator.store.connection import make_engines
from tests.coordinator.store.conftest import lepton
from tests.support.broker import free_port


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'coordinator.db'}"
    return str(request.getfixturevalue("pg_url"))


def run_coordinator(url: str, cwd: Path) -> tuple[int, str]:
    # No broker: the schema is checked before anything else starts.
    done = lepton(
        "coordinator",
        "run",
        "--database-url",
        url,
        "--data-dir",
        str(cwd / "data"),
        "--mqtt-port",
        str(free_port()),
        "--http-port",
        "0",
        cwd=cwd,
    )
    return done.returncode, done.stderr


def test_an_unversioned_database_of_the_previous_release_is_refused(
    url: str, tmp_path: Path
) -> None:
    engines = make_engines(url)
    try:
        # What the previous release's start-up did: create_all, no revision recorded.
        migrations.target_metadata().create_all(engines.write)
        code, err = run_coordinator(url, tmp_path)
        assert code == EXIT_SCHEMA, err
        assert "made by a release before schema migrations" in err
        assert "lepton db upgrade --database" in err
        assert "auto_upgrade" in err
        assert migrations.current(engines.write).state == "unversioned"
    finally:
        engines.dispose()


def test_a_database_newer_than_the_coordinator_is_refused(url: str, tmp_path: Path) -> None:
    Store.open(url).close()
    engines = make_engines(url)
    try:
        with engines.write.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
        code, err = run_coordinator(url, tmp_path)
        assert code == EXIT_SCHEMA, err
        assert "the coordinator is older than the database" in err
        st = migrations.current(engines.write)
        assert (st.state, st.revision) == ("ahead", "9999_future")
    finally:
        engines.dispose()
