# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""SQLite's WAL checkpoints held back while a resync writes.

Synapse opens SQLite in WAL mode with SQLite's default automatic checkpoint:
once the write-ahead log holds 1,000 pages (4 MiB), the commit that passed
that mark copies every page of the log back into the database file, inside
that commit. A resync writes a big room's state in transactions of hundreds
of events, each of which dirties pages all over a dozen indexes keyed by
random event ids: nearly every commit passed the mark, and copied what it had
just written a second time. In the joiner's profile, commits were 14 % of all
busy samples of a 50,000-member resync.

While any resync runs, the mark is raised to `resync.sqlite_wal_autocheckpoint`
pages (`PRAGMA wal_autocheckpoint`, a setting of the connection): pages
written again and again are copied back once, in far fewer checkpoints. When
the last resync ends the log is checkpointed there and then (PASSIVE: it never
waits for readers or writers), so that the cost is not left to whatever
transaction comes next, and then the setting is put back as it was.

That closing checkpoint copies up to the whole raised log (hundreds of MiB
after a big room) into the database file. It runs on a connection of its own
to the same file, in a thread of the reactor's pool, not on Synapse's one
SQLite connection: WAL mode lets a checkpoint run beside readers and a writer,
so the requests that come right after the resync (the room's /members, the
user directory's, stats' and presence's work on the new members) do not queue
behind it. The mark is put back only once it is done, so that no commit of
Synapse's in the meantime starts a checkpoint of the same log inside itself.
A database with no file (in memory) is checkpointed on Synapse's connection,
as before.

Nothing written changes: the same statements in the same transactions, each
commit still synced to the log (`synchronous` is untouched), so durability is
Synapse's own. What changes is the size the log may reach, about
pages x 4 KiB (reclaimed as the log is reused after a checkpoint).
"""

import logging
import sqlite3
import time
from typing import TYPE_CHECKING, Callable

from synapse.logging.context import defer_to_thread
from synapse.storage.engines import Sqlite3Engine

if TYPE_CHECKING:
    from synapse.storage.database import DatabasePool, LoggingDatabaseConnection

logger = logging.getLogger(__name__)


def _pragma(conn: "LoggingDatabaseConnection", statement: str) -> tuple[int, ...]:
    """Run a PRAGMA on the connection; its one row of integers."""
    cur = conn.cursor()
    try:
        cur.execute(f"PRAGMA {statement}")
        row = cur.fetchone()
    finally:
        cur.close()
    return tuple(int(v) for v in row)


def _get_autocheckpoint(conn: "LoggingDatabaseConnection") -> int:
    return _pragma(conn, "wal_autocheckpoint")[0]


def _set_autocheckpoint(conn: "LoggingDatabaseConnection", pages: int) -> int:
    """Set the mark; returns the value SQLite reports afterwards."""
    return _pragma(conn, f"wal_autocheckpoint = {int(pages)}")[0]


def _checkpoint(conn: "LoggingDatabaseConnection") -> tuple[int, int, int]:
    """(busy, frames in the log, frames checkpointed)."""
    busy, frames, done = _pragma(conn, "wal_checkpoint(PASSIVE)")
    return busy, frames, done


def _database_file(conn: "LoggingDatabaseConnection") -> str | None:
    """The file of the connection's main database; None in memory."""
    cur = conn.cursor()
    try:
        cur.execute("PRAGMA database_list")
        rows = cur.fetchall()
    finally:
        cur.close()
    return next((str(file) for _, name, file in rows if name == "main" and file), None)


def checkpoint_file(path: str) -> tuple[int, int, int]:
    """A PASSIVE checkpoint of the database at `path` on a connection of its
    own (opened and closed here; blocking: run it in a thread). (busy,
    frames in the log, frames checkpointed)."""
    conn = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    try:
        row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        conn.close()
    busy, frames, done = (int(v) for v in row)
    return busy, frames, done


class WalCheckpointHold:
    """Raises SQLite's automatic-checkpoint mark while at least one resync
    runs (`enter` and `exit` around each); does nothing on PostgreSQL or with
    `pages` 0."""

    def __init__(
        self,
        db_pool: "DatabasePool",
        pages: int,
        reactor: object | None = None,
        checkpoint: Callable[[str], tuple[int, int, int]] = checkpoint_file,
    ) -> None:
        self._db_pool = db_pool
        self._pages = pages
        self._active = pages > 0 and isinstance(db_pool.engine, Sqlite3Engine)
        self._holders = 0
        # The mark as it was before the first resync raised it.
        self._saved: int | None = None
        # The database's file, read from Synapse's connection as the mark is
        # raised (None: in memory, or not known); where the closing
        # checkpoint runs, in a thread of `reactor`'s pool.
        self._file: str | None = None
        self._reactor = reactor
        self._checkpoint_file = checkpoint

    @property
    def active(self) -> bool:
        return self._active

    async def enter(self) -> None:
        if not self._active:
            return
        self._holders += 1
        if self._holders > 1:
            return

        def raise_mark(conn: "LoggingDatabaseConnection") -> tuple[int, int, str | None]:
            before = _get_autocheckpoint(conn)
            return before, _set_autocheckpoint(conn, max(before, self._pages)), _database_file(conn)

        try:
            self._saved, now, self._file = await self._db_pool.runWithConnection(raise_mark)
        except Exception:
            logger.warning("Could not raise SQLite's WAL checkpoint mark", exc_info=True)
            return
        logger.info(
            "SQLite WAL checkpoints every %d pages while resyncing (was %d)", now, self._saved
        )

    async def exit(self) -> tuple[int, int, int] | None:
        """Returns what the closing checkpoint reported (busy, frames in the
        log, frames checkpointed), if this was the last holder."""
        if not self._active or self._holders == 0:
            return None
        self._holders -= 1
        if self._holders or self._saved is None:
            return None
        saved, self._saved = self._saved, None
        started = time.monotonic()
        if self._file is None or self._reactor is None:
            result = await self._restore_and_checkpoint_here(saved)
        else:
            result = await self._checkpoint_apart_then_restore(self._file, saved)
        if result is None:
            return None
        now, (busy, frames, done) = result
        logger.info(
            "SQLite WAL checkpoints every %d pages again; checkpointed %d of %d frames in %.1f s%s",
            now,
            done,
            frames,
            time.monotonic() - started,
            " (readers busy: the rest at the next checkpoint)" if busy else "",
        )
        return busy, frames, done

    async def _restore_and_checkpoint_here(self, saved: int) -> tuple[int, tuple[int, int, int]] | None:
        """The mark put back and the log checkpointed on Synapse's connection."""

        def restore(conn: "LoggingDatabaseConnection") -> tuple[int, tuple[int, int, int]]:
            now = _set_autocheckpoint(conn, saved)
            return now, _checkpoint(conn)

        try:
            return await self._db_pool.runWithConnection(restore)
        except Exception:
            logger.warning("Could not restore SQLite's WAL checkpoint mark", exc_info=True)
            return None

    async def _checkpoint_apart_then_restore(
        self, path: str, saved: int
    ) -> tuple[int, tuple[int, int, int]] | None:
        """The log checkpointed on a connection of its own in a thread, then
        the mark put back on Synapse's connection."""
        try:
            counts: tuple[int, int, int] | None = await defer_to_thread(
                self._reactor, self._checkpoint_file, path  # type: ignore[arg-type]
            )
        except Exception:
            # The mark put back below: the next checkpoint (at worst that of
            # Synapse's next commit) copies the log.
            logger.warning("Could not checkpoint SQLite's WAL on a connection of its own", exc_info=True)
            counts = None
        try:
            now = await self._db_pool.runWithConnection(_set_autocheckpoint, saved)
        except Exception:
            logger.warning("Could not restore SQLite's WAL checkpoint mark", exc_info=True)
            return None
        if counts is None:
            return None
        return now, counts
