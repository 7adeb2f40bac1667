"""Alembic's environment for the coordinator's database.

Run only through :mod:`lepton.coordinator.store.migrations` (``lepton db upgrade``, or the
coordinator's start-up), which hands over a connection in a transaction that already holds
the start-up lock; the migrations run in that transaction.
"""

from __future__ import annotations

from alembic import context

from lepton.coordinator.store.migrations import target_metadata


def run() -> None:
    connection = context.config.attributes.get("connection")
    if context.is_offline_mode() or connection is None:
        raise RuntimeError(
            "the coordinator's migrations run on a live connection: use `lepton db upgrade`"
        )
    context.configure(
        connection=connection,
        target_metadata=target_metadata(),
        # SQLite alters most things by copying a table: revisions generated for it use
        # batch operations.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run()
