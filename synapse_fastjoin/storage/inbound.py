"""Bounded staging of a room's inbound events (`resync.inbound_queue_limit`).

Synapse stages every inbound PDU in `federation_inbound_events_staging` (on
disk) and processes a room's queue one event at a time, oldest first. While a
room is partial-state the module keeps Synapse from pruning that queue (patch
0006); to keep it bounded all the same, the events past the bound are moved
out of it into `fastjoin_inbound_dropped`, by id only (their JSON is not kept:
they are fetched again from the federation later, see
handlers/inbound_queue.py).

Order is kept: the queue keeps its oldest events and drops its newest, and
while dropped events wait to be fetched again, events that arrive later are
dropped behind them (so that no event is processed before the dropped events
it follows, which would open a gap for Synapse to bridge with /state_ids).
The events are fetched again oldest first.

Only ids, origins and timestamps are read: never the events themselves.
"""

from typing import Any, Iterable

from synapse.storage.database import LoggingTransaction
from synapse.storage.engines import PostgresEngine

from synapse_fastjoin.storage.sql import select_rows_txn

PENDING = "pending"
RESTAGED = "restaged"
ARRIVED = "arrived"
FAILED = "failed"

# Rows (event_id, origin, received_ts) of the staging table.
StagedRow = tuple[str, str, int]


def count_staged_txn(txn: LoggingTransaction, room_id: str) -> int:
    txn.execute(
        "SELECT COUNT(*) FROM federation_inbound_events_staging WHERE room_id = ?",
        (room_id,),
    )
    row = txn.fetchone()
    return int(row[0]) if row else 0


def _head_txn(txn: LoggingTransaction, room_id: str) -> StagedRow | None:
    """The event Synapse processes next (its own query: the oldest staged
    event), which it already holds in memory when it asks the module."""
    txn.execute(
        "SELECT event_id, origin, received_ts FROM federation_inbound_events_staging"
        " WHERE room_id = ? ORDER BY received_ts ASC LIMIT 1",
        (room_id,),
    )
    row = txn.fetchone()
    return (row[0], row[1], row[2]) if row else None


def _drop_txn(
    txn: LoggingTransaction, room_id: str, rows: Iterable[StagedRow], now_ms: int
) -> int:
    """Record `rows` as dropped (pending) and delete them from the staging
    table. An event dropped before (and staged again since) is pending again."""
    rows = list(rows)
    dropped: dict[str, StagedRow] = {}
    for event_id, origin, received_ts in rows:
        # The same event may be staged from two origins: one row of ours.
        if event_id not in dropped:
            dropped[event_id] = (event_id, origin, received_ts)
    # An upsert: two transactions may drop the same event at once (one as it
    # arrives, one before the next event is processed); the one known before
    # keeps its first place in the order (its first received_ts).
    txn.execute_batch(
        "INSERT INTO fastjoin_inbound_dropped (room_id, event_id, origin, received_ts,"
        " dropped_ts, state, attempts, next_attempt_ts) VALUES (?, ?, ?, ?, ?, ?, 0, 0)"
        " ON CONFLICT (room_id, event_id) DO UPDATE SET state = excluded.state,"
        " dropped_ts = excluded.dropped_ts, done_ts = NULL",
        [
            (room_id, event_id, origin, received_ts, now_ms, PENDING)
            for event_id, origin, received_ts in dropped.values()
        ],
    )
    # By (origin, event_id): the staging table's unique index (its room index
    # is on received_ts, and would make each delete scan the room's queue).
    txn.execute_batch(
        "DELETE FROM federation_inbound_events_staging WHERE origin = ? AND event_id = ?",
        [(origin, event_id) for event_id, origin, _ in rows],
    )
    return len(dropped)


def bound_queue_txn(
    txn: LoggingTransaction, room_id: str, limit: int, now_ms: int, quick: bool = False
) -> tuple[int, int, int]:
    """Keep the room's staged queue within `limit` events (0: no bound) and in
    order behind the events dropped before.

    Never drops the oldest staged event (the one Synapse is about to process).

    Args:
        quick: return at once (0, queued, 0) when the queue is within the
            bound and no dropped event waits (two index lookups: the check
            made as each event arrives).

    Returns:
        (events dropped now, events left in the queue, dropped events still
        waiting to be fetched again)
    """
    if quick:
        staged = count_staged_txn(txn, room_id)
        if not limit or staged <= limit:
            txn.execute(
                "SELECT 1 FROM fastjoin_inbound_dropped WHERE room_id = ? AND state = ? LIMIT 1",
                (room_id, PENDING),
            )
            if txn.fetchone() is None:
                return 0, staged, 0
    head = _head_txn(txn, room_id)
    if head is None:
        return 0, 0, _count_state_txn(txn, room_id, PENDING)
    # Keyed by (event_id, origin): an event staged from two origins has two rows.
    to_drop: dict[tuple[str, str], StagedRow] = {}

    # Events that arrived after the oldest event still waiting to be fetched
    # again go behind it. Those fetched again are queued with a later
    # received_ts and stay (as does a dropped event a server sent again): any
    # staged event the table knows.
    txn.execute(
        "SELECT MIN(received_ts) FROM fastjoin_inbound_dropped WHERE room_id = ? AND state = ?",
        (room_id, PENDING),
    )
    row = txn.fetchone()
    oldest_pending = row[0] if row else None
    if oldest_pending is not None:
        txn.execute(
            "SELECT s.event_id, s.origin, s.received_ts FROM federation_inbound_events_staging s"
            " WHERE s.room_id = ? AND s.received_ts > ? AND NOT EXISTS ("
            "  SELECT 1 FROM fastjoin_inbound_dropped d WHERE d.room_id = s.room_id"
            "  AND d.event_id = s.event_id)",
            (room_id, oldest_pending),
        )
        for event_id, origin, received_ts in txn.fetchall():
            if event_id != head[0]:
                to_drop[(event_id, origin)] = (event_id, origin, received_ts)

    staged = count_staged_txn(txn, room_id) - len(to_drop)
    if limit and staged > limit:
        # The newest, beyond the bound (skipping those already chosen).
        excess = staged - limit
        txn.execute(
            "SELECT event_id, origin, received_ts FROM federation_inbound_events_staging"
            " WHERE room_id = ? ORDER BY received_ts DESC, event_id DESC LIMIT ?",
            (room_id, excess + len(to_drop) + 1),
        )
        for event_id, origin, received_ts in txn.fetchall():
            if excess <= 0:
                break
            if event_id == head[0] or (event_id, origin) in to_drop:
                continue
            to_drop[(event_id, origin)] = (event_id, origin, received_ts)
            excess -= 1

    dropped = _drop_txn(txn, room_id, to_drop.values(), now_ms) if to_drop else 0
    return dropped, count_staged_txn(txn, room_id), _count_state_txn(txn, room_id, PENDING)


def _count_state_txn(txn: LoggingTransaction, room_id: str, state: str) -> int:
    txn.execute(
        "SELECT COUNT(*) FROM fastjoin_inbound_dropped WHERE room_id = ? AND state = ?",
        (room_id, state),
    )
    row = txn.fetchone()
    return int(row[0]) if row else 0


def get_pending_txn(
    txn: LoggingTransaction, room_id: str, limit: int, now_ms: int
) -> list[tuple[str, str, int]]:
    """Up to `limit` dropped events of the room due to be fetched again, oldest
    first: (event_id, origin, attempts)."""
    txn.execute(
        "SELECT event_id, origin, attempts FROM fastjoin_inbound_dropped"
        " WHERE room_id = ? AND state = ? AND next_attempt_ts <= ?"
        " ORDER BY received_ts ASC, event_id ASC LIMIT ?",
        (room_id, PENDING, now_ms, limit),
    )
    return [(r[0], r[1], r[2]) for r in txn.fetchall()]


def begin_attempts_txn(
    txn: LoggingTransaction, room_id: str, attempts: Iterable[tuple[str, int]]
) -> None:
    """One more attempt at each (event_id, next_attempt_ts): counted before
    the fetch, so that an event Synapse never stores (whatever the reason) is
    not fetched for ever."""
    for event_id, next_attempt_ts in attempts:
        txn.execute(
            "UPDATE fastjoin_inbound_dropped SET attempts = attempts + 1, next_attempt_ts = ?"
            " WHERE room_id = ? AND event_id = ? AND state = ?",
            (next_attempt_ts, room_id, event_id, PENDING),
        )


def mark_restaged_txn(
    txn: LoggingTransaction, room_id: str, event_ids: Iterable[str], now_ms: int
) -> tuple[int, int]:
    """Fetched again and queued: RESTAGED if it is still queued, ARRIVED if
    Synapse has processed it already; otherwise (dropped again meanwhile) it
    stays pending.

    Returns:
        (marked RESTAGED, marked ARRIVED)
    """
    restaged = arrived = 0
    for event_id in event_ids:
        txn.execute(
            "UPDATE fastjoin_inbound_dropped SET state = ?, done_ts = ?, last_error = NULL"
            " WHERE room_id = ? AND event_id = ? AND state = ? AND EXISTS ("
            "  SELECT 1 FROM federation_inbound_events_staging s"
            "  WHERE s.room_id = ? AND s.event_id = ?)",
            (RESTAGED, now_ms, room_id, event_id, PENDING, room_id, event_id),
        )
        if txn.rowcount:
            restaged += 1
            continue
        txn.execute(
            "UPDATE fastjoin_inbound_dropped SET state = ?, done_ts = ?, last_error = NULL"
            " WHERE room_id = ? AND event_id = ? AND state = ? AND EXISTS ("
            "  SELECT 1 FROM events e WHERE e.event_id = ? AND NOT e.outlier)",
            (ARRIVED, now_ms, room_id, event_id, PENDING, event_id),
        )
        arrived += txn.rowcount
    return restaged, arrived


def mark_arrived_txn(
    txn: LoggingTransaction, room_id: str, event_ids: Iterable[str], now_ms: int
) -> None:
    """Stored meanwhile (Synapse fetched it with get_missing_events or
    backfill, or processed it once fetched again)."""
    for event_id in event_ids:
        txn.execute(
            "UPDATE fastjoin_inbound_dropped SET state = ?, done_ts = ?, last_error = NULL"
            " WHERE room_id = ? AND event_id = ? AND state = ?",
            (ARRIVED, now_ms, room_id, event_id, PENDING),
        )


def mark_failed_txn(
    txn: LoggingTransaction,
    room_id: str,
    event_id: str,
    error: str,
    give_up: bool,
    now_ms: int,
) -> None:
    """A failed attempt; with `give_up` the event is FAILED for good (the
    admin API and the log say so)."""
    if give_up:
        txn.execute(
            "UPDATE fastjoin_inbound_dropped SET state = ?, done_ts = ?, last_error = ?"
            " WHERE room_id = ? AND event_id = ? AND state = ?",
            (FAILED, now_ms, error[:500], room_id, event_id, PENDING),
        )
    else:
        txn.execute(
            "UPDATE fastjoin_inbound_dropped SET last_error = ? WHERE room_id = ? AND event_id = ?",
            (error[:500], room_id, event_id),
        )


def rooms_with_pending_txn(txn: LoggingTransaction) -> list[str]:
    txn.execute(
        "SELECT DISTINCT room_id FROM fastjoin_inbound_dropped WHERE state = ?", (PENDING,)
    )
    return [r[0] for r in txn.fetchall()]


def queue_stats_txn(txn: LoggingTransaction, room_id: str) -> dict[str, int]:
    """The room's queue as the admin API shows it: `queued` (staged now),
    `dropped` (ever dropped past the bound), `refetched` (fetched again and
    queued, or stored meanwhile by Synapse), `pending`, `failed`."""
    txn.execute(
        "SELECT state, COUNT(*) FROM fastjoin_inbound_dropped WHERE room_id = ? GROUP BY state",
        (room_id,),
    )
    by_state = {r[0]: int(r[1]) for r in txn.fetchall()}
    return {
        "queued": count_staged_txn(txn, room_id),
        "dropped": sum(by_state.values()),
        "refetched": by_state.get(RESTAGED, 0) + by_state.get(ARRIVED, 0),
        "pending": by_state.get(PENDING, 0),
        "failed": by_state.get(FAILED, 0),
    }


def prune_done_txn(txn: LoggingTransaction, before_ts: int) -> int:
    """Forget dropped events fetched again (or given up on) before `before_ts`."""
    txn.execute(
        "DELETE FROM fastjoin_inbound_dropped WHERE state <> ? AND done_ts < ?",
        (PENDING, before_ts),
    )
    return txn.rowcount


# Rows (origin, event_id, event_json, internal_metadata) of the staging table.
StagedEventRow = tuple[str, str, Any, Any]


def next_staged_events_txn(txn: LoggingTransaction, room_id: str, limit: int) -> list[StagedEventRow]:
    """The room's next `limit` staged events, in the order Synapse processes
    them (`get_next_staged_event_for_room`: oldest received first), with
    their JSON: the candidates of a run (handlers/staged_runs.py)."""
    rows = select_rows_txn(
        txn,
        ("origin", "event_id", "event_json", "internal_metadata"),
        "FROM federation_inbound_events_staging WHERE room_id = ? ORDER BY received_ts ASC LIMIT ?",
        (room_id, limit),
    )
    return [(row[0], row[1], row[2], row[3]) for row in rows]


# Staged events deleted with one statement.
_DELETE_BATCH = 100


def remove_staged_events_sql(count: int, postgres: bool) -> str:
    """The statement that deletes `count` staged events by (origin,
    event_id), two parameters each, returning their received_ts."""
    values = ", ".join("(?, ?)" for _ in range(count))
    if postgres:
        return (
            "DELETE FROM federation_inbound_events_staging AS s"
            f" USING (VALUES {values}) AS d (origin, event_id)"
            " WHERE s.origin = d.origin AND s.event_id = d.event_id"
            " RETURNING s.received_ts"
        )
    # (On SQLite a row-value `IN (VALUES ...)` scans the table; this join
    # finds each row by the unique (origin, event_id) index.)
    return (
        "DELETE FROM federation_inbound_events_staging WHERE rowid IN ("
        f" SELECT s.rowid FROM (VALUES {values}) AS d"
        " CROSS JOIN federation_inbound_events_staging AS s"
        " ON s.origin = d.column1 AND s.event_id = d.column2"
        ") RETURNING received_ts"
    )


def remove_staged_events_txn(txn: LoggingTransaction, rows: Iterable[tuple[str, str]]) -> list[int]:
    """Delete the staged events (origin, event_id), as Synapse's
    `remove_received_event_from_staging` does one at a time; the
    received_ts of each row deleted (in no particular order).

    A hundred rows a statement: with a statement a row, a run's deletes took
    about 2 ms each on a PostgreSQL busy with a resync, a fifth of the run's
    time, and on SQLite some 0.3 ms each of its one connection."""
    received: list[int] = []
    pairs = list(rows)
    postgres = isinstance(txn.database_engine, PostgresEngine)
    for start in range(0, len(pairs), _DELETE_BATCH):
        part = pairs[start : start + _DELETE_BATCH]
        txn.execute(remove_staged_events_sql(len(part), postgres), [value for pair in part for value in pair])
        received.extend(int(row[0]) for row in txn)
    return received


# Rows (origin, room_id, event_id, received_ts, event_json, internal_metadata)
# to stage, as Synapse's `insert_received_event_to_staging` writes them.
NewStagedRow = tuple[str, str, str, int, str, str]


def stage_received_events_txn(txn: LoggingTransaction, rows: list[NewStagedRow]) -> None:
    """Stage inbound events, as Synapse's `insert_received_event_to_staging`
    does one at a time (an upsert on (origin, event_id) that leaves a row
    already there as it is), in one transaction (federation/staging.py)."""
    txn.execute_batch(
        "INSERT INTO federation_inbound_events_staging"
        " (origin, room_id, event_id, received_ts, event_json, internal_metadata)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (origin, event_id) DO NOTHING",
        rows,
    )
