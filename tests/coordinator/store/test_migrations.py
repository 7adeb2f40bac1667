"""Schema migrations on SQLite and PostgreSQL: a fresh database is brought to head with its
revision recorded, an older one is refused or (with auto_upgrade) upgraded, a newer one is
refused, and replicas starting together upgrade once."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, MetaData, String, inspect, text

from lepton.coordinator.auth import tables as auth_tables
from lepton.coordinator.cli import main
from lepton.coordinator.cli.exitcodes import EXIT_OK, EXIT_SCHEMA
from lepton.coordinator.releases import tables as release_tables
from lepton.coordinator.rollouts import tables as rollout_tables
from lepton.coordinator.store import Store, migrations
from lepton.coordinator.store.connection import make_engines
from tests.coordinator.factories import sample
from tests.coordinator.store.conftest import schema_differences


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'coordinator.db'}"
    return str(request.getfixturevalue("pg_url"))


def _recorded(url: str) -> list[str]:
    engines = make_engines(url)
    try:
        with engines.read.connect() as conn:
            return [r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version"))]
    finally:
        engines.dispose()


def test_start_up_brings_an_empty_database_to_head_and_records_it(empty_url: str) -> None:
    store = Store.open(empty_url)
    try:
        assert _recorded(empty_url) == [migrations.head()]
        assert migrations.current(store.engine).state == "current"
        tables = set(store.table_names())
        assert set(migrations.target_metadata().tables) | {"alembic_version"} == tables
        # A second start finds it done.
        Store.open(empty_url).close()
        assert _recorded(empty_url) == [migrations.head()]
    finally:
        store.close()


def test_db_upgrade_and_current_on_an_empty_database(
    empty_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["db", "current", "--database", empty_url]) == EXIT_SCHEMA
    assert "empty" in capsys.readouterr().out
    assert main(["db", "upgrade", "--database", empty_url]) == EXIT_OK
    assert f"upgraded from empty to {migrations.head()}" in capsys.readouterr().out
    assert _recorded(empty_url) == [migrations.head()]
    assert main(["--json", "db", "current", "--database", empty_url]) == EXIT_OK
    assert f'"revision": "{migrations.head()}"' in capsys.readouterr().out
    assert main(["db", "upgrade", "--database", empty_url]) == EXIT_OK
    assert "already at" in capsys.readouterr().out


def test_the_models_and_the_migrations_agree(empty_url: str) -> None:
    """Upgrading an empty database to head makes exactly the tables, columns, types, indexes
    and constraints the models declare: a model change without a revision fails here."""
    engines = make_engines(empty_url)
    try:
        migrations.upgrade(engines.write)
        assert schema_differences(engines.write) == []
    finally:
        engines.dispose()


def test_a_newer_database_is_refused_by_start_up_and_by_upgrade(empty_url: str) -> None:
    Store.open(empty_url).close()
    engines = make_engines(empty_url)
    try:
        with engines.write.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
        with pytest.raises(migrations.SchemaError, match="older than the database"):
            Store.open(empty_url)
        with pytest.raises(migrations.SchemaError, match="older than the database"):
            migrations.upgrade(engines.write)
        assert _recorded(empty_url) == ["9999_future"]
    finally:
        engines.dispose()


# The shipped head, and the revision a later release would add after it.
SHIPPED = migrations.head()
NEXT = f"{migrations.revision_number(SHIPPED) + 1:04d}"

PROBE_REVISION = '''"""Probe: a later release adds a column.

Revision ID: {next}
Revises: {shipped}
"""

import sqlalchemy as sa
from alembic import op

revision = "{next}"
down_revision = "{shipped}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("probe_note", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("probe_note")
'''


@pytest.fixture
def newer_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The shipped revisions plus the next one of a later release, as this process's scripts."""
    scripts = tmp_path / "scripts"
    shutil.copytree(
        migrations.SCRIPT_LOCATION, scripts, ignore=shutil.ignore_patterns("__pycache__")
    )
    probe = PROBE_REVISION.replace("{next}", NEXT).replace("{shipped}", SHIPPED)
    (scripts / "versions" / f"{NEXT}_probe.py").write_text(probe)
    monkeypatch.setattr(migrations, "SCRIPT_LOCATION", scripts)
    migrations.scripts.cache_clear()
    yield
    monkeypatch.undo()
    migrations.scripts.cache_clear()


def test_an_older_revision_is_refused_unless_auto_upgrade(
    empty_url: str, newer_release: None
) -> None:
    """A database at the shipped head under a release with one more revision: start-up
    refuses and says what to run; with auto_upgrade it upgrades, and the rows are kept."""
    engines = make_engines(empty_url)
    try:
        migrations.upgrade(engines.write, SHIPPED)
    finally:
        engines.dispose()
    old = Store.open(empty_url, create=False)
    old.devices.record_capacity([sample("pi-01")])
    old.close()
    assert migrations.head() == NEXT
    with pytest.raises(migrations.SchemaError) as refused:
        Store.open(empty_url)
    message = str(refused.value)
    assert f"revision {SHIPPED}" in message
    assert f"runs {NEXT}" in message
    assert "lepton db upgrade --database" in message
    store = Store.open(empty_url, auto_upgrade=True)
    try:
        assert _recorded(empty_url) == [NEXT]
        assert "probe_note" in {c["name"] for c in inspect(store.engine).get_columns("devices")}
        assert [d.id for d in store.devices.list_devices()] == ["pi-01"]
    finally:
        store.close()


@pytest.mark.postgres
def test_replicas_starting_together_upgrade_once(pg_url: str) -> None:
    """Several processes' worth of start-ups at once on an empty PostgreSQL schema: one
    creates the schema under the start-up lock, the others find it at head."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            barrier.wait()
            Store.open(pg_url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert _recorded(pg_url) == [migrations.head()]


def test_a_model_change_gets_a_revision_that_makes_the_database_match(
    newer_release: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """new_revision writes the next revision from the models; upgrading to it leaves no
    difference between the database and the models."""
    changed = MetaData()
    for table in migrations.target_metadata().tables.values():
        table.to_metadata(changed)
    changed.tables["devices"].append_column(Column("site", String(64)))
    monkeypatch.setattr(migrations, "target_metadata", lambda: changed)
    # The fixture's probe adds probe_note; the models here do not have it.
    (migrations.SCRIPT_LOCATION / "versions" / f"{NEXT}_probe.py").unlink()
    migrations.scripts.cache_clear()
    path = migrations.new_revision("devices: a site")
    assert path.name == f"{NEXT}_devices_a_site.py"
    assert "add_column(sa.Column('site'" in path.read_text()
    engines = make_engines(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        _, after = migrations.upgrade(engines.write)
        assert after.revision == NEXT
        assert schema_differences(engines.write) == []
    finally:
        engines.dispose()


def test_an_unversioned_database_is_adopted_with_its_rows(
    empty_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tables as a release before migrations made them (create_all; one without the cancel
    columns start-up used to add): `lepton db upgrade` adds what is missing, records the
    revision and keeps the rows."""
    engines = make_engines(empty_url)
    try:
        # What such a release had: every table but those later revisions added.
        later = (
            set(auth_tables.metadata.tables)
            | set(release_tables.metadata.tables)
            | set(rollout_tables.metadata.tables)
        )
        old_tables = [t for n, t in migrations.target_metadata().tables.items() if n not in later]
        migrations.target_metadata().create_all(engines.write, tables=old_tables)
        with engines.write.begin() as conn:
            conn.execute(text("ALTER TABLE tasks DROP COLUMN cancel_reason"))
        old = Store.open(empty_url, create=False)
        old.devices.record_capacity([sample("pi-01"), sample("pi-02")])
        old.close()
        assert migrations.current(engines.write).state == "unversioned"
        assert main(["db", "upgrade", "--database", empty_url]) == EXIT_OK
        assert "upgraded from unversioned" in capsys.readouterr().out
        assert _recorded(empty_url) == [migrations.head()]
        assert schema_differences(engines.write) == []
        store = Store.open(empty_url)
        try:
            assert sorted(d.id for d in store.devices.list_devices()) == ["pi-01", "pi-02"]
        finally:
            store.close()
    finally:
        engines.dispose()
