# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""`synapse-fastjoin schema drop` removes every object of the module from a
database that Synapse's schema and the module's own schema steps set up (on
SQLite and PostgreSQL, `--db`), in one go, triggers first: afterwards no
`fastjoin_*` table, trigger or function is left, and Synapse's writes of
`current_state_events` go through. It refuses while homeserver.yaml lists the
module or the series is applied (dropping nothing), `--dry-run` drops nothing,
and a second run finds nothing and succeeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from synapse.storage.engines import PostgresEngine

from synapse_fastjoin import cli
from synapse_fastjoin.storage.schema import prepare_schema_txn
from tests.unit.test_patching import stock_site  # noqa: F401 (fixture)
from tests.unit.test_storage import Database, database  # noqa: F401 (fixture)


def _objects(db: Database) -> list[tuple[str, str]]:
    """Every fastjoin_* object in the database: (kind, name)."""
    if isinstance(db.engine, PostgresEngine):
        rows = db.execute(
            "SELECT 'table', tablename FROM pg_tables WHERE schemaname = current_schema()"
            " UNION ALL SELECT 'index', indexname FROM pg_indexes WHERE schemaname = current_schema()"
            " UNION ALL SELECT 'trigger', tgname FROM pg_trigger WHERE NOT tgisinternal"
            " UNION ALL SELECT 'function', proname FROM pg_proc"
        )
    else:
        rows = db.execute("SELECT type, name FROM sqlite_master")
    return sorted((kind, name) for kind, name in rows if name.startswith("fastjoin_"))


def _config(tmp_path: Path, db: Database, **extra: Any) -> str:
    path = tmp_path / "homeserver.yaml"
    path.write_text(yaml.safe_dump({"server_name": "drop.test", "database": db.section, **extra}))
    return str(path)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(["schema", "drop", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_schema_drop_leaves_no_fastjoin_object_and_synapse_writable(
    database: Database,  # noqa: F811
    stock_site: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = database
    db.run_sync("prepare", prepare_schema_txn)
    # A joined member counted by the triggers.
    db.execute(
        "INSERT INTO current_state_events (event_id, room_id, type, state_key, membership)"
        " VALUES ('$j', '!r:x', 'm.room.member', '@u:x', 'join')"
    )
    assert db.execute("SELECT joined FROM fastjoin_room_joined_counts WHERE room_id = '!r:x'") == [(1,)]
    before = _objects(db)
    kinds = {kind for kind, _ in before}
    assert {"table", "trigger"} <= kinds and ("function" in kinds) == isinstance(db.engine, PostgresEngine)
    stock = str(stock_site)

    # The module still listed: refused.
    listed = _config(tmp_path, db, modules=[{"module": "synapse_fastjoin.FastJoinModule", "config": {}}])
    status, out, err = _run(capsys, "--config", listed, "--site-packages", stock)
    assert status == 1 and "still enabled" in err, (out, err)
    assert _objects(db) == before

    config = _config(tmp_path, db, modules=[])
    # The series applied (to the Synapse running this test): refused.
    status, out, err = _run(capsys, "--config", config)
    assert status == 1 and "patches revert" in err, (out, err)
    assert _objects(db) == before

    # A dry run prints the statements, triggers before tables, and drops nothing.
    status, out, err = _run(capsys, "--config", config, "--dry-run", "--site-packages", stock)
    assert status == 0, (out, err)
    statements = [line for line in out.splitlines() if line.startswith("DROP ")]
    assert any(s.startswith("DROP TRIGGER fastjoin_joined_counts_insert") for s in statements), out
    assert "DROP TABLE fastjoin_schema_version;" in statements and "DROP TABLE fastjoin_room_joined_counts;" in statements
    kinds_in_order = [s.split()[1] for s in statements]
    assert kinds_in_order == sorted(kinds_in_order, key=["TRIGGER", "FUNCTION", "TABLE"].index)
    assert _objects(db) == before

    status, out, err = _run(capsys, "--config", config, "--site-packages", stock)
    assert status == 0, (out, err)
    assert _objects(db) == []
    tables = {name for kind, name in before if kind == "table"}
    assert {line.split()[2] for line in out.splitlines() if line.startswith("dropped    table")} == tables
    assert len(statements) == sum(1 for line in out.splitlines() if line.startswith("dropped "))
    # Synapse's writes of the current state go through.
    db.execute(
        "INSERT INTO current_state_events (event_id, room_id, type, state_key, membership)"
        " VALUES ('$k', '!r:x', 'm.room.member', '@v:x', 'join')"
    )
    db.execute("UPDATE current_state_events SET membership = 'leave' WHERE event_id = '$j'")
    db.execute("DELETE FROM current_state_events WHERE room_id = '!r:x'")

    # Again: nothing to drop.
    status, out, err = _run(capsys, "--config", config, "--site-packages", stock)
    assert status == 0 and "Nothing to drop" in out, (out, err)


def test_schema_drop_refuses_a_missing_sqlite_database(
    stock_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    path = tmp_path / "homeserver.yaml"
    path.write_text(yaml.safe_dump({"database": {"name": "sqlite3", "args": {"database": str(tmp_path / "nope.db")}}}))
    status, out, err = _run(capsys, "--config", str(path), "--site-packages", str(stock_site))
    assert status == 1 and "no SQLite database" in err, (out, err)
    assert not (tmp_path / "nope.db").exists()
