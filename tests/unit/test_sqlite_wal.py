"""storage/sqlite_wal.py: SQLite's automatic WAL checkpoints held back while a
resync runs, and put back (and checkpointed) after the last one; nothing done
on PostgreSQL."""

from typing import Any, Callable

import pytest_twisted
from twisted.internet import defer

from synapse.storage.engines import Sqlite3Engine

from synapse_fastjoin.storage.sqlite_wal import WalCheckpointHold
from tests.unit.test_storage import Database, database  # noqa: F401 (fixture)

PAGES = 50_000


class Pool:
    """The part of Synapse's DatabasePool the hold uses, on the test's
    connection."""

    def __init__(self, db: Database) -> None:
        self.engine = db.engine
        self._conn = db.conn

    def runWithConnection(self, func: Callable[..., Any]) -> "defer.Deferred[Any]":  # noqa: N802
        return defer.maybeDeferred(func, self._conn)


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
