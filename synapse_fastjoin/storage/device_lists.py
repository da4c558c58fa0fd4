"""What Synapse's device-list tables say a server already has (patch 0013's
replay, synapse_fastjoin/federation/device_lists.py).

Every statement here is answered from an index whatever the size of the
tables, on SQLite and PostgreSQL (tests/unit/test_device_list_queries.py shows
the plans): `device_lists_stream` by (user_id, device_id),
`device_lists_outbound_pokes` by (destination, user_id) and
`device_lists_outbound_last_success` by (destination, user_id), the
destinations being the few servers the replay would send to.
"""

from typing import Collection

from synapse.storage.database import LoggingTransaction

from synapse_fastjoin.storage.sql import in_list_batches


def hosts_with_device_change_txn(
    txn: LoggingTransaction,
    user_id: str,
    device_id: str,
    since_stream_id: int,
    hosts: Collection[str],
) -> set[str]:
    """Those of `hosts` that already have the device's latest change made
    since `since_stream_id` (or are sent it): Synapse's record of what each
    server acknowledged (`device_lists_outbound_last_success`, the newest
    update of the user a server acknowledged) is at or past the change, or an
    update of the device at or past the change is queued for it
    (`device_lists_outbound_pokes`)."""
    txn.execute(
        "SELECT MAX(stream_id) FROM device_lists_stream WHERE user_id = ? AND device_id = ?",
        (user_id, device_id),
    )
    row = txn.fetchone()
    if row is None or row[0] is None:
        return set()
    change = max(row[0], since_stream_id)
    already: set[str] = set()
    for batch, in_list in in_list_batches(sorted(hosts)):
        # Queued: by (destination, user_id), for these destinations only (a
        # range on stream_id would read every server's pokes since the change,
        # and SQLite scanned the whole table for the DISTINCT).
        txn.execute(
            "SELECT destination FROM device_lists_outbound_pokes"
            f" WHERE destination IN ({in_list}) AND user_id = ?"
            " AND device_id = ? AND stream_id >= ?",
            (*batch, user_id, device_id, change),
        )
        already.update(r[0] for r in txn)
        # Sent and acknowledged.
        txn.execute(
            "SELECT destination FROM device_lists_outbound_last_success"
            f" WHERE destination IN ({in_list}) AND user_id = ? AND stream_id >= ?",
            (*batch, user_id, change),
        )
        already.update(r[0] for r in txn)
    return already


def joined_among_txn(txn: LoggingTransaction, room_id: str, user_ids: Collection[str]) -> set[str]:
    """Those of `user_ids` joined in the room's current state (by the primary
    key of `current_state_events`: a lookup per user, whatever the room's
    size)."""
    joined: set[str] = set()
    for batch, in_list in in_list_batches(sorted(user_ids)):
        txn.execute(
            "SELECT state_key FROM current_state_events"
            " WHERE room_id = ? AND type = 'm.room.member' AND membership = 'join'"
            f" AND state_key IN ({in_list})",
            (room_id, *batch),
        )
        joined.update(r[0] for r in txn)
    return joined
