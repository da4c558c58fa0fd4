# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""A room's current state brought up to its full state at the end of a
resync, in chunks of members.

`update_current_state` does what Synapse's
`StateHandler.update_current_state(room_id)` does (1.163.2:
`EventsPersistenceStorageController._update_current_state`, then
`PersistEventsStore._update_current_state_txn`) and writes the same rows:
`current_state_delta_stream`, `current_state_events`,
`local_current_membership`, `sliding_sync_joined_rooms`,
`sliding_sync_membership_snapshots`, the profile-updates stream when it is
enabled, the cache-invalidation stream (PostgreSQL) and, for remote users no
longer sharing a room, `device_lists_remote_extremeties`. The current state,
the delta and the sliding-sync changes are computed by Synapse's own code.

What differs is how it is written. Synapse writes the whole delta (50,000
rows for a 50,000-member room) in one transaction, three statements a row.
Here the delta is written a chunk of keys at a time (`chunk_size`), each
chunk its own transaction, with set-based statements (one `INSERT ...
SELECT` or `DELETE` per table per chunk, from a `VALUES` list). Every row
carries the one stream id Synapse would give the whole update, allocated
before the first chunk and released after the last: readers of the delta
stream see all of it at once, as after Synapse's one transaction. The caches
Synapse invalidates after its transaction are invalidated after each chunk,
for that chunk's members (and the room-wide ones every time).

In between two chunks the room's `current_state_events` holds the partial
state plus the chunks written so far (the room is still partial-state then;
clients that need its members wait until the resync ends). If the process
stops half-way, the room stays partial-state and the resumed resync computes
the delta again from what was written: the rest is written then.

The room's slot in Synapse's event persistence queue is held throughout, as
Synapse's own update holds it: events of the room are persisted before or
after it, never in between. Anything this does not do exactly as Synapse
would (another process persists the room's events, a state-DAG room, a
delta that removes the server from the room) goes to Synapse's own path.
"""

import itertools
import logging
from typing import TYPE_CHECKING, Any

from synapse.api.constants import EventTypes, Membership
from synapse.storage.controllers.persist_events import DeltaState
from synapse.storage.database import LoggingTransaction
from synapse.storage.engines import PostgresEngine
from synapse.storage.databases.main.events import PersistEventsStore, SlidingSyncTableChanges
from synapse.types import UserID
from synapse.util.iterutils import batch_iter

from synapse_fastjoin.storage.room_turns import room_turn

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

StateKey = tuple[str, str]

# Synapse sends current-state invalidations to replication 50 members a row:
# a chunk of a multiple of 50 members keeps the number of rows the same.
_REPLICATION_BATCH = 50

# Rows per statement inside a chunk (bound parameters: SQLite allows 32,766).
_ROWS_PER_STATEMENT = 500


def fallback_reason(hs: "HomeServer", room_id: str) -> str | None:
    """Why the room's current state must be updated by Synapse's own code."""
    if hs.config.worker.events_shard_config.get_instance(room_id) != hs.get_instance_name():
        return "another process persists this room's events"
    if hs.get_datastores().persist_events is None:
        return "this process does not persist events"
    return None


async def update_current_state(hs: "HomeServer", room_id: str, chunk_size: int = 5000) -> int:
    """Recalculate the room's current state and persist it, as Synapse's
    `StateHandler.update_current_state` does, a chunk of keys at a time.
    Returns how many chunks were written (0: nothing changed or Synapse's
    path did it)."""
    reason = fallback_reason(hs, room_id)
    if reason is None:
        room_version = await hs.get_datastores().main.get_room_version(room_id)
        if room_version.msc4242_state_dags:
            reason = "state-DAG room version"
    if reason is not None:
        logger.info("Current state of %s goes through Synapse's path: %s", room_id, reason)
        await hs.get_state_handler().update_current_state(room_id)
        return 0
    chunk_size = max(_REPLICATION_BATCH, chunk_size - chunk_size % _REPLICATION_BATCH)
    controller = hs.get_storage_controllers().persistence
    persist_store = hs.get_datastores().persist_events
    assert controller is not None and persist_store is not None
    async with room_turn(hs, room_id, "exclusive"):
        # Synapse's `_update_current_state`, up to the write.
        state = await controller._calculate_current_state(room_id)
        delta = await controller._calculate_state_delta(room_id, state)
        del state
        changes = await persist_store._calculate_sliding_sync_table_changes(room_id, [], delta)
        if delta.is_noop():
            return 0
        if delta.no_longer_in_room:  # never set by `_calculate_state_delta`
            await persist_store.update_current_state(room_id, delta, changes)
            return 0
        chunks = _chunks(delta, chunk_size)
        async with persist_store._stream_id_gen.get_next() as stream_id:
            for i, keys in enumerate(chunks):
                await persist_store.db_pool.runInteraction(
                    "fastjoin_update_current_state",
                    update_current_state_chunk_txn,
                    persist_store,
                    room_id,
                    delta,
                    keys,
                    stream_id,
                    changes,
                    i == len(chunks) - 1,
                )
    logger.info(
        "Current state of %s: %d keys changed, %d removed, in %d chunks",
        room_id,
        len(delta.to_insert),
        len(delta.to_delete),
        len(chunks),
    )
    return len(chunks)


def _chunks(delta: DeltaState, chunk_size: int) -> list[list[StateKey]]:
    """The delta's keys, `chunk_size` members a chunk (the order Synapse
    would write them in), the other keys with the last chunk: every chunk
    changes members (Synapse's replication rows then stay the same) unless
    no member changes at all."""
    members: list[StateKey] = []
    others: list[StateKey] = []
    for key in itertools.chain(delta.to_delete, delta.to_insert):
        (members if key[0] == EventTypes.Member else others).append(key)
    chunks = [members[i : i + chunk_size] for i in range(0, len(members), chunk_size)] or [[]]
    chunks[-1].extend(others)
    return chunks


def update_current_state_chunk_txn(
    txn: LoggingTransaction,
    persist_store: PersistEventsStore,
    room_id: str,
    delta: DeltaState,
    keys: list[StateKey],
    stream_id: int,
    changes: SlidingSyncTableChanges,
    last: bool,
) -> None:
    """Synapse's `_update_current_state_txn` (the server still in the room)
    for the delta's `keys`; the room-wide row of `sliding_sync_joined_rooms`
    with the `last` chunk."""
    store = persist_store.store
    is_mine = persist_store.is_mine_id
    instance = persist_store._instance_name
    to_insert = delta.to_insert
    assert room_id == changes.room_id
    members = {state_key for etype, state_key in keys if etype == EventTypes.Member}

    # current_state_delta_stream, before current_state_events changes (its
    # prev_event_id is read from there).
    for part in batch_iter(keys, _ROWS_PER_STATEMENT):
        values = ", ".join("(?, ?, ?)" for _ in part)
        args: list[Any] = [stream_id, instance, room_id]
        for etype, state_key in part:
            args.extend((etype, state_key, to_insert.get((etype, state_key))))
        args.append(room_id)
        txn.execute(
            f"""
            INSERT INTO current_state_delta_stream
                (stream_id, instance_name, room_id, type, state_key, event_id, prev_event_id)
            SELECT ?, ?, ?, d.column1, d.column2, d.column3, c.event_id
            FROM (VALUES {values}) AS d
            LEFT JOIN current_state_events AS c
                ON c.room_id = ? AND c.type = d.column1 AND c.state_key = d.column2
            """,
            args,
        )

    # current_state_events: the chunk's keys deleted, its new events inserted
    # with their membership and stream ordering.
    if isinstance(txn.database_engine, PostgresEngine):
        # One statement for many keys: the module's statement triggers on
        # current_state_events (storage/member_counts.py) run once per
        # statement, deleting a row or not; one DELETE a key ran them 100
        # times a chunk (about 1 ms a key at 50,000 members).
        for part in batch_iter(keys, _ROWS_PER_STATEMENT):
            values = ", ".join("(?, ?)" for _ in part)
            txn.execute(
                f"""
                DELETE FROM current_state_events AS c
                USING (VALUES {values}) AS d (type, state_key)
                WHERE c.room_id = ? AND c.type = d.type AND c.state_key = d.state_key
                """,
                [*itertools.chain.from_iterable(part), room_id],
            )
    else:
        # One statement a key: SQLite searches a row-value IN list by room only.
        txn.execute_batch(
            "DELETE FROM current_state_events WHERE room_id = ? AND type = ? AND state_key = ?",
            [(room_id, etype, state_key) for etype, state_key in keys],
        )
    inserted = [(key, to_insert[key]) for key in keys if key in to_insert]
    for part in batch_iter(inserted, _ROWS_PER_STATEMENT):
        values = ", ".join("(?, ?, ?)" for _ in part)
        txn.execute(
            f"""
            INSERT INTO current_state_events
                (room_id, type, state_key, event_id, membership, event_stream_ordering)
            SELECT ?, d.column1, d.column2, d.column3,
                (SELECT membership FROM room_memberships WHERE event_id = d.column3),
                (SELECT stream_ordering FROM events WHERE event_id = d.column3)
            FROM (VALUES {values}) AS d
            """,
            [room_id, *itertools.chain.from_iterable((t, s, e) for (t, s), e in part)],
        )

    if last and changes.joined_room_updates:
        _upsert_joined_room_txn(txn, room_id, changes)

    # local_current_membership, for the chunk's local members.
    local = [(t, s) for t, s in keys if t == EventTypes.Member and is_mine(s)]
    if local:
        txn.execute_batch(
            "DELETE FROM local_current_membership WHERE room_id = ? AND user_id = ?",
            [(room_id, s) for _, s in local],
        )
        txn.execute_batch(
            """INSERT INTO local_current_membership
                    (room_id, user_id, event_id, membership, event_stream_ordering)
                VALUES (
                    ?, ?, ?,
                    (SELECT membership FROM room_memberships WHERE event_id = ?),
                    (SELECT stream_ordering FROM events WHERE event_id = ?)
                )
                """,
            [(room_id, s, to_insert[(t, s)], to_insert[(t, s)], to_insert[(t, s)]) for t, s in local if (t, s) in to_insert],
        )

    # sliding_sync_membership_snapshots, for the chunk's members.
    snapshots_deleted = [u for u in changes.to_delete_membership_snapshots if u in members]
    if snapshots_deleted:
        persist_store.db_pool.simple_delete_many_txn(
            txn,
            table="sliding_sync_membership_snapshots",
            column="user_id",
            values=snapshots_deleted,
            keyvalues={"room_id": room_id},
        )
    snapshots = [m for m in changes.to_insert_membership_snapshots if m.user_id in members]
    if snapshots:
        _upsert_membership_snapshots_txn(txn, room_id, changes, snapshots)

    # The caches and streams Synapse's transaction invalidates, for the
    # chunk's members.
    txn.call_after(store._curr_state_delta_stream_cache.entity_has_changed, room_id, stream_id)
    for user_id in members:
        txn.call_after(store._membership_stream_cache.entity_has_changed, user_id, stream_id)
    store._invalidate_state_caches_and_stream(txn, room_id, members)
    store.handle_potentially_left_users_txn(txn, {m for m in members if not persist_store.hs.is_mine_id(m)})

    if persist_store._include_profile_updates_in_sync:
        _record_profile_updates_txn(txn, persist_store, room_id, snapshots, snapshots_deleted)


def _upsert_joined_room_txn(txn: LoggingTransaction, room_id: str, changes: SlidingSyncTableChanges) -> None:
    """The `sliding_sync_joined_rooms` row, as Synapse writes it."""
    keys = changes.joined_room_updates.keys()
    values = changes.joined_room_updates.values()
    args: list[Any] = [room_id, room_id, changes.joined_room_bump_stamp_to_fully_insert, *values]
    txn.execute(
        f"""
        INSERT INTO sliding_sync_joined_rooms
            (room_id, event_stream_ordering, bump_stamp, {", ".join(keys)})
        VALUES (
            ?,
            (SELECT stream_ordering FROM events WHERE room_id = ? ORDER BY stream_ordering DESC LIMIT 1),
            ?,
            {", ".join("?" for _ in values)}
        )
        ON CONFLICT (room_id)
        DO UPDATE SET
            {", ".join(f"{key} = EXCLUDED.{key}" for key in keys)}
        """,
        args,
    )


def _upsert_membership_snapshots_txn(
    txn: LoggingTransaction, room_id: str, changes: SlidingSyncTableChanges, snapshots: list[Any]
) -> None:
    """`sliding_sync_membership_snapshots` rows, as Synapse writes them."""
    keys = changes.membership_snapshot_shared_insert_values.keys()
    values = list(changes.membership_snapshot_shared_insert_values.values())
    txn.execute_batch(
        f"""
        INSERT INTO sliding_sync_membership_snapshots
            (room_id, user_id, sender, membership_event_id, membership, forgotten, event_stream_ordering, event_instance_name
            {("," + ", ".join(keys)) if keys else ""})
        VALUES (
            ?, ?, ?, ?, ?, ?,
            (SELECT stream_ordering FROM events WHERE event_id = ?),
            (SELECT COALESCE(instance_name, 'master') FROM events WHERE event_id = ?)
            {("," + ", ".join("?" for _ in values)) if values else ""}
        )
        ON CONFLICT (room_id, user_id)
        DO UPDATE SET
            sender = EXCLUDED.sender,
            membership_event_id = EXCLUDED.membership_event_id,
            membership = EXCLUDED.membership,
            forgotten = EXCLUDED.forgotten,
            event_stream_ordering = EXCLUDED.event_stream_ordering
            {("," + ", ".join(f"{key} = EXCLUDED.{key}" for key in keys)) if keys else ""}
        """,
        [
            [room_id, m.user_id, m.sender, m.membership_event_id, m.membership, 0, m.membership_event_id, m.membership_event_id]
            + values
            for m in snapshots
        ],
    )


def _record_profile_updates_txn(
    txn: LoggingTransaction,
    persist_store: PersistEventsStore,
    room_id: str,
    snapshots: list[Any],
    snapshots_deleted: list[str],
) -> None:
    """The profile-updates stream's rows for the chunk's local members, as
    Synapse's transaction writes them (an experimental option)."""
    is_mine = persist_store.hs.is_mine_id
    joined = {m.user_id for m in snapshots if is_mine(m.user_id) and m.membership == Membership.JOIN}
    left = {m.user_id for m in snapshots if is_mine(m.user_id) and m.membership != Membership.JOIN} | set(
        snapshots_deleted
    )
    if joined:
        persist_store.store.record_profile_updates_for_user_joined_room_txn(
            txn=txn, room_id=room_id, joined_users=joined
        )
    for user_id in left:
        persist_store._record_profile_updates_for_user_left_room_txn(
            txn=txn, user_id=UserID.from_string(user_id), room_id=room_id
        )
