"""The module's tables, on real SQLite and PostgreSQL databases that carry
Synapse's full schema (prepared by Synapse's own `prepare_database`)."""

from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import defer

from synapse.storage.database import LoggingDatabaseConnection, LoggingTransaction
from synapse.storage.engines import create_engine
from synapse.storage.prepare_database import prepare_database

from synapse_fastjoin.storage.schema import (
    SCHEMA_VERSION,
    SchemaNotReadyError,
    SchemaTooNewError,
    check_schema_txn,
    prepare_schema_txn,
)
from synapse_fastjoin.storage.store import FastJoinStore
from tests.harness.postgres import PostgresAdmin


class Database:
    """A real database with Synapse's schema, and a `run_db_interaction` that
    behaves like ModuleApi's: the function runs in a transaction, committed on
    success and rolled back on error."""

    def __init__(self, engine: Any, conn: Any, section: dict[str, Any]) -> None:
        self.engine = engine
        # Synapse's `database` section for this database (homeserver.yaml).
        self.section = section
        self.conn = LoggingDatabaseConnection(
            conn=conn, engine=engine, default_txn_name="test", server_name="test"
        )
        engine.on_new_connection(self.conn)
        prepare_database(self.conn, engine, None)

    def run_sync(self, desc: str, func: Callable[..., Any], *args: Any) -> Any:
        txn = LoggingTransaction(
            txn=self.conn.conn.cursor(),
            name=desc,
            server_name="test",
            database_engine=self.engine,
        )
        try:
            result = func(txn, *args)
        except BaseException:
            self.conn.conn.rollback()
            raise
        self.conn.conn.commit()
        return result

    def run_db_interaction(self, desc: str, func: Callable[..., Any], *args: Any):
        return defer.maybeDeferred(self.run_sync, desc, func, *args)

    def execute(self, sql: str, *args: Any) -> list[tuple]:
        def txn_fn(txn: LoggingTransaction) -> list[tuple]:
            txn.execute(sql, args)
            return txn.fetchall() if txn.description else []

        return self.run_sync("execute", txn_fn)


@pytest.fixture
def database(db_backend: str, tmp_path) -> Iterator[Database]:
    if db_backend == "sqlite":
        path = str(tmp_path / "homeserver.db")
        section = {"name": "sqlite3", "args": {"database": path}}
        engine = create_engine(section)
        db = Database(engine, engine.module.connect(path), section)
        yield db
        db.conn.conn.close()
        return
    admin = PostgresAdmin.from_env()
    pg = admin.create_database("storage")
    section = {"name": "psycopg2", "args": pg.synapse_args}
    engine = create_engine(section)
    db = Database(engine, pg.connect(), section)
    try:
        yield db
    finally:
        db.conn.conn.close()
        admin.drop_database(pg.name)


def _add_synapse_partial_room(db: Database, room_id: str, servers: list[str]) -> None:
    """Mark a room partial-state the way Synapse's join does."""
    db.execute(
        "INSERT INTO rooms (room_id, is_public, room_version) VALUES (?, ?, ?)",
        room_id,
        False,
        "10",
    )
    db.execute(
        "INSERT INTO partial_state_rooms (room_id, device_lists_stream_id, joined_via)"
        " VALUES (?, ?, ?)",
        room_id,
        1,
        servers[0],
    )
    for server in servers:
        db.execute(
            "INSERT INTO partial_state_rooms_servers (room_id, server_name) VALUES (?, ?)",
            room_id,
            server,
        )


def _clear_synapse_partial_room(db: Database, room_id: str) -> None:
    db.execute("DELETE FROM partial_state_rooms_servers WHERE room_id = ?", room_id)
    db.execute("DELETE FROM partial_state_rooms WHERE room_id = ?", room_id)


def test_schema_is_created_once_and_versioned(database: Database):
    assert database.run_sync("prepare", prepare_schema_txn) == 0
    assert database.run_sync("prepare", prepare_schema_txn) == SCHEMA_VERSION
    assert database.execute("SELECT version FROM fastjoin_schema_version") == [
        (SCHEMA_VERSION,)
    ]
    database.run_sync("check", check_schema_txn)
    assert database.execute("SELECT COUNT(*) FROM fastjoin_rooms") == [(0,)]


def test_newer_schema_is_refused(database: Database):
    database.run_sync("prepare", prepare_schema_txn)
    database.execute("UPDATE fastjoin_schema_version SET version = ?", SCHEMA_VERSION + 1)
    with pytest.raises(SchemaTooNewError, match="install the newer"):
        database.run_sync("prepare", prepare_schema_txn)


def test_worker_refuses_tables_the_main_process_has_not_created(database: Database):
    with pytest.raises(SchemaNotReadyError, match="main process"):
        database.run_sync("check", check_schema_txn)


@pytest_twisted.ensureDeferred
async def test_lifecycle_of_a_partial_state_join(database: Database):
    store = FastJoinStore(database.run_db_interaction, may_migrate=True)
    room = "!big:remote.example"
    _add_synapse_partial_room(database, room, ["remote.example", "a.example", "b.example"])

    await store.record_partial_state_join(room, "$join", "remote.example", 1_000)
    [row] = await store.get_partial_state_rooms()
    assert row["room_id"] == room
    assert row["joined_ts"] == 1_000
    assert row["joined_via"] == "remote.example"
    assert row["join_event_id"] == "$join"
    assert row["known_servers"] == 3
    assert row["partial_state_events_remaining"] == 0
    assert row["resync_status"] == "joining"
    assert row["resync_attempts"] == 0

    await store.record_resync_started(room, 1_500)
    await store.record_resync_finished(room, False, "FederationError: all failed", 2_000)
    [row] = await store.get_partial_state_rooms(room)
    assert row["resync_status"] == "failed"
    assert row["last_error"] == "FederationError: all failed"

    # After a restart Synapse resumes the resync.
    await store.record_resync_started(room, 3_000)
    [row] = await store.get_partial_state_rooms(room)
    assert row["resync_status"] == "resyncing"
    assert row["resync_attempts"] == 2
    assert (row["first_resync_ts"], row["last_resync_ts"]) == (1_500, 3_000)

    _clear_synapse_partial_room(database, room)
    await store.record_resync_finished(room, True, None, 4_000)
    assert await store.get_partial_state_rooms() == []
    assert database.execute("SELECT COUNT(*) FROM fastjoin_rooms") == [(0,)]

    complete, failed = await store.get_history(room)
    assert complete["outcome"] == "complete"
    assert complete["finished_ts"] == 4_000
    assert complete["joined_ts"] == 1_000
    assert complete["resync_attempts"] == 2
    assert failed["outcome"] == "failed"
    assert failed["error"] == "FederationError: all failed"


@pytest_twisted.ensureDeferred
async def test_room_joined_before_the_module_was_enabled(database: Database):
    store = FastJoinStore(database.run_db_interaction, may_migrate=True)
    room = "!old:remote.example"
    _add_synapse_partial_room(database, room, ["remote.example"])

    [row] = await store.get_partial_state_rooms()
    assert row["resync_status"] == "unknown"
    assert row["joined_ts"] is None

    await store.record_resync_started(room, 5_000)
    [row] = await store.get_partial_state_rooms()
    assert row["resync_status"] == "resyncing"
    assert row["joined_via"] == "remote.example"
    assert row["joined_ts"] is None


@pytest_twisted.ensureDeferred
async def test_history_is_pruned_and_stale_rooms_forgotten(database: Database):
    store = FastJoinStore(database.run_db_interaction, may_migrate=True)
    _add_synapse_partial_room(database, "!a:x", ["x"])
    await store.record_partial_state_join("!a:x", "$a", "x", 0)
    await store.record_resync_finished("!a:x", False, "boom", 100)
    await store.record_resync_finished("!a:x", False, "boom", 10_000)
    assert await store.prune_history(before_ts=5_000) == 1
    assert [r["finished_ts"] for r in await store.get_history()] == [10_000]

    _clear_synapse_partial_room(database, "!a:x")
    assert await store.forget_rooms_not_partial() == 1
    assert database.execute("SELECT COUNT(*) FROM fastjoin_rooms") == [(0,)]
