"""Writes to Synapse's own partial-state tables, done the way Synapse does them.

Only the abort of a resync needs this: it takes a room out of partial state
without the full state, so every partial-state event of the room is marked as
no longer partial (caches invalidated through Synapse's cache stream, so
workers follow), then the room's flag is cleared by Synapse's own
`clear_partial_state_room`. A rejoin marks them partial again.
"""

import logging
from typing import TYPE_CHECKING

from synapse.storage.database import LoggingTransaction
from synapse.util.iterutils import batch_iter

if TYPE_CHECKING:
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
