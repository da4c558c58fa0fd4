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
the last resync ends the setting is put back as it was, and the log is
checkpointed there and then (PASSIVE: it never waits for readers), so that the
cost is not left to whatever transaction comes next.

Nothing written changes: the same statements in the same transactions, each
commit still synced to the log (`synchronous` is untouched), so durability is
Synapse's own. What changes is the size the log may reach, about
pages x 4 KiB (reclaimed as the log is reused after a checkpoint).
"""

import logging
import time
from typing import TYPE_CHECKING

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


class WalCheckpointHold:
    """Raises SQLite's automatic-checkpoint mark while at least one resync
    runs (`enter` and `exit` around each); does nothing on PostgreSQL or with
    `pages` 0."""

    def __init__(self, db_pool: "DatabasePool", pages: int) -> None:
        self._db_pool = db_pool
        self._pages = pages
        self._active = pages > 0 and isinstance(db_pool.engine, Sqlite3Engine)
        self._holders = 0
        # The mark as it was before the first resync raised it.
        self._saved: int | None = None

    @property
    def active(self) -> bool:
        return self._active

    async def enter(self) -> None:
        if not self._active:
            return
        self._holders += 1
        if self._holders > 1:
            return

        def raise_mark(conn: "LoggingDatabaseConnection") -> tuple[int, int]:
            before = _get_autocheckpoint(conn)
            return before, _set_autocheckpoint(conn, max(before, self._pages))

        try:
            self._saved, now = await self._db_pool.runWithConnection(raise_mark)
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

        def restore(conn: "LoggingDatabaseConnection") -> tuple[int, tuple[int, int, int]]:
            now = _set_autocheckpoint(conn, saved)
            return now, _checkpoint(conn)

        started = time.monotonic()
        try:
            now, (busy, frames, done) = await self._db_pool.runWithConnection(restore)
        except Exception:
            logger.warning("Could not restore SQLite's WAL checkpoint mark", exc_info=True)
            return None
        logger.info(
            "SQLite WAL checkpoints every %d pages again; checkpointed %d of %d frames in %.1f s%s",
            now,
            done,
            frames,
            time.monotonic() - started,
            " (readers busy: the rest at the next checkpoint)" if busy else "",
        )
        return busy, frames, done
