# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Each room's number of joined members, kept by the database itself.

Synapse's `get_number_joined_users_in_room` (read by the push rule evaluator
for every event, and by `/joined_members`) is a `COUNT(*)` over the room's
rows of `current_state_events` with `membership = 'join'`, cached until the
next membership change of the room: every join of a big room counts the room
again (45 to 100 ms at 100,000 members on SQLite).

`fastjoin_room_joined_counts` holds that count for every room, kept by
triggers on `current_state_events` in the same transaction as each write to
it, whoever writes it (Synapse's event persister, the module's resync, a purge,
a background update). Reading it is one primary-key lookup, and at every
committed state of the database it equals what the `COUNT(*)` would return
then; Synapse's cache and its invalidation (replication included) are left as
they are, so the count is read back exactly when Synapse would have counted.

- SQLite: row triggers (`WHEN` the row is or was a join).
- PostgreSQL: statement triggers with transition tables, one upsert per
  statement: a row trigger updating the same count row once per inserted member
  makes the resync's bulk insert of 100,000 members take minutes (every update
  of one row in one transaction leaves a dead version to skip).

The table is created and filled from `current_state_events` in the schema
step that creates the triggers (one transaction; on PostgreSQL `CREATE
TRIGGER` locks out writers to `current_state_events` until it commits, so no
write falls between the fill and the triggers). `TRUNCATE` of
`current_state_events` would bypass them; neither Synapse nor the module
truncates it. Should a trigger be dropped, the main process restores them all
and fills the table again at its next start, and until then no process answers
from the table (`joined_counts_kept_txn`): Synapse counts.
"""

from synapse.storage.database import LoggingTransaction
from synapse.storage.engines import PostgresEngine

TABLE = "fastjoin_room_joined_counts"

_CREATE_TABLE = f"""
    CREATE TABLE {TABLE} (
        room_id TEXT NOT NULL PRIMARY KEY,
        joined BIGINT NOT NULL
    )
"""

_FILL = f"""
    INSERT INTO {TABLE} (room_id, joined)
    SELECT room_id, COUNT(*) FROM current_state_events
    WHERE membership = 'join'
    GROUP BY room_id
"""

_SQLITE_TRIGGERS = [
    f"""
    CREATE TRIGGER fastjoin_joined_counts_insert
    AFTER INSERT ON current_state_events
    WHEN NEW.membership = 'join'
    BEGIN
        INSERT INTO {TABLE} (room_id, joined) VALUES (NEW.room_id, 1)
        ON CONFLICT (room_id) DO UPDATE SET joined = joined + 1;
    END
    """,
    f"""
    CREATE TRIGGER fastjoin_joined_counts_delete
    AFTER DELETE ON current_state_events
    WHEN OLD.membership = 'join'
    BEGIN
        UPDATE {TABLE} SET joined = joined - 1 WHERE room_id = OLD.room_id;
    END
    """,
    # An update takes the old row out and puts the new one in (Synapse's
    # background update that fills the membership column is one).
    f"""
    CREATE TRIGGER fastjoin_joined_counts_update_old
    AFTER UPDATE ON current_state_events
    WHEN OLD.membership = 'join'
    BEGIN
        UPDATE {TABLE} SET joined = joined - 1 WHERE room_id = OLD.room_id;
    END
    """,
    f"""
    CREATE TRIGGER fastjoin_joined_counts_update_new
    AFTER UPDATE ON current_state_events
    WHEN NEW.membership = 'join'
    BEGIN
        INSERT INTO {TABLE} (room_id, joined) VALUES (NEW.room_id, 1)
        ON CONFLICT (room_id) DO UPDATE SET joined = joined + 1;
    END
    """,
]


def _postgres_function(name: str, deltas: str) -> str:
    """A trigger function adding, per room, the sum of `deltas` (a query of
    `room_id, d` rows over the statement's transition tables)."""
    return f"""
    CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO {TABLE} AS c (room_id, joined)
        SELECT room_id, SUM(d) FROM ({deltas}) AS deltas
        GROUP BY room_id HAVING SUM(d) <> 0
        ON CONFLICT (room_id) DO UPDATE SET joined = c.joined + EXCLUDED.joined;
        RETURN NULL;
    END
    $$
    """


_NEW_JOINS = "SELECT room_id, 1 AS d FROM fastjoin_new WHERE membership = 'join'"
_OLD_JOINS = "SELECT room_id, -1 AS d FROM fastjoin_old WHERE membership = 'join'"

_POSTGRES_TRIGGERS = [
    _postgres_function("fastjoin_joined_counts_insert", _NEW_JOINS),
    _postgres_function("fastjoin_joined_counts_delete", _OLD_JOINS),
    _postgres_function(
        "fastjoin_joined_counts_update", f"{_NEW_JOINS} UNION ALL {_OLD_JOINS}"
    ),
    """
    CREATE TRIGGER fastjoin_joined_counts_insert
    AFTER INSERT ON current_state_events
    REFERENCING NEW TABLE AS fastjoin_new
    FOR EACH STATEMENT EXECUTE FUNCTION fastjoin_joined_counts_insert()
    """,
    """
    CREATE TRIGGER fastjoin_joined_counts_delete
    AFTER DELETE ON current_state_events
    REFERENCING OLD TABLE AS fastjoin_old
    FOR EACH STATEMENT EXECUTE FUNCTION fastjoin_joined_counts_delete()
    """,
    """
    CREATE TRIGGER fastjoin_joined_counts_update
    AFTER UPDATE ON current_state_events
    REFERENCING OLD TABLE AS fastjoin_old NEW TABLE AS fastjoin_new
    FOR EACH STATEMENT EXECUTE FUNCTION fastjoin_joined_counts_update()
    """,
]


def create_joined_counts_txn(txn: LoggingTransaction) -> None:
    """Schema step: the table, filled from `current_state_events`, and the
    triggers that keep it (in the caller's transaction)."""
    txn.execute(_CREATE_TABLE)
    postgres = isinstance(txn.database_engine, PostgresEngine)
    if postgres:
        # Writers of current_state_events wait from here to the commit, so the
        # fill below and the triggers see the same rows.
        txn.execute("LOCK TABLE current_state_events IN SHARE ROW EXCLUSIVE MODE")
    for statement in _POSTGRES_TRIGGERS if postgres else _SQLITE_TRIGGERS:
        txn.execute(statement)
    txn.execute(_FILL)


_SQLITE_TRIGGER_NAMES = (
    "fastjoin_joined_counts_insert",
    "fastjoin_joined_counts_delete",
    "fastjoin_joined_counts_update_old",
    "fastjoin_joined_counts_update_new",
)
_POSTGRES_TRIGGER_NAMES = (
    "fastjoin_joined_counts_insert",
    "fastjoin_joined_counts_delete",
    "fastjoin_joined_counts_update",
)


def joined_counts_kept_txn(txn: LoggingTransaction) -> bool:
    """Whether every trigger that keeps the counts is on `current_state_events`
    (if one was dropped, the counts may be stale)."""
    if isinstance(txn.database_engine, PostgresEngine):
        names = _POSTGRES_TRIGGER_NAMES
        txn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'current_state_events'::regclass"
            " AND tgenabled <> 'D'"
        )
    else:
        names = _SQLITE_TRIGGER_NAMES
        txn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger'"
            " AND tbl_name = 'current_state_events'"
        )
    present = {row[0] for row in txn}
    return all(name in present for name in names)


def restore_joined_counts_txn(txn: LoggingTransaction) -> None:
    """Create the table and its triggers again from scratch (the caller found a
    trigger missing): what is left of them is dropped, the counts filled anew."""
    postgres = isinstance(txn.database_engine, PostgresEngine)
    for name in _POSTGRES_TRIGGER_NAMES if postgres else _SQLITE_TRIGGER_NAMES:
        if postgres:
            txn.execute(f"DROP TRIGGER IF EXISTS {name} ON current_state_events")
        else:
            txn.execute(f"DROP TRIGGER IF EXISTS {name}")
    txn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    create_joined_counts_txn(txn)


def joined_member_count_txn(txn: LoggingTransaction, room_id: str) -> int:
    """The number of members of `room_id` whose current membership is join:
    what Synapse's `COUNT(*)` over `current_state_events` returns."""
    txn.execute(f"SELECT joined FROM {TABLE} WHERE room_id = ?", (room_id,))
    row = txn.fetchone()
    return int(row[0]) if row else 0
