"""What the fetch policy knows of a room's servers: the module's own record
(`fastjoin_room_servers`) and Synapse's backoff (`destinations`)."""

from typing import Collection, Mapping

from synapse.storage.database import LoggingTransaction

from synapse_fastjoin.storage.sql import in_list_batches

# (good_count, fail_count, last_good_ts, last_fail_ts)
ServerRecord = tuple[int, int, int | None, int | None]
# ... plus last_error, as written
ServerUpdate = tuple[int, int, int | None, int | None, str | None]


def get_room_servers_txn(txn: LoggingTransaction, room_id: str) -> dict[str, ServerRecord]:
    txn.execute(
        "SELECT server_name, good_count, fail_count, last_good_ts, last_fail_ts"
        " FROM fastjoin_room_servers WHERE room_id = ?",
        (room_id,),
    )
    return {row[0]: (row[1], row[2], row[3], row[4]) for row in txn.fetchall()}


def save_room_servers_txn(
    txn: LoggingTransaction, room_id: str, updates: Mapping[str, ServerUpdate]
) -> None:
    """Replace the rows of these servers (the counts are the run's totals,
    which started from what was stored)."""
    for server, (good, fail, last_good_ts, last_fail_ts, last_error) in updates.items():
        txn.execute(
            "DELETE FROM fastjoin_room_servers WHERE room_id = ? AND server_name = ?",
            (room_id, server),
        )
        txn.execute(
            "INSERT INTO fastjoin_room_servers (room_id, server_name, good_count,"
            " fail_count, last_good_ts, last_fail_ts, last_error)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (room_id, server, good, fail, last_good_ts, last_fail_ts, last_error),
        )


def delete_room_servers_txn(txn: LoggingTransaction, room_id: str) -> None:
    txn.execute("DELETE FROM fastjoin_room_servers WHERE room_id = ?", (room_id,))


def get_servers_in_backoff_txn(txn: LoggingTransaction, servers: Collection[str]) -> list[str]:
    """Which of `servers` Synapse has failed to reach since it last reached
    them (a non-zero `retry_interval` in its `destinations` table; Synapse
    resets it on the first success), whether or not its backoff has run out."""
    out: list[str] = []
    for batch, placeholders in in_list_batches(servers):
        txn.execute(
            "SELECT destination FROM destinations"
            f" WHERE destination IN ({placeholders})"
            " AND retry_interval > 0",
            batch,
        )
        out.extend(row[0] for row in txn.fetchall())
    return out
