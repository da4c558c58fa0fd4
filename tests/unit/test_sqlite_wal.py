"""storage/sqlite_wal.py: SQLite's automatic WAL checkpoints held back while a
resync runs, and put back (and checkpointed) after the last one; nothing done
on PostgreSQL."""

import sqlite3
import threading
from typing import Any, Callable

import pytest_twisted
from twisted.internet import defer, reactor

from synapse.storage.engines import Sqlite3Engine

from synapse_fastjoin.storage.sqlite_wal import WalCheckpointHold, _database_file, checkpoint_file
from tests.unit.test_storage import Database, database  # noqa: F401 (fixture)

PAGES = 50_000


class Pool:
    """The part of Synapse's DatabasePool the hold uses, on the test's
    connection."""

    def __init__(self, db: Database) -> None:
        self.engine = db.engine
        self._conn = db.conn

    def runWithConnection(self, func: Callable[..., Any], *args: Any) -> "defer.Deferred[Any]":  # noqa: N802
        return defer.maybeDeferred(func, self._conn, *args)


def _mark(db: Database) -> int:
    return db.execute("PRAGMA wal_autocheckpoint")[0][0]


def _write_pages(db: Database, transactions: int, rows: int) -> None:
    """Transactions of `rows` rows of about a page each."""
    db.execute("CREATE TABLE IF NOT EXISTS wal_test (b BLOB)")
    for _ in range(transactions):
        def txn(t: Any) -> None:
            t.execute_batch("INSERT INTO wal_test (b) VALUES (?)", [(b"x" * 4000,)] * rows)

        db.run_sync("write", txn)


@pytest_twisted.ensureDeferred
async def test_the_mark_is_raised_while_resyncs_run_and_put_back_after_the_last(
    database: Database,  # noqa: F811
) -> None:
    hold = WalCheckpointHold(Pool(database), PAGES)
    if not isinstance(database.engine, Sqlite3Engine):
        # PostgreSQL: nothing to do, nothing done.
        assert not hold.active
        await hold.enter()
        assert await hold.exit() is None
        return
    assert hold.active
    before = _mark(database)
    assert before == 1000  # SQLite's default, as Synapse leaves it

    await hold.enter()
    await hold.enter()  # a second room's resync
    assert _mark(database) == PAGES
    # 3,000 pages in 15 commits: with the default mark the log would have been
    # checkpointed and started again from the top after the first thousand.
    _write_pages(database, 15, 200)
    assert await hold.exit() is None  # one resync still runs
    assert _mark(database) == PAGES

    busy, frames, done = await hold.exit()
    assert _mark(database) == before
    assert frames >= 3000, frames  # the log had grown whole
    assert (busy, done) == (0, frames)  # and is checkpointed now
    assert await hold.exit() is None  # more exits than enters change nothing


@pytest_twisted.ensureDeferred
async def test_a_mark_set_higher_by_the_admin_is_kept(database: Database) -> None:  # noqa: F811
    if not isinstance(database.engine, Sqlite3Engine):
        return
    database.execute(f"PRAGMA wal_autocheckpoint = {PAGES * 2}")
    hold = WalCheckpointHold(Pool(database), PAGES)
    await hold.enter()
    assert _mark(database) == PAGES * 2
    await hold.exit()
    assert _mark(database) == PAGES * 2


def test_zero_leaves_sqlite_alone(database: Database) -> None:  # noqa: F811
    assert not WalCheckpointHold(Pool(database), 0).active


@pytest_twisted.ensureDeferred
async def test_the_closing_checkpoint_runs_apart_while_synapse_s_connection_writes(
    database: Database,  # noqa: F811
) -> None:
    """The closing checkpoint runs on a connection of its own, in a thread:
    Synapse's connection, in the middle of a write transaction, neither
    blocks it nor is used by it; the mark is put back after it."""
    if not isinstance(database.engine, Sqlite3Engine):
        return
    threads: list[str] = []

    def checkpoint(path: str) -> tuple[int, int, int]:
        threads.append(threading.current_thread().name)
        return checkpoint_file(path)

    hold = WalCheckpointHold(Pool(database), PAGES, reactor=reactor, checkpoint=checkpoint)
    await hold.enter()
    _write_pages(database, 15, 200)
    # Synapse's connection holds a write transaction open throughout.
    raw = database.conn.conn
    raw.execute("BEGIN IMMEDIATE")
    raw.execute("INSERT INTO wal_test (b) VALUES (?)", (b"y" * 4000,))
    try:
        assert _mark(database) == PAGES
        busy, frames, done = await hold.exit()
    finally:
        raw.rollback()
    assert threads and threads[0] != threading.current_thread().name
    assert frames >= 3000, frames
    assert (busy, done) == (0, frames)  # every committed frame copied back
    assert _mark(database) == 1000  # and the mark put back afterwards


@pytest_twisted.ensureDeferred
async def test_a_failed_checkpoint_apart_still_puts_the_mark_back(
    database: Database,  # noqa: F811
) -> None:
    if not isinstance(database.engine, Sqlite3Engine):
        return

    def checkpoint(path: str) -> tuple[int, int, int]:
        raise sqlite3.OperationalError("disk I/O error")

    hold = WalCheckpointHold(Pool(database), PAGES, reactor=reactor, checkpoint=checkpoint)
    await hold.enter()
    assert _mark(database) == PAGES
    assert await hold.exit() is None
    assert _mark(database) == 1000


def test_the_database_file_is_read_from_the_connection(database: Database) -> None:  # noqa: F811
    if not isinstance(database.engine, Sqlite3Engine):
        return
    assert _database_file(database.conn).endswith("homeserver.db")
    # In memory there is no file: the checkpoint stays on Synapse's connection.
    memory = sqlite3.connect(":memory:")
    try:
        assert _database_file(memory) is None
    finally:
        memory.close()
