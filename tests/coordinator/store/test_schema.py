"""Start-up against a database an older release created: new nullable columns are added."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, inspect, text

from lepton.coordinator.fl import tables as fl_tables
from lepton.coordinator.store import Store


def _columns(store: Store, table: str) -> set[str]:
    return {c["name"] for c in inspect(store._engines.read).get_columns(table)}


def test_a_column_added_by_a_newer_release_is_added_and_rows_kept(db_url: str) -> None:
    store = Store.open(db_url)
    try:
        old, new = MetaData(), MetaData()
        Table("upgrade_probe", old, Column("id", Integer, primary_key=True))
        Table(
            "upgrade_probe",
            new,
            Column("id", Integer, primary_key=True),
            Column("note", String(32)),
        )
        store.create_schema(old)
        with store._engines.write.begin() as conn:
            conn.execute(text("INSERT INTO upgrade_probe (id) VALUES (7)"))
        store.create_schema(new)
        store.create_schema(new)  # idempotent
        assert _columns(store, "upgrade_probe") == {"id", "note"}
        with store._engines.read.connect() as conn:
            assert conn.execute(text("SELECT id, note FROM upgrade_probe")).all() == [(7, None)]
        required = MetaData()
        Table(
            "upgrade_probe",
            required,
            Column("id", Integer, primary_key=True),
            Column("note", String(32)),
            Column("must", Integer, nullable=False),
        )
        with pytest.raises(RuntimeError, match="needs a migration"):
            store.create_schema(required)
    finally:
        with store._engines.write.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS upgrade_probe"))
        store.close()


def test_fl_rounds_from_before_reported_sizes_gets_the_column(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        store.create_schema(fl_tables.metadata)
        with store._engines.write.begin() as conn:
            conn.execute(text("ALTER TABLE fl_rounds DROP COLUMN reported_sizes"))
        assert "reported_sizes" not in _columns(store, "fl_rounds")
        store.create_schema(fl_tables.metadata)
        assert "reported_sizes" in _columns(store, "fl_rounds")
    finally:
        store.close()
