"""A database the release before migrations wrote (fixtures/prev-95214ac.db, made by
fixtures/make_prev_db.py with that release's code) keeps every row through
``lepton db upgrade``, and the coordinator then starts on it and serves its rows."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine

from lepton.coordinator.cli import main
from lepton.coordinator.cli.exitcodes import EXIT_OK
from lepton.coordinator.store import migrations
from lepton.protocol import routes
from tests.coordinator.store.conftest import LEPTON, REPO, lepton, schema_differences
from tests.support.broker import Broker, free_port

Rows = dict[str, list[dict[str, Any]]]


def dump(path: Path) -> Rows:
    """Every row of every table, as the file holds it."""
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        return {
            n: [dict(r) for r in conn.execute(f"SELECT * FROM {n} ORDER BY rowid")] for n in names
        }
    finally:
        conn.close()


def kept(before: Rows, after: Rows) -> None:
    """Every row of ``before`` is in ``after``, each column it had unchanged."""
    for table, rows in before.items():
        assert len(after[table]) == len(rows), table
        for old, new in zip(rows, after[table], strict=True):
            assert {k: new[k] for k in old} == old, table


def test_db_upgrade_keeps_every_row_and_the_coordinator_serves_them(
    previous_db: Path, broker: Broker, tmp_path: Path
) -> None:
    before = dump(previous_db)
    assert "alembic_version" not in before
    assert len(before["devices"]) == 3
    assert len(before["tasks"]) == 5
    assert len(before["results"]) == 3
    assert len(before["fl_jobs"]) == len(before["fl_updates"]) == 1
    assert len(before["model_versions"]) == 1
    url = f"sqlite:///{previous_db}"

    done = lepton("db", "upgrade", "--database", url, cwd=tmp_path)
    assert done.returncode == EXIT_OK, done.stderr
    assert f"upgraded from unversioned to {migrations.head()}" in done.stdout
    after = dump(previous_db)
    kept(before, after)
    assert after["alembic_version"] == [{"version_num": migrations.head()}]
    assert schema_differences(create_engine(url)) == []

    # An operator token on the upgraded database, as its administrator would make one.
    made = lepton("tokens", "create", "reader", "--scope", "fleet:read", "--database", url,
                  "--json", cwd=tmp_path)  # fmt: skip
    assert made.returncode == EXIT_OK, made.stderr
    token = json.loads(made.stdout)["token"]
    headers = {"Authorization": f"Bearer {token}"}

    port = free_port()
    env = {
        **os.environ,
        "LEPTON_MQTT_PORT": str(broker.port),
        "PYTHONPATH": str(REPO),
        "LEPTON_TOKEN": token,
    }
    proc = subprocess.Popen(
        [
            *LEPTON,
            "coordinator",
            "run",
            "--data-dir",
            str(previous_db.parent),
            "--http-port",
            str(port),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{api}/v1/health", timeout=1).json()["leader"]:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "coordinator did not become healthy"
            time.sleep(0.1)
        listed = subprocess.run(
            [*LEPTON, "--api", api, "--json", "tasks", "ls"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        tasks = {t["id"]: t for t in json.loads(listed.stdout)}
        assert set(tasks) == {t["id"] for t in before["tasks"]}
        assert tasks["t-ok-1"]["state"] == "succeeded"
        assert tasks["t-ok-1"]["output"] == {"echo": "t-ok-1"}
        assert tasks["t-cancel"]["state"] == "cancelled"
        devices = httpx.get(f"{api}{routes.DEVICES}", headers=headers, timeout=5).json()
        assert {d["id"] for d in devices} == {"pi-01", "pi-02", "jetson-01"}
        (job,) = httpx.get(f"{api}{routes.FL_JOBS}", headers=headers, timeout=5).json()
        assert (job["id"], job["state"], job["round"]) == ("job-digits", "done", 1)
        (model,) = httpx.get(f"{api}{routes.MODELS}", headers=headers, timeout=5).json()["models"]
        assert (model["name"], model["version"], model["digest"]) == (
            "digits",
            1,
            before["model_versions"][0]["digest"],
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_a_database_from_before_the_late_columns_and_tables_is_brought_to_head(
    previous_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Releases before the previous one lacked the task cancel columns, fl_rounds'
    reported_sizes (added at start-up by the stopgap these migrations replace) and the
    fl_loads and fl_keys tables: the upgrade adds them and keeps every row."""
    conn = sqlite3.connect(previous_db)
    with conn:
        for column in ("cancel_requested_at", "cancel_reason", "cancel_sent_at", "cancel_sends"):
            conn.execute(f"ALTER TABLE tasks DROP COLUMN {column}")
        conn.execute("ALTER TABLE fl_rounds DROP COLUMN reported_sizes")
        conn.execute("DROP TABLE fl_loads")
        conn.execute("DROP TABLE fl_keys")
    conn.close()
    before = dump(previous_db)
    url = f"sqlite:///{previous_db}"
    assert main(["db", "upgrade", "--database", url]) == EXIT_OK
    assert "upgraded from unversioned" in capsys.readouterr().out
    after = dump(previous_db)
    kept(before, after)
    assert after["fl_loads"] == after["fl_keys"] == []
    assert {t["cancel_reason"] for t in after["tasks"]} == {None}
    assert schema_differences(create_engine(url)) == []


def test_a_table_missing_a_required_column_is_refused(
    previous_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a database any previous release made: the upgrade changes nothing."""
    conn = sqlite3.connect(previous_db)
    with conn:
        conn.execute("ALTER TABLE devices DROP COLUMN agent_version")
    conn.close()
    before = dump(previous_db)
    with pytest.raises(RuntimeError, match="devices lacks columns agent_version"):
        main(["db", "upgrade", "--database", f"sqlite:///{previous_db}"])
    assert dump(previous_db) == before
