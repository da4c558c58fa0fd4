# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Auth checks and persistence of the state at one event, as it arrives.

A `StatePersister` is what one fetch of the state at an event (`/state_ids`,
then `/state` or `/event` rounds: `resync.fetch.StateFetcher`) knows and
holds:

- the events `/state_ids` promised, and those still missing (what every
  round fetches, and what the checks admit);
- the checked events that wait (are *parked*) for auth events not received
  yet, up to `park_limit` (past it the excess is dropped and stays missing:
  memory stays bounded however the server orders its answer);
- the batches being auth-checked and written: events are auth-checked
  against their auth events in topological order (as Synapse does for
  outliers: `validate_event_for_room_version`, its state-independent and
  state-dependent auth rules, and rejection when an auth event is rejected)
  and persisted in batches, by the bulk writer (`storage.bulk`) or
  Synapse's own persistence, as outliers. A batch is auth-checked while the
  one before it is written (`resync.writes.OrderedWrites`): the events of
  batches queued but not yet written count as stored for the checks of the
  next ones, and a write that fails takes with it those that may rest on it.
"""

import collections
import logging
from typing import TYPE_CHECKING, AbstractSet, Any, Awaitable, Callable, Iterable

from twisted.internet import defer

from synapse.api.constants import RejectedReason
from synapse.api.errors import AuthError, EventSizeError
from synapse.event_auth import (
    check_state_dependent_auth_rules,
    check_state_independent_auth_rules,
    validate_event_for_room_version,
)
from synapse.events import EventBase
from synapse.events.snapshot import EventContext
from synapse.logging.context import make_deferred_yieldable
from synapse.storage.databases.main.events_worker import EventRedactBehaviour
from synapse.util.async_helpers import Linearizer
from synapse.util.duration import Duration
from synapse.util.iterutils import batch_iter, sorted_topologically

from synapse_fastjoin.resync.checks import Validation, raise_validation
from synapse_fastjoin.resync.progress import ResyncProgress
from synapse_fastjoin.resync.writes import OrderedWrites
from synapse_fastjoin.storage.bulk import persist_outliers
from synapse_fastjoin.storage.connection_share import ConnectionShare
from synapse_fastjoin.storage.events import stored_event_ids_txn

if TYPE_CHECKING:
    from synapse.server import HomeServer
    from synapse.storage.databases.main import DataStore

    from synapse_fastjoin.config import ResyncConfig

logger = logging.getLogger(__name__)


class StatePersister:
    """The events of one fetch of the state at an event: promised, missing,
    parked, being written."""

    def __init__(
        self,
        hs: "HomeServer",
        config: "ResyncConfig",
        room_id: str,
        progress: ResyncProgress,
        promised: AbstractSet[str],
        stored: AbstractSet[str],
        rejected_ids: set[str],
        live_runs_busy: Callable[[], bool] | None = None,
    ) -> None:
        """
        Args:
            promised: every event id `/state_ids` listed (and the event itself).
            stored: those of them (or other ids) already in the database.
            rejected_ids: events of this resync rejected so far (shared by
                every fetch of the resync: event objects do not carry their
                rejection until they are read back from the database).
            live_runs_busy: whether runs of staged live events are under way
                (`FinishGate.runs_in_flight`), for the share of SQLite's
                connection.
        """
        self._hs = hs
        self._config = config
        self._room_id = room_id
        self._progress = progress
        self._store = hs.get_datastores().main
        self._clock = hs.get_clock()
        self._federation_event_handler = hs.get_federation_event_handler()
        self.promised = promised
        self.missing: set[str] = set(promised) - stored
        """Promised events not stored yet (nor dropped as unavailable)."""
        self.parked: dict[str, EventBase] = {}
        self._local_ids: set[str] = set(stored)
        self._absent_ids: set[str] = set()
        self._auth_cache: collections.OrderedDict[str, EventBase] = collections.OrderedDict()
        self._rejected_ids = rejected_ids
        # One chunk's auth checks at a time (the writes go on behind them).
        self.lock = Linearizer(name="fastjoin_persist", clock=self._clock)
        # Auth-checked events queued to be written (see resync/writes.py):
        # counted as stored by the auth checks of the next batches.
        # On SQLite, each write may give the one connection back to the rest
        # of the server while it has work (resync.sqlite_yield_ratio).
        self._connection_share = ConnectionShare(hs, config.sqlite_yield_ratio, live_runs_busy)
        self._writes = OrderedWrites(self._write_sharing_connection)
        self._in_flight: dict[str, EventBase] = {}
        # `validate_event_for_room_version`'s outcome for events a check
        # process already ran it on.
        self._validated: dict[str, Validation] = {}

    def _count_slot_wait(self, seconds: float) -> None:
        self._progress.slot_wait_seconds += seconds

    async def _write_sharing_connection(self, write: Callable[[], Awaitable[Any]]) -> None:
        self._progress.yielded_seconds += await self._connection_share.run_write(write)

    async def take(self, result: Any) -> "defer.Deferred[None] | None":
        for event in result.accepted:
            # (One being written already came twice: /event and /state.)
            if event.event_id in self.missing and event.event_id not in self._in_flight:
                self.parked[event.event_id] = event
                # (Always for this very event object: in room versions 1
                # and 2 another event may come with the same id.)
                if event.event_id in result.validated:
                    self._validated[event.event_id] = result.validated[event.event_id]
                else:
                    self._validated.pop(event.event_id, None)
        return await self.drain(final=False, wait=False)

    async def drain(self, final: bool, wait: bool = True) -> "defer.Deferred[None] | None":
        """Auth-check and persist every parked event whose auth events are all
        stored (or queued to be) or parked and ready; keep the rest parked (up
        to park_limit).

        With `wait`, returns once the batches are written; else returns a
        Deferred that fires then (the writes go on in order meanwhile)."""
        # Before anything counts on events queued to be written.
        token = self._writes.token()
        if not self.parked:
            if wait:
                await self._writes.wait_all()
            return None
        candidates = self.parked
        unknown = {
            a
            for ev in candidates.values()
            for a in ev.auth_event_ids()
            if a not in candidates and not self.is_stored(a) and a not in self._absent_ids
        }
        # Auth events outside what /state_ids promised (e.g. from the join) may
        # be stored already.
        unknown_unpromised = {a for a in unknown if a not in self.promised}
        if unknown_unpromised:
            found = await stored_event_ids(self._store, unknown_unpromised)
            self._local_ids.update(found)
            self._absent_ids.update(unknown_unpromised - found)

        graph = {
            ev.event_id: [a for a in ev.auth_event_ids() if a in candidates]
            for ev in candidates.values()
        }
        ready: list[EventBase] = []
        ready_ids: set[str] = set()
        waiting: dict[str, EventBase] = {}
        for event_id in sorted_topologically(candidates.keys(), graph):
            ev = candidates[event_id]
            if all(a in ready_ids or self.is_stored(a) for a in ev.auth_event_ids()):
                ready.append(ev)
                ready_ids.add(event_id)
            else:
                waiting[event_id] = ev
        if len(waiting) > self._config.park_limit:
            # Drop the excess: those events stay missing and are fetched again
            # in a later round, when their auth events are stored.
            excess = list(waiting)[self._config.park_limit :]
            for event_id in excess:
                del waiting[event_id]
                self._validated.pop(event_id, None)
            self._progress.park_dropped += len(excess)
            logger.info(
                "Resync of %s: %d events wait for auth events not received yet; "
                "%d over resync.park_limit dropped, to be fetched again",
                self._room_id, len(waiting) + len(excess), len(excess),
            )
        self.parked = waiting
        if final and waiting:
            logger.info(
                "Resync of %s: %d events wait for auth events not received yet",
                self._room_id,
                len(waiting),
            )
            self.parked = {}
        writes = []
        for batch in batch_iter(ready, self._config.persist_batch_size):
            d = await self._persist_batch(list(batch), token)
            if d is not None:
                writes.append(d)
        if wait:
            await self._writes.wait_all()
            if writes:
                # (Each write's error, if any, is raised here.)
                await make_deferred_yieldable(defer.gatherResults(writes, consumeErrors=True))
            return None
        if not writes:
            return None
        return defer.gatherResults(writes, consumeErrors=True)

    def is_stored(self, event_id: str) -> bool:
        """Stored, or auth-checked and queued to be written."""
        if event_id in self._local_ids or event_id in self._in_flight:
            return True
        return event_id in self.promised and event_id not in self.missing

    async def _persist_batch(self, batch: list[EventBase], token: int) -> "defer.Deferred[None] | None":
        """Auth-check a batch, then queue it to be written after the batches
        queued before it. Returns the write's Deferred (None if nothing is
        left to write)."""

        async def load(ids: set[str]) -> dict[str, EventBase]:
            found = {i: self._in_flight[i] for i in ids if i in self._in_flight}
            rest = ids - found.keys()
            if rest:
                found.update(
                    await self._store.get_events(
                        rest, allow_rejected=True, redact_behaviour=EventRedactBehaviour.as_is
                    )
                )
            return found

        auth_map = await auth_events_for_batch(batch, self._auth_cache, load, _AUTH_CACHE_SIZE)

        to_persist: list[tuple[EventBase, EventContext]] = []
        storage = self._hs.get_storage_controllers()
        for i, event in enumerate(batch):
            auth = [auth_map.get(a) for a in event.auth_event_ids()]
            if any(a is None for a in auth):
                logger.warning(
                    "Resync of %s: dropping %s, an auth event of it could not be found",
                    self._room_id,
                    event.event_id,
                )
                auth_map.pop(event.event_id, None)
                self._validated.pop(event.event_id, None)
                continue
            event.internal_metadata.outlier = True
            context = EventContext.for_outlier(storage)
            try:
                if event.event_id in self._validated:
                    # Computed by the check process on this very event.
                    raise_validation(self._validated.pop(event.event_id))
                else:
                    validate_event_for_room_version(event)
                await check_state_independent_auth_rules(
                    self._store, event, batched_auth_events=auth_map
                )
                check_state_dependent_auth_rules(event, auth)  # type: ignore[arg-type]
            except AuthError as e:
                logger.info("Resync of %s: rejecting %s: %s", self._room_id, event.event_id, e)
                context.rejected = RejectedReason.AUTH_ERROR
            except EventSizeError as e:
                if e.unpersistable:
                    logger.warning("Resync of %s: dropping unpersistable %s: %s", self._room_id, event.event_id, e)
                    continue
                context.rejected = RejectedReason.OVERSIZED_EVENT
            if not context.rejected and any(a in self._rejected_ids for a in event.auth_event_ids()):
                # Events from the DB carry their rejection; those of this run
                # are tracked here (event objects are immutable).
                logger.info("Resync of %s: rejecting %s: an auth event is rejected", self._room_id, event.event_id)
                context.rejected = RejectedReason.AUTH_ERROR
            if context.rejected:
                self._progress.rejected += 1
                self._rejected_ids.add(event.event_id)
            to_persist.append((event, context))
            if (i + 1) % 200 == 0:
                await self._clock.sleep(Duration(seconds=0))
        if not to_persist:
            return None
        # Auth events of the next batches from now on, written or not.
        for event, _ in to_persist:
            self._in_flight[event.event_id] = event
            self._auth_cache[event.event_id] = event
        while len(self._auth_cache) > _AUTH_CACHE_SIZE:
            self._auth_cache.popitem(last=False)

        async def write() -> None:
            if self._config.bulk_writer:
                # The same rows as Synapse's outlier persistence, in one
                # transaction per batch (storage/bulk.py; parity-tested).
                await persist_outliers(self._hs, self._room_id, to_persist, on_slot_wait=self._count_slot_wait)
            else:
                await self._federation_event_handler.persist_events_and_notify(
                    self._room_id, to_persist, backfilled=True
                )
            for event, _ in to_persist:
                self.missing.discard(event.event_id)
                self._in_flight.pop(event.event_id, None)
            self._progress.persisted += len(to_persist)

        def clean_up() -> None:
            # Not written: these stay missing (fetched again later), and no
            # batch checked from now on may count on them.
            for event, _ in to_persist:
                self._in_flight.pop(event.event_id, None)
                self._auth_cache.pop(event.event_id, None)

        return self._writes.queue(token, write, clean_up)


async def stored_event_ids(store: "DataStore", event_ids: Iterable[str]) -> set[str]:
    """Which of `event_ids` are in the events table."""
    found: set[str] = set()
    for group in batch_iter(list(event_ids), 20000):
        found.update(
            await store.db_pool.runInteraction("fastjoin_stored_event_ids", stored_event_ids_txn, group)
        )
    return found


# Events kept in memory as possible auth events of the next batches.
_AUTH_CACHE_SIZE = 2000


async def auth_events_for_batch(
    batch: list[EventBase],
    cache: "collections.OrderedDict[str, EventBase]",
    load: Callable[[set[str]], Awaitable[dict[str, EventBase]]],
    cache_size: int,
) -> dict[str, EventBase]:
    """Every event of `batch` and every auth event of theirs that can be had:
    from the batch itself, the cache of recent events, or the database.

    The batch's own needs are taken out of the cache before anything new goes
    in: trimming the cache may then evict what it likes without losing an
    auth event this batch was counting on. (It once loaded first and trimmed
    before looking: with a full cache, the oldest entries, found present a
    moment earlier, were gone, and a whole batch of valid events was dropped
    for "an auth event of it could not be found".)
    """
    auth_map: dict[str, EventBase] = {ev.event_id: ev for ev in batch}
    to_load: set[str] = set()
    for ev in batch:
        for a in ev.auth_event_ids():
            if a in auth_map:
                continue
            cached = cache.get(a)
            if cached is not None:
                auth_map[a] = cached
                cache.move_to_end(a)
            else:
                to_load.add(a)
    if to_load:
        loaded = await load(to_load)
        auth_map.update(loaded)
        for event_id, ev in loaded.items():
            cache[event_id] = ev
        while len(cache) > cache_size:
            cache.popitem(last=False)
    return auth_map
