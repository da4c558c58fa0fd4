"""Reads of Synapse's event tables that the resync engine needs in bulk."""

from typing import Any, Collection

from synapse.events import EventBase
from synapse.storage.database import LoggingTransaction

from synapse_fastjoin.storage.sql import in_list_batches


def stored_event_ids_txn(txn: LoggingTransaction, event_ids: Collection[str]) -> list[str]:
    """Which of `event_ids` are in the events table (one query per 1,000)."""
    found: list[str] = []
    for batch, placeholders in in_list_batches(event_ids, 1000):
        txn.execute(f"SELECT event_id FROM events WHERE event_id IN ({placeholders})", batch)
        found.extend(row[0] for row in txn)
    return found


def partial_state_events_in_order_txn(
    txn: LoggingTransaction, room_id: str, limit: int
) -> list[str]:
    """A room's partial-state events, parents before children (by depth,
    then stream order), at most `limit` of them."""
    txn.execute(
        """
        SELECT p.event_id FROM partial_state_events AS p
        INNER JOIN events AS e USING (event_id)
        WHERE p.room_id = ?
        ORDER BY e.topological_ordering, e.stream_ordering
        LIMIT ?
        """,
        (room_id, limit),
    )
    return [row[0] for row in txn]


def record_run_extremities_txn(
    txn: LoggingTransaction, room_id: str, rows: list[tuple[str, int]]
) -> None:
    """The `stream_ordering_to_exterm` rows of a run of events persisted
    together (handlers/staged_runs.py) as Synapse writes them for the same
    events persisted one at a time: each (event, its own stream ordering),
    since after each the room's one forward extremity was that event. Synapse's
    batch wrote only the run's last accepted event, at the batch's highest
    stream ordering."""
    for batch, placeholders in in_list_batches([event_id for event_id, _ in rows], 1000):
        txn.execute(
            f"DELETE FROM stream_ordering_to_exterm WHERE room_id = ? AND event_id IN ({placeholders})",
            [room_id, *batch],
        )
    txn.execute_batch(
        "INSERT INTO stream_ordering_to_exterm (room_id, event_id, stream_ordering) VALUES (?, ?, ?)",
        [(room_id, event_id, stream_ordering) for event_id, stream_ordering in rows],
    )


async def get_events_without_waiting(store: Any, event_ids: Collection[str]) -> dict[str, EventBase]:
    """`store.get_events(event_ids, allow_rejected=True)`, not waiting for
    other callers' reads of the same events.

    Synapse shares event reads in flight: an event that another caller is
    reading from the database is awaited from that read
    (`EventsWorkerStore._current_event_fetches`), which gives nothing back
    until every event it asked for is built. A client's `/members` of a big
    room right after its resync asks for the whole membership at once:
    at 50,000 members its one read built events for 8 to 10 s of the reactor,
    and a run of live events whose senders' memberships were among them
    waited for all of it. Events missing from the memory caches that another
    read has in flight are read again here, with Synapse's own
    `_get_events_from_db` (the same rows, redaction checks and cache entries
    as the shared read); the answer is then `get_events`'s, from the cache.
    """
    in_flight = getattr(store, "_current_event_fetches", None)
    read_here: Any = None
    if in_flight:
        waiting = [event_id for event_id in event_ids if event_id in in_flight]
        if waiting:
            cached = await store._get_events_from_local_cache(waiting, update_metrics=False)
            others = [event_id for event_id in waiting if event_id not in cached]
            if others:
                # (Held until `get_events` has found them in the cache.)
                read_here = await store._get_events_from_db(others)
    events = await store.get_events(event_ids, allow_rejected=True)
    del read_here
    return events
