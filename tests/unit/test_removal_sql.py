"""The README's SQL for removing the module for good: run as written on a
database with the module's joined-count triggers, it leaves no trigger behind,
and Synapse can write `current_state_events` after the table is gone."""

import re
from pathlib import Path

from synapse.storage.database import LoggingTransaction
from synapse.storage.engines import PostgresEngine

from synapse_fastjoin.storage.member_counts import (
    SERVER_TABLE,
    TABLE,
    create_joined_counts_txn,
    create_server_counts_txn,
)
from tests.unit.test_storage import Database, database  # noqa: F401 (fixture)

README = Path(__file__).resolve().parents[2] / "README.md"


def _removal_sql(postgres: bool) -> list[str]:
    text = README.read_text()
    section = text.split("### Removing the module for good", 1)[1]
    block = re.search(r"```sql\n(.*?)```", section, re.S)
    assert block, "the README's removal section has no SQL block"
    parts = re.split(r"^-- (SQLite|PostgreSQL|then.*)$", block.group(1), flags=re.M)
    by_name = {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}
    ours = by_name["PostgreSQL" if postgres else "SQLite"]
    common = next(v for k, v in by_name.items() if k.startswith("then"))
    sql = ours + common.split("--")[0]
    return [s.strip() for s in sql.split(";") if s.strip()]


def _triggers(db: Database, postgres: bool) -> list[str]:
    if postgres:
        rows = db.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'current_state_events'::regclass"
            " AND NOT tgisinternal"
        )
    else:
        rows = db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'current_state_events'"
        )
    # (Synapse has triggers of its own there.)
    return [r[0] for r in rows if r[0].startswith("fastjoin_")]


def test_the_readme_removal_sql_leaves_synapse_writable(database: Database) -> None:  # noqa: F811
    postgres = isinstance(database.engine, PostgresEngine)
    database.run_sync("create", create_joined_counts_txn)
    database.run_sync("create_servers", create_server_counts_txn)
    assert _triggers(database, postgres)

    def remove(txn: LoggingTransaction) -> None:
        for statement in _removal_sql(postgres):
            txn.execute(statement)

    database.run_sync("remove", remove)
    assert _triggers(database, postgres) == []
    if postgres:
        assert database.execute(
            "SELECT proname FROM pg_proc WHERE proname IN"
            " ('fastjoin_joined_counts_insert', 'fastjoin_joined_counts_delete',"
            " 'fastjoin_joined_counts_update', 'fastjoin_server_counts_insert',"
            " 'fastjoin_server_counts_delete', 'fastjoin_server_counts_update')"
        ) == []
    assert {TABLE, SERVER_TABLE}.isdisjoint(
        r[0]
        for r in database.execute(
            "SELECT tablename FROM pg_tables" if postgres else "SELECT name FROM sqlite_master WHERE type = 'table'"
        )
    )
    # Synapse's writes of the current state go through.
    database.execute(
        "INSERT INTO current_state_events (event_id, room_id, type, state_key, membership)"
        " VALUES ('$e', '!r:x', 'm.room.member', '@u:x', 'join')"
    )
