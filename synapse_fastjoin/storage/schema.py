"""The module's own tables, created and versioned by the module itself.

Synapse's schema machinery only runs Synapse's own deltas, so the module keeps a
version number in `fastjoin_schema_version` and applies the numbered steps in
`SCHEMA_STEPS` that the database has not seen yet, all in one transaction. The
SQL is plain enough to run unchanged on SQLite and PostgreSQL.
"""

import logging
from typing import Callable

from synapse.storage.database import LoggingTransaction
from synapse.storage.engines import Sqlite3Engine

from synapse_fastjoin.storage.member_counts import (
    ROOM_COUNTS,
    SERVER_COUNTS,
    counts_kept_txn,
    create_joined_counts_txn,
    create_server_counts_txn,
    restore_counts_txn,
)

logger = logging.getLogger(__name__)

# SCHEMA_STEPS[n] brings the schema from version n to version n + 1. Append new
# steps; never edit one that has shipped. A step is SQL run unchanged on both
# engines, or a `_txn` function where they differ.
SCHEMA_STEPS: list[list[str | Callable[[LoggingTransaction], None]]] = [
    # 1: what Synapse does not record about partial-state joins.
    [
        """
        CREATE TABLE fastjoin_rooms (
            room_id TEXT NOT NULL PRIMARY KEY,
            join_event_id TEXT,
            joined_via TEXT,
            joined_ts BIGINT,
            -- 'joining', 'resyncing' or 'failed'
            resync_status TEXT NOT NULL,
            first_resync_ts BIGINT,
            last_resync_ts BIGINT,
            resync_attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            updated_ts BIGINT NOT NULL
        )
        """,
        """
        CREATE TABLE fastjoin_resync_history (
            room_id TEXT NOT NULL,
            join_event_id TEXT,
            joined_via TEXT,
            joined_ts BIGINT,
            first_resync_ts BIGINT,
            finished_ts BIGINT NOT NULL,
            -- 'complete' or 'failed'
            outcome TEXT NOT NULL,
            resync_attempts INTEGER NOT NULL,
            error TEXT
        )
        """,
        "CREATE INDEX fastjoin_resync_history_room ON fastjoin_resync_history (room_id)",
        "CREATE INDEX fastjoin_resync_history_finished ON fastjoin_resync_history (finished_ts)",
    ],
    # 2: the resync engine's checkpoint (its progress counters, as JSON).
    [
        "ALTER TABLE fastjoin_rooms ADD COLUMN progress TEXT",
        "ALTER TABLE fastjoin_rooms ADD COLUMN progress_ts BIGINT",
    ],
    # 3: what each server did when the engine asked it for a room's state, so
    # the fetch policy asks first those that served good state before.
    [
        """
        CREATE TABLE fastjoin_room_servers (
            room_id TEXT NOT NULL,
            server_name TEXT NOT NULL,
            good_count INTEGER NOT NULL DEFAULT 0,
            fail_count INTEGER NOT NULL DEFAULT 0,
            last_good_ts BIGINT,
            last_fail_ts BIGINT,
            last_error TEXT,
            PRIMARY KEY (room_id, server_name)
        )
        """,
    ],
    # 4 (bounded inbound staging): the inbound events dropped from a room's
    # queue in `federation_inbound_events_staging` when it passed
    # `resync.inbound_queue_limit`, kept by id only until they are fetched
    # again (storage/inbound.py).
    [
        """
        CREATE TABLE fastjoin_inbound_dropped (
            room_id TEXT NOT NULL,
            event_id TEXT NOT NULL,
            origin TEXT NOT NULL,
            -- when Synapse first staged it (its place in the queue's order)
            received_ts BIGINT NOT NULL,
            dropped_ts BIGINT NOT NULL,
            -- 'pending': to fetch again; 'restaged': fetched and queued again;
            -- 'arrived': stored meanwhile (get_missing_events, backfill);
            -- 'failed': no server served it after every attempt
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_ts BIGINT NOT NULL DEFAULT 0,
            done_ts BIGINT,
            last_error TEXT,
            PRIMARY KEY (room_id, event_id)
        )
        """,
        "CREATE INDEX fastjoin_inbound_dropped_state"
        " ON fastjoin_inbound_dropped (room_id, state, received_ts)",
    ],
    # 5: each room's joined-member count, kept by triggers on
    # current_state_events (storage/member_counts.py).
    [create_joined_counts_txn],
    # 6: each (room, server)'s joined-member count, kept the same way, for the
    # presence handler's fan-out of a join (handlers/presence.py).
    [create_server_counts_txn],
]

SCHEMA_VERSION = len(SCHEMA_STEPS)


class SchemaTooNewError(Exception):
    """The database was written by a newer version of the module."""


def _begin_explicitly_on_sqlite(txn: LoggingTransaction) -> None:
    """Python's sqlite3 opens a transaction implicitly only before INSERT,
    UPDATE, DELETE and REPLACE: DDL run before any of those commits on its own.
    Open one explicitly so the whole upgrade commits or rolls back as a unit,
    and no reader ever sees the tables without their version row."""
    if isinstance(txn.database_engine, Sqlite3Engine):
        connection = txn.txn.connection
        if not connection.in_transaction:
            txn.execute("BEGIN")


def prepare_schema_txn(txn: LoggingTransaction) -> int:
    """Bring the module's tables up to `SCHEMA_VERSION`.

    Runs inside one transaction, so a failure leaves the schema as it was.

    Returns:
        The version the database was at before.

    Raises:
        SchemaTooNewError: the database is at a later version than this code knows;
            downgrading the module is refused rather than guessed at.
    """
    _begin_explicitly_on_sqlite(txn)
    txn.execute(
        "CREATE TABLE IF NOT EXISTS fastjoin_schema_version ("
        " lock CHAR(1) NOT NULL DEFAULT 'X' UNIQUE CHECK (lock = 'X'),"
        " version INTEGER NOT NULL)"
    )
    txn.execute("SELECT version FROM fastjoin_schema_version")
    row = txn.fetchone()
    current = row[0] if row else 0
    if current > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"synapse-fastjoin's tables are at schema version {current}, but this "
            f"version of the module only knows up to {SCHEMA_VERSION}: install the "
            "newer synapse-fastjoin again"
        )
    for version in range(current, SCHEMA_VERSION):
        logger.info("Upgrading synapse-fastjoin schema to version %d", version + 1)
        for statement in SCHEMA_STEPS[version]:
            if callable(statement):
                statement(txn)
            else:
                txn.execute(statement)
    # Counts kept by triggers, by the schema version that created them: a
    # dropped trigger means stale counts, so they are made again.
    for since, kept in ((5, ROOM_COUNTS), (6, SERVER_COUNTS)):
        if current >= since and not counts_kept_txn(txn, kept):
            logger.warning(
                "A trigger keeping %s was dropped: creating them again and counting"
                " anew",
                kept.table,
            )
            restore_counts_txn(txn, kept)
    if row is None:
        txn.execute(
            "INSERT INTO fastjoin_schema_version (version) VALUES (?)", (SCHEMA_VERSION,)
        )
    elif current != SCHEMA_VERSION:
        txn.execute("UPDATE fastjoin_schema_version SET version = ?", (SCHEMA_VERSION,))
    return current


class SchemaNotReadyError(Exception):
    """A worker found the tables older than its code: the main process, which
    upgrades them, has not started with this version yet."""


def check_schema_txn(txn: LoggingTransaction) -> None:
    """Raise SchemaNotReadyError unless the tables are at `SCHEMA_VERSION`."""
    try:
        txn.execute("SELECT version FROM fastjoin_schema_version")
        row = txn.fetchone()
    except Exception:
        # The table does not exist yet; the failed statement is rolled back with
        # this read-only transaction.
        row = None
    if row is None or row[0] != SCHEMA_VERSION:
        raise SchemaNotReadyError(
            f"synapse-fastjoin's tables are at schema version {row[0] if row else 0},"
            f" this code needs {SCHEMA_VERSION}: start the main process first"
        )
