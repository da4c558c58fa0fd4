# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""A bulk writer for outliers: the state at the join, written in big batches.

`persist_outliers` writes the rows Synapse's
`FederationEventHandler.persist_events_and_notify(room_id, events, backfilled=True)`
writes for a batch of outlier events (some of them rejected, some stored
redacted), and leaves the caches, the backfill stream and the replication
notifier as that path leaves them. What it does not do is the per-event
machinery around it: Synapse cuts every batch into transactions of 100
events, computes the chain cover index of each in a transaction of its own
and inserts every rejection with a statement of its own. Here a whole batch
is one transaction with one multi-row write per table.

Most writes are Synapse's own `_txn` functions of
`PersistEventsStore`, called on the whole batch inside our transaction (they
are multi-row already): the `events`/`event_json`/`state_events` rows, the
chain cover index (`event_auth_chains`, `event_auth_chain_links`,
`event_auth_chain_to_calculate`) and `event_auth`, `event_edges`,
`room_memberships`, `event_search`, relations, redactions, labels, the
event-cache prefill. Only what Synapse writes per event, and only where it
does not matter which function writes the row, is ours: the `rejections`
rows. The chain cover index is Synapse's own code too: it is computed in our
transaction rather than in one before it.

Events are persisted one room at a time, as Synapse's persistence queue
does: the writer takes its turn at the room with that queue's tasks
(`storage/room_turns.py`: batches of new non-state events run beside it,
every other task waits for it and it for them) and holds the room's read
lock against purges. A batch the writer cannot do exactly
as Synapse would (not outliers, state-DAG rooms, events that carry a
transaction id, experimental features that act on persisted events, an event
persister other than this process) is handed to Synapse's own path instead.
"""

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from synapse.api.constants import EventTypes
from synapse.events import EventBase, relation_from_event
from synapse.events.snapshot import EventContext
from synapse.handlers.worker_lock import NEW_EVENT_DURING_PURGE_LOCK_NAME
from synapse.metrics import SERVER_NAME_LABEL
from synapse.storage.database import LoggingTransaction
from synapse.storage.databases.main.events import (
    SLIDING_SYNC_RELEVANT_STATE_SET,
    TRACKED_EVENT_TYPES,
    PersistEventsStore,
    event_counter,
    persist_event_counter,
)
from synapse.storage.engines import PostgresEngine
from synapse.util.caches.deferred_cache import DeferredCache

from synapse_fastjoin.storage.room_turns import room_turn
from synapse_fastjoin.storage.sqlite_batch import MultiRowTransaction

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

EventPair = tuple[EventBase, EventContext]


def fallback_reason(hs: "HomeServer", room_id: str, events: Sequence[EventPair]) -> str | None:
    """Why `events` must go through Synapse's own persistence, or None when
    the bulk writer writes exactly what it would."""
    config = hs.config
    if config.worker.events_shard_config.get_instance(room_id) != hs.get_instance_name():
        return "another process persists this room's events"
    if config.experimental.msc4293_enabled:
        # Synapse acts on leave/ban events after persisting them.
        return "msc4293 is enabled"
    if config.experimental.msc4354_enabled:
        return "msc4354 (sticky events) is enabled"
    for event, context in events:
        if event.room_id != room_id:
            return f"{event.event_id} is not in {room_id}"
        if not event.internal_metadata.is_outlier():
            return f"{event.event_id} is not an outlier"
        if event.room_version.msc4242_state_dags:
            return "state-DAG room version"
        if context.partial_state or context._state_group is not None or context.state_group_before_event is not None:
            return f"{event.event_id} has state"
        if getattr(event.internal_metadata, "txn_id", None) is not None:
            return f"{event.event_id} has a transaction id"
    return None


async def persist_outliers(
    hs: "HomeServer",
    room_id: str,
    events: Sequence[EventPair],
    on_slot_wait: Callable[[float], None] | None = None,
) -> int:
    """Persist outlier events of one room as
    `persist_events_and_notify(room_id, events, backfilled=True)` does.

    Args:
        hs: the homeserver (main process or the room's event persister).
        room_id: the room every event belongs to.
        events: outlier events and their `EventContext.for_outlier` contexts,
            `context.rejected` set for rejected ones; any order Synapse
            accepts (auth events before the events they authorise, or already
            stored).
        on_slot_wait: called with the seconds the write waited for its
            turn at the room (while Synapse's persistence queue wrote what
            cannot run beside it: state events, outliers, current state),
            once it has it.

    Returns:
        The room stream position after which the events are persisted (what
        `persist_events_and_notify` returns).
    """
    store = hs.get_datastores().main
    if not events:
        return store.get_room_max_stream_ordering()
    reason = fallback_reason(hs, room_id, events)
    if reason is not None:
        logger.info("Bulk writer: %d events of %s go through Synapse's path: %s", len(events), room_id, reason)
        return await hs.get_federation_event_handler().persist_events_and_notify(
            room_id, list(events), backfilled=True
        )

    persist_store = hs.get_datastores().persist_events
    assert persist_store is not None
    events = list(events)
    async with hs.get_worker_locks_handler().acquire_read_write_lock(
        NEW_EVENT_DURING_PURGE_LOCK_NAME, room_id, write=False
    ):
        async with room_turn(hs, room_id, "outliers", on_slot_wait):
            # Backfilled events take negative stream orderings from the backfill
            # stream: allocated as late as possible, as Synapse does, so the
            # stream's position waits for this transaction only.
            async with persist_store._backfill_id_gen.get_next_mult(len(events)) as orderings:
                for (event, _), ordering in zip(events, orderings):
                    event.internal_metadata.stream_ordering = ordering
                    event.internal_metadata.instance_name = hs.get_instance_name()
                await persist_store.db_pool.runInteraction(
                    "fastjoin_persist_outliers",
                    persist_outliers_txn,
                    persist_store,
                    room_id,
                    events,
                )
    _count_persisted(hs, events)

    # As `persist_events_and_notify` does for backfilled events: workers are
    # told of the new backfill stream position; clients are not notified.
    hs.get_notifier().notify_replication()
    if hs.config.server.enable_ephemeral_messages:
        message_handler = hs.get_message_handler()
        for event, _ in events:
            message_handler.maybe_schedule_expiry(event)
    return store.get_room_max_token().stream


def persist_outliers_txn(
    txn: LoggingTransaction,
    persist_store: PersistEventsStore,
    room_id: str,
    events: list[EventPair],
) -> None:
    """Write outlier events in one transaction: the rows of Synapse's
    `_persist_events_txn` (with `inhibit_local_membership_updates`, no state
    delta, no forward extremities) plus the chain cover index Synapse computes
    in the transaction before it.

    Stream orderings must be set on the events.
    """
    # On SQLite, every multi-row insert below (Synapse's functions' too) as a
    # few statements rather than one step per row (storage/sqlite_batch.py).
    txn = MultiRowTransaction.wrap(txn)
    main = persist_store.store
    db_pool = persist_store.db_pool

    # As Synapse does on PostgreSQL, and on SQLite too (where its write
    # transactions are serialised anyway): never write into a room that was
    # deleted meanwhile (e.g. by an admin while its resync was under way).
    lock = " FOR SHARE" if isinstance(txn.database_engine, PostgresEngine) else ""
    txn.execute(f"SELECT room_version FROM rooms WHERE room_id = ?{lock}", (room_id,))
    if txn.fetchone() is None:
        raise Exception(f"Room does not exist {room_id}")

    # Cache invalidation after the transaction, for every event handed in
    # (already stored ones included), as Synapse does; the invalidations of
    # Synapse's `_invalidate_caches_for_event` done once per key, not once
    # per event.
    for event, _ in events:
        main.invalidate_get_event_cache_after_txn(txn, event.event_id)
        if event.redacts:
            main.invalidate_get_event_cache_after_txn(txn, event.redacts)
    txn.call_after(invalidate_caches_for_outliers, main, [e for e, _ in events])

    all_events = events
    events = persist_store._filter_events_and_contexts_for_duplicates(events)
    # min_depth: outliers never lower it, but Synapse writes the row with 0
    # for a room that has none yet; keep that.
    persist_store._update_room_depths_txn(txn, room_id, events_and_contexts=events)
    # For outliers this only drops the events already stored (one SELECT).
    events = persist_store._update_outliers_txn(txn, events_and_contexts=events)
    if not events:
        return

    room_version = events[0][0].room_version
    events = persist_store._apply_existing_redaction_txn(txn, room_id, room_version, events_and_contexts=events)

    # events, event_json, state_events; redactions of these events uncensored.
    persist_store._store_event_txn(txn, events_and_contexts=events)

    # The chain cover index, computed and written in this transaction (Synapse
    # computes it in one of its own just before), and event_auth for every
    # state event, rejected ones included.
    state_events = list({e.event_id: e for e, _ in events if e.is_state()}.values())
    links = (
        persist_store.calculate_chain_cover_index_for_events_txn(txn, room_id, state_events)
        if state_events
        else {}
    )
    persist_store._persist_event_auth_chain_txn(txn, [e for e, _ in events], links)

    # rejections: one multi-row insert (Synapse inserts them one by one).
    rejected = [(e, c) for e, c in events if c.rejected]
    if rejected:
        now = str(persist_store._clock.time_msec())
        db_pool.simple_insert_many_txn(
            txn,
            table="rejections",
            keys=("event_id", "reason", "last_check"),
            values=[(e.event_id, c.rejected, now) for e, c in rejected],
        )
        events = [(e, c) for e, c in events if not c.rejected]

    # event_edges, room_memberships, event_search, relations, redactions,
    # labels, retention, push-action staging; the event cache prefill.
    persist_store._update_metadata_tables_txn(
        txn,
        events_and_contexts=events,
        all_events_and_contexts=all_events,
        inhibit_local_membership_updates=True,
    )
    # Backfilled events do not touch the sliding-sync tables (Synapse's
    # `_update_sliding_sync_tables_with_new_persisted_events_txn` returns for
    # negative stream orderings) nor current state.


# What `CacheInvalidationWorkerStore._invalidate_caches_for_event` (1.163.2)
# invalidates for an event; tests/unit/test_bulk_writer.py checks this list
# against that function's source.
EVENT_CACHES = ("have_seen_event", "get_metadata_for_event")  # (room_id, event_id)
EVENT_ID_CACHES = ("_get_membership_from_event_id",)  # (event_id,)
ROOM_CACHES = ("get_latest_event_ids_in_room", "get_unread_event_push_actions_by_room_for_user", "_get_max_event_pos")
REDACTED_CACHES = ("get_applicable_edit", "get_thread_id", "get_thread_id_for_receipts")  # (redacts,)
MEMBER_CACHES = (
    "get_invited_rooms_for_local_user",
    "get_rooms_for_user",
    "_get_rooms_for_local_user_where_membership_is_inner",
    "get_sliding_sync_rooms_for_user_from_membership_snapshots",
    "get_forgotten_rooms_for_user",
)  # (state_key,)
RELATES_TO_CACHES = ("get_references_for_event", "get_applicable_edit", "get_thread_summary", "get_thread_participated")
ALL_CACHE_NAMES = frozenset(
    EVENT_CACHES
    + EVENT_ID_CACHES
    + ROOM_CACHES
    + REDACTED_CACHES
    + MEMBER_CACHES
    + RELATES_TO_CACHES
    + ("get_relations_for_event", "did_forget", "get_room_type", "get_room_encryption", "get_threads")
)


def invalidate_caches_for_outliers(store: Any, events: list[EventBase]) -> None:
    """Invalidate, in this process, what Synapse's `_invalidate_caches_for_event`
    invalidates for each of `events` (called with `backfilled=False`, as
    `_persist_events_txn` does), each key once. A cache holding nothing and
    with no lookup in flight is skipped: invalidating it changes nothing."""
    keys: dict[str, dict[Any, None]] = {}

    def add(name: str, key: tuple[Any, ...] | None) -> None:
        keys.setdefault(name, {})[key] = None

    for event in events:
        event_id, room_id = event.event_id, event.room_id
        ordering = event.internal_metadata.stream_ordering
        assert ordering is not None
        store._invalidate_local_get_event_cache(event_id)
        for name in EVENT_CACHES:
            add(name, (room_id, event_id))
        for name in EVENT_ID_CACHES:
            add(name, (event_id,))
        for name in ROOM_CACHES:
            add(name, (room_id,))
        store._events_stream_cache.entity_has_changed(room_id, ordering)
        redacts = event.redacts
        if redacts:
            store._invalidate_local_get_event_cache(redacts)
            add("get_relations_for_event", (room_id, redacts))
            for name in REDACTED_CACHES:
                add(name, (redacts,))
        state_key = event.get_state_key()
        if event.type == EventTypes.Member:
            store._membership_stream_cache.entity_has_changed(state_key, ordering)
            for name in MEMBER_CACHES:
                add(name, (state_key,))
            add("did_forget", (state_key, room_id))
        elif event.type == EventTypes.Create:
            add("get_room_type", (room_id,))
        elif event.type == EventTypes.RoomEncryption:
            add("get_room_encryption", (room_id,))
        if (event.type, state_key) in SLIDING_SYNC_RELEVANT_STATE_SET:
            add("get_sliding_sync_rooms_for_user_from_membership_snapshots", None)
        relation = relation_from_event(event)
        if relation:
            add("get_relations_for_event", (room_id, relation.parent_id))
            for name in RELATES_TO_CACHES:
                add(name, (relation.parent_id,))
            add("get_threads", (room_id,))

    for name, wanted in keys.items():
        cache = getattr(store, name, None) or store.external_cached_functions.get(name)
        if cache is None:
            continue  # not loaded in this process
        if None in wanted:
            cache.invalidate_all()
            continue
        inner = getattr(cache, "cache", None)
        if isinstance(inner, DeferredCache) and len(inner.cache) == 0 and not inner._pending_deferred_cache:
            continue
        invalidate = getattr(cache, "invalidate_local", cache.invalidate)
        for key in wanted:
            invalidate(key)


def _count_persisted(hs: "HomeServer", events: list[EventPair]) -> None:
    """Synapse's persistence metrics, counted per batch rather than per event."""
    server_name = hs.hostname
    persist_event_counter.labels(**{SERVER_NAME_LABEL: server_name}).inc(len(events))
    counts: Counter[tuple[str, str]] = Counter()
    for event, context in events:
        if context.app_service:
            origin_type = "application_service"
        elif hs.is_mine_id(event.sender):
            origin_type = "local"
        else:
            origin_type = "remote"
        counts[(event.type if event.type in TRACKED_EVENT_TYPES else "*other*", origin_type)] += 1
    for (event_type, origin_type), n in counts.items():
        event_counter.labels(type=event_type, origin_type=origin_type, **{SERVER_NAME_LABEL: server_name}).inc(n)
