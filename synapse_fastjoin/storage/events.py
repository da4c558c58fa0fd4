"""Reads of Synapse's event tables that the resync engine needs in bulk."""

from typing import Collection

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
