# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""The resync's share of a single database connection (SQLite).

On SQLite, Synapse runs every transaction of the process on one connection,
one after another, in the order they were asked for (`DatabasePool` with a
thread pool of one; `engine.single_threaded`). The resync's writes are large:
a batch of `persist_batch_size` outliers holds the connection for 100–300 ms.
Everything else the server does in the meantime takes many small transactions
one after another: staging one PDU of a `/send` costs three (its origin's
keys, the staging row, the room's processing lock), processing one live event
about twenty. Each of them waits for the resync's write in progress, and the
resync queues its next write as soon as one ends, so the rest of the server
gets one small transaction per resync write. Measured at 50,000 members with
50 live events/s: a `/send` of 50 PDUs took 5–16 s to stage, 38 of 1,583 live
events were stored before the resync ended, and their median lag was 71 s.

`ConnectionShare` can give the connection back after each write: when other
transactions ran or waited while a write held the connection, the resync
waits while they go on, until no transaction has started for `_IDLE_S`, and at
most `ratio` times as long as its own write held it
(`resync.sqlite_yield_ratio`, 0 by default: never). With 1.0, while the rest
of the server has work it gets at least half of the connection; when it has
none, the resync goes on at once. It is off by default because it trades the
resync's time for the live events' (docs/benchmarks.md, "The resync's share
of SQLite's connection"): at 50,000 members and 50 live events/s, the live
events' median lag fell from 70 to 9 s and the resync took 1.6 times as
long; the last live events were stored no sooner. Other transactions are counted from Synapse's
transaction counter (`DatabasePool._TXN_ID`, one per transaction started)
less the resync's own: those its logging context counts (the context the
resync runs in, whose children add theirs to it), its reads for the next
batches included, so that the resync never waits for itself. (Synapse counts
a transaction when it starts, the context when it ends: the one transaction
of the resync that may be running makes the difference one too high for a
while: the others count as busy only while the difference rises above its
highest value so far, so such a count costs the resync one `_IDLE_S` wait.)

A run of staged live events (handlers/staged_runs.py) is such a chain, but
its transactions are apart by its work on the reactor (the checks of a
hundred events, the push rules): more than `_IDLE_S`, so the counter alone
ends the pause at the run's first gap and the run's next transaction queues
behind the next write again. The engine passes `busy`, true while such runs
are in flight (`FinishGate.runs_in_flight`); while it is, the pause goes on
through the gaps, to the same bound, and a write gives the connection back
even if no transaction started during it.
With a connection pool (PostgreSQL), transactions do not queue behind
each other and nothing is changed.
"""

from typing import TYPE_CHECKING, Any, Awaitable, Callable

from synapse.logging.context import current_context
from synapse.util.duration import Duration

if TYPE_CHECKING:
    from synapse.server import HomeServer
    from synapse.storage.database import DatabasePool

# How often to look at the connection while it is given back.
_POLL_S = 0.002
# The others are done once none of them has started a transaction for this
# long: the next of a chain usually follows the last within a few ms.
_IDLE_S = 0.010
# A write that held the connection longer gives it back for this long at most.
_MAX_PAUSE_S = 1.0


def _thread_pool(db_pool: "DatabasePool") -> Any:
    """The thread pool running the transactions of a single-connection
    database, or None (a pool of connections, or an unknown layout)."""
    if not db_pool.engine.single_threaded:
        return None
    pool = getattr(getattr(db_pool, "_db_pool", None), "threadpool", None)
    if pool is None or not hasattr(pool, "q"):
        return None
    return pool


class ConnectionShare:
    def __init__(self, hs: "HomeServer", ratio: float, busy: Callable[[], bool] | None = None) -> None:
        """Made in the logging context the resync runs in.

        Args:
            busy: whether work of the rest of the server that comes in
                chains of transactions is under way (runs of staged live
                events: resync/finish_gate.py). While it is, the connection
                stays given back between the chain's transactions too, up to
                the same bound.
        """
        self._clock = hs.get_clock()
        self._ratio = ratio
        self._busy = busy if busy is not None else (lambda: False)
        self._db = hs.get_datastores().main.db_pool
        self._pool = _thread_pool(self._db) if ratio > 0 else None
        # The outermost context of the resync: every transaction it (or a
        # context nested in it) runs is counted there.
        context: Any = current_context()
        while context and context.parent_context:
            context = context.parent_context
        self._context = context if context else None
        if self._context is None:
            self._pool = None  # (its own transactions could not be told apart)
        self.pauses = 0
        self.paused_seconds = 0.0

    @property
    def enabled(self) -> bool:
        return self._pool is not None

    def _others_started(self) -> int:
        """Transactions the rest of the server started so far, give or take
        a constant: all of them (Synapse's counter) less the resync's."""
        own = self._context.get_resource_usage().db_txn_count if self._context else 0
        return getattr(self._db, "_TXN_ID", 0) - own

    def others_waiting(self) -> bool:
        """Whether a transaction waits for the connection (after a write of
        the resync: most likely another's)."""
        pool = self._pool
        return pool is not None and pool.q.qsize() > 0

    async def run_write(self, write: Callable[[], Awaitable[Any]]) -> float:
        """Runs one of the resync's writes, then gives the connection back
        while others need it (see above). Returns the time given back."""
        if self._pool is None:
            await write()
            return 0.0
        first = self._others_started()
        started = self._clock.time()
        await write()
        held = self._clock.time() - started
        if self._others_started() == first and not self.others_waiting() and not self._busy():
            return 0.0
        return await self._give_back(held)

    async def _give_back(self, held_seconds: float) -> float:
        budget = min(held_seconds * self._ratio, _MAX_PAUSE_S)
        started = self._clock.time()
        highest = self._others_started()
        quiet_since = started
        while True:
            now = self._clock.time()
            if now - started >= budget:
                break
            seen = self._others_started()
            if seen > highest:
                highest = seen
                quiet_since = now
            elif now - quiet_since >= _IDLE_S and not self._busy():
                break
            await self._clock.sleep(Duration(seconds=_POLL_S))
        waited = self._clock.time() - started
        self.pauses += 1
        self.paused_seconds += waited
        return waited
