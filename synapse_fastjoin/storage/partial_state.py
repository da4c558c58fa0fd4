"""Writes to Synapse's own partial-state tables, done the way Synapse does them.

The catch-up gives a run of events their full state at once
(`un_partial_state_events_txn`). The abort of a resync takes a room out of
partial state without the full state, so every partial-state event of the
room is marked as no longer partial (caches invalidated through Synapse's
cache stream, so workers follow), then the room's flag is cleared by
Synapse's own `clear_partial_state_room`. A rejoin marks them partial again.
"""

import logging
from typing import TYPE_CHECKING, Any

from synapse.api.errors import StoreError
from synapse.storage.database import (
    DatabasePool,
    LoggingTransaction,
    make_in_list_sql_clause,
)
from synapse.storage.engines import PostgresEngine
from synapse.util.iterutils import batch_iter

if TYPE_CHECKING:
    from synapse.events import EventBase
    from synapse.events.snapshot import EventContext
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

_BATCH = 500


async def drop_partial_state(hs: "HomeServer", room_id: str, _attempt: int = 1) -> bool:
    """Remove every partial-state record of `room_id` (`partial_state_events`,
    `partial_state_rooms_servers`, `partial_state_rooms`) and wake whatever
    waits for them.

    Returns:
        False if the room was not (or no longer) partial-state.
    """
    main = hs.get_datastores().main
    state = hs.get_storage_controllers().state
    notifier = hs.get_notifier()

    event_ids: list[str] = await main.db_pool.simple_select_onecol(
        table="partial_state_events",
        keyvalues={"room_id": room_id},
        retcol="event_id",
        desc="fastjoin_abort_partial_state_events",
    )
    for batch in batch_iter(event_ids, _BATCH):

        def txn_fn(txn: LoggingTransaction) -> None:
            for event_id in batch:
                main.db_pool.simple_delete_txn(
                    txn, table="partial_state_events", keyvalues={"event_id": event_id}
                )
                # Not through `un_partial_stated_event_stream`: an event appears
                # there once, when it gets its full state, which a rejoin may
                # still give it (see `mark_partial_again`).
                main._invalidate_cache_and_stream(
                    txn, main.is_partial_state_event, (event_id,)
                )

        await main.db_pool.runInteraction("fastjoin_abort_un_partial_events", txn_fn)
        for event_id in batch:
            state.notify_event_un_partial_stated(event_id)

    linearizer = hs.get_federation_handler()._is_partial_state_room_linearizer
    async with linearizer.queue(room_id):
        if not await main.is_partial_state_room(room_id):
            return False
        stream_id = await main.clear_partial_state_room(room_id)
    if stream_id is None and _attempt < 5:
        # An event was stored as partial-state meanwhile (the local users have
        # left, but remote events may still arrive): go again.
        logger.info("Abort of %s: a partial-state event arrived meanwhile, clearing again", room_id)
        return await drop_partial_state(hs, room_id, _attempt + 1)
    if stream_id is None:
        raise RuntimeError(f"could not clear the partial-state flag of {room_id}")
    state.notify_room_un_partial_stated(room_id)
    await notifier.on_un_partial_stated_room(room_id, stream_id)
    logger.info(
        "Partial state of %s dropped (%d partial-state events), without the full state",
        room_id,
        len(event_ids),
    )
    return True


async def mark_partial_again(hs: "HomeServer", room_id: str) -> int:
    """After an abort, the room's events were left with the partial state
    they had, marked as full. When the server joins the room again (in partial
    state), mark them partial again, so that the new resync fetches their
    full state (from the oldest, whose parents we never had) instead of
    building the new join's state on theirs. Call it once the room is
    partial-state again. Returns how many events were marked."""
    main = hs.get_datastores().main

    def txn_fn(txn: LoggingTransaction) -> list[str]:
        txn.execute(
            "SELECT e.event_id FROM events AS e"
            " INNER JOIN event_to_state_groups AS g USING (event_id)"
            " WHERE e.room_id = ? AND NOT e.outlier AND e.event_id NOT IN"
            " (SELECT event_id FROM partial_state_events WHERE room_id = ?)",
            (room_id, room_id),
        )
        event_ids = [row[0] for row in txn]
        main.db_pool.simple_insert_many_txn(
            txn,
            table="partial_state_events",
            keys=("room_id", "event_id"),
            values=[(room_id, event_id) for event_id in event_ids],
        )
        for event_id in event_ids:
            main._invalidate_cache_and_stream(txn, main.is_partial_state_event, (event_id,))
        return event_ids

    event_ids = await main.db_pool.runInteraction("fastjoin_mark_partial_again", txn_fn)
    if event_ids:
        logger.info(
            "%s was aborted while partial: %d of its events are partial-state again",
            room_id,
            len(event_ids),
        )
    return len(event_ids)


def sqlite_update_state_groups_sql(count: int) -> str:
    """SQLite: point `count` events' rows of `event_to_state_groups` at new
    groups; parameters (event_id, state_group) for each."""
    values = ", ".join("(?, ?)" for _ in range(count))
    return (
        "UPDATE event_to_state_groups SET state_group = v.column2"
        f" FROM (VALUES {values}) AS v WHERE event_to_state_groups.event_id = v.column1"
    )


def un_partial_state_events_txn(
    txn: LoggingTransaction,
    store: Any,
    items: list[tuple["EventBase", "EventContext", int]],
) -> None:
    """Give events their full state, as Synapse's
    `_update_state_for_partial_state_event_txn` does for each (event, context,
    un-partial-stated stream ID) of `items` in turn, with a few statements for
    all of them: each event's row of `event_to_state_groups` pointed at its
    new group (the group before it if it is now rejected), its rejection
    marked where it changed (Synapse's `mark_event_rejected_txn`), its row of
    `partial_state_events` deleted (every one must exist: Synapse's
    `simple_delete_one_txn` raises otherwise, and so does this, so that the
    transaction is rolled back), a row of `un_partial_stated_event_stream`
    added; the same caches invalidated and prefilled after the commit, and
    the replication listeners woken.

    This is three statements for up to 500 events instead of three for each:
    on PostgreSQL each statement is a round trip to the server (on a busy one,
    about 1 ms); on SQLite each gives up the GIL and waits to take it back
    (up to 5 ms while the reactor runs Python). `store` is Synapse's main data store.
    """
    if not items:
        return
    groups: list[tuple[str, int]] = []
    stream_rows: list[tuple[int, str, str, bool]] = []
    for event, context, stream_id in items:
        assert not event.internal_metadata.is_outlier()
        state_group = context.state_group_before_event if context.rejected else context.state_group
        assert state_group is not None
        rejection_status_changed = bool(context.rejected) != (event.rejected_reason is not None)
        if rejection_status_changed:
            store.mark_event_rejected_txn(txn, event.event_id, context.rejected)
        groups.append((event.event_id, state_group))
        stream_rows.append((stream_id, store._instance_name, event.event_id, rejection_status_changed))

    deleted = 0
    for part in batch_iter(groups, _BATCH):
        ids = [event_id for event_id, _ in part]
        if isinstance(txn.database_engine, PostgresEngine):
            txn.execute_values(
                "UPDATE event_to_state_groups AS t SET state_group = v.state_group"
                " FROM (VALUES ?) AS v (event_id, state_group) WHERE t.event_id = v.event_id",
                part,
                fetch=False,
            )
        else:
            # One statement for the batch (SQLite 3.33+; Synapse needs 3.37.2),
            # driven from the VALUES list through the event_id index: one
            # step where a statement a row took as many, each of which gave
            # up the GIL and waited to get it back.
            txn.execute(
                sqlite_update_state_groups_sql(len(part)),
                [value for row in part for value in row],
            )
        clause, args = make_in_list_sql_clause(txn.database_engine, "event_id", ids)
        txn.execute(f"DELETE FROM partial_state_events WHERE {clause}", args)
        deleted += txn.rowcount
    if deleted != len(groups):
        # What Synapse's `simple_delete_one_txn` says of the first missing row.
        raise StoreError(404, "No row found (partial_state_events)")
    DatabasePool.simple_insert_many_txn(
        txn,
        "un_partial_stated_event_stream",
        ("stream_id", "instance_name", "event_id", "rejection_status_changed"),
        stream_rows,
    )
    for event_id, state_group in groups:
        txn.call_after(store.is_partial_state_event.invalidate, (event_id,))
        txn.call_after(store._get_state_group_for_event.prefill, (event_id,), state_group)
    txn.call_after(store.hs.get_notifier().on_new_replication_data)
