"""The inbound queue of a partial-state room: kept whole, on disk, and bounded,
from the join until a while after the resync (`_KEEP_AFTER_RESYNC_S`, then until
it has drained).

Synapse stages every inbound PDU in `federation_inbound_events_staging` and
processes a room's queue one event at a time (FederationServer
`_process_incoming_pdus_in_room_inner`): only the event being processed is in
memory. Before each next event it offers to prune the queue; patch 0006 lets
the module say no (`may_prune`), because Synapse's pruning drops every queued
event that another queued event refers to, for good, and during a long resync
that is most of the live traffic. Synapse's pruning also reads every queued
event into memory at once. Patch 0020 tells the module of each event staged
(`on_staged`), so the bound also holds while the queue's processing is
stalled.

While the module keeps a room's queue, it keeps it within
`resync.inbound_queue_limit` itself: the newest events past the bound leave the
staging table for `fastjoin_inbound_dropped`, by id (storage/inbound.py). Once
the queue has drained below half the bound, they are fetched again, oldest
first, from the server that sent them (then the room's other servers) and
staged again as if that server had sent them once more (FederationServer's own
`_handle_received_pdu`: signature checks, staging, processing). An event that
Synapse stored meanwhile (pulled with get_missing_events or backfill) is not
fetched. One that no server serves is tried `_MAX_ATTEMPTS` times, then
counted as failed, with a warning: nothing is dropped silently. The admin API
(room detail: `inbound_queue`), the log and the metrics say how many events
were dropped, fetched again, are pending, and failed.

Most events arrive at a queue far below its bound, and a database transaction
per staged event (the bound check) would double what a live event costs while
the engine is writing. So after a check finds the queue within its bound with
no dropped event waiting, the next checks are answered from what that check
and the arrivals counted since say (`_Headroom`): the queue cannot have grown
by more than the events staged since. The database is asked again once half
the headroom has been used, or after `_RECHECK_S` (other workers stage events
too, and their arrivals are not counted here).
"""

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from synapse.api.errors import FederationError
from synapse.util.async_helpers import yieldable_gather_results

from synapse_fastjoin.storage.store import FastJoinStore

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

# Synapse prunes a room's inbound queue once this many events wait
# (EventFederationWorkerStore.prune_staged_events_in_room).
PRUNE_THRESHOLD = 100

# Events fetched again at once (concurrently), then queued in order.
_REFETCH_BATCH = 20
# Servers asked for one dropped event: its origin first, then others.
_REFETCH_SERVERS = 5
_MAX_ATTEMPTS = 5
_RETRY_BASE_MS = 30_000
# At most one "dropped" line per room this often.
_LOG_INTERVAL_S = 10.0
# A check answered from the last one is at most this old.
_RECHECK_S = 5.0
# After a resync the queue is kept this long at least (and then until it has
# drained below Synapse's prune threshold): the work the join leaves behind
# (user directory, stats, clients reading the members) slows the room's
# processing for a minute or more, and the live traffic of the resync's last
# seconds arrives then. Synapse would prune a backlog of more than
# PRUNE_THRESHOLD events at once, and fetch back only the last ten.
_KEEP_AFTER_RESYNC_S = 300.0
# A room not known to this process as partial or just resynced: the resync
# history (written by the process that ran the resync, read by every worker)
# is asked whether it ended less than `_KEEP_AFTER_RESYNC_S` ago; a "no" is
# trusted this long (a room that becomes partial meanwhile is seen as such).
_HISTORY_RECHECK_S = 60.0
_HISTORY_CACHE_MAX = 10000


def _now_ms() -> int:
    return int(time.time() * 1000)


class InboundQueueStats:
    """Process-wide totals (for the metrics)."""

    def __init__(self) -> None:
        self.dropped = 0
        self.refetched = 0
        self.arrived = 0
        self.failed = 0


class _Headroom:
    """What the last bound check of a room found (within the bound, nothing
    dropped, nothing waiting to be fetched again), and what was staged since."""

    __slots__ = ("staged", "arrived", "checked_at")

    def __init__(self, staged: int, checked_at: float) -> None:
        self.staged = staged
        self.arrived = 0
        self.checked_at = checked_at


class InboundQueue:
    """Keeps partial-state rooms' inbound queues whole and bounded.

    Args:
        hs: the HomeServer.
        store: the module's storage.
        limit: `resync.inbound_queue_limit` (0: no bound).
    """

    def __init__(
        self,
        hs: "HomeServer",
        store: FastJoinStore,
        limit: int,
        run_in_background: Callable[..., Any],
    ) -> None:
        self._hs = hs
        # ModuleApi.run_as_background_process: refills run in their own
        # logcontext (they outlive the event, or the looping call, that
        # started them).
        self._run_in_background = run_in_background
        self._store = store
        self._main_store = hs.get_datastores().main
        self._server_name = hs.hostname
        self.limit = limit
        self.stats = InboundQueueStats()
        # Rooms whose queue the module keeps: partial-state rooms, until the
        # backlog they built has drained and no dropped event waits.
        self._protected: set[str] = set()
        # room -> monotonic time until which its queue is kept after its resync.
        self._kept_until: dict[str, float] = {}
        # room -> monotonic time of the history read that found no recent
        # resync (`_resynced_recently`).
        self._no_recent_resync: dict[str, float] = {}
        self._refilling: set[str] = set()
        # room -> (last "dropped" log time, dropped since that line)
        self._log_state: dict[str, tuple[float, int]] = {}
        # Rooms whose last bound check needs no new one yet (see the module
        # docstring).
        self._headroom: dict[str, _Headroom] = {}
        # room -> checks started: only the newest check's answer is kept.
        self._check_seq: dict[str, int] = {}
        self._monotonic = time.monotonic
        # Bound checks made, and answered without the database (for tests
        # and the debug log).
        self.checks = 0
        self.checks_skipped = 0

    async def startup(self) -> None:
        """After a restart: rooms with dropped events still to fetch again stay
        protected, and are fetched again when their queue allows; the queues
        left on disk are processed now.

        Synapse processes the events staged before a restart only once a
        federation transaction arrives (FederationServer
        `_handle_old_staged_events`, started by the first one); a partial-state
        room whose servers have nothing more to send would keep its queue (and
        the dropped events behind it) for ever. So start that here, as the first
        transaction would (it takes each room's processing lock: no room is
        processed twice)."""
        for room_id in await self._store.rooms_with_dropped_pending():
            self._protected.add(room_id)
        staged_rooms = await self._main_store.get_all_rooms_with_staged_incoming_events()
        kept = [
            room_id
            for room_id in staged_rooms
            if room_id in self._protected
            or await self._main_store.is_partial_state_room(room_id)
        ]
        if kept:
            logger.info(
                "Processing the inbound events queued before the restart (%d rooms, %d kept)",
                len(staged_rooms),
                len(kept),
            )
            self._hs.get_federation_server()._handle_old_staged_events()
        await self.refill_all()

    def partial_join(self, room_id: str) -> None:
        """A partial-state join: the room's queue is kept from now on (even if
        it stays short while the room is partial, and `may_prune` is not asked
        then)."""
        self._protected.add(room_id)

    def resync_complete(self, room_id: str) -> None:
        """The room has full state: its queue is kept for
        `_KEEP_AFTER_RESYNC_S` more, and then until it has drained."""
        self._protected.add(room_id)
        self._kept_until[room_id] = self._monotonic() + _KEEP_AFTER_RESYNC_S

    async def may_prune(self, room_id: str) -> bool:
        """Patch 0006's callback, asked by Synapse before each next queued
        event of a room: whether Synapse may prune the queue (never while the
        module keeps it). Bounds a kept queue."""
        try:
            return await self._may_prune(room_id)
        except Exception:
            # Synapse would prune on a failing callback: keep the queue.
            logger.exception("Bounding the inbound queue of %s failed", room_id)
            return room_id not in self._protected

    async def _may_prune(self, room_id: str) -> bool:
        partial = await self._main_store.is_partial_state_room(room_id)
        if partial:
            self._protected.add(room_id)
        elif room_id not in self._protected and not await self._resynced_recently(room_id):
            self._forget(room_id)
            return True
        # Processing an event only shortens the queue: while the room is
        # partial (or kept after its resync), a check with room to spare needs
        # no new one. (After that the check below also tells when Synapse
        # takes over again.)
        kept = partial or self._monotonic() < self._kept_until.get(room_id, 0.0)
        if kept and self._within_headroom(room_id, arriving=0):
            return False
        dropped, staged, pending = await self._check_bound(room_id)
        if dropped:
            self._note_dropped(room_id, dropped, staged, pending)
        if pending and self._room_for_refill(staged):
            self.schedule_refill(room_id)
        if (
            not partial
            and staged < PRUNE_THRESHOLD
            and not pending
            and self._monotonic() >= self._kept_until.get(room_id, 0.0)
        ):
            # Drained after the resync: Synapse's own handling again.
            self._protected.discard(room_id)
            self._kept_until.pop(room_id, None)
            self._forget(room_id)
            return True
        return False

    async def _resynced_recently(self, room_id: str) -> bool:
        """Whether the room's resync ended less than `_KEEP_AFTER_RESYNC_S`
        ago by the resync history, for a room this process did not see
        resync (another worker ran it, or this process restarted since);
        if so the queue is kept for what is left of that time, as in the
        process that ran it."""
        now = self._monotonic()
        checked = self._no_recent_resync.get(room_id)
        if checked is not None and now - checked < _HISTORY_RECHECK_S:
            return False
        finished_ms = await self._store.last_complete_resync_ts(room_id)
        age_s = (_now_ms() - finished_ms) / 1000 if finished_ms is not None else None
        if age_s is not None and 0 <= age_s < _KEEP_AFTER_RESYNC_S:
            self._no_recent_resync.pop(room_id, None)
            self._protected.add(room_id)
            self._kept_until[room_id] = now + _KEEP_AFTER_RESYNC_S - age_s
            return True
        if len(self._no_recent_resync) >= _HISTORY_CACHE_MAX:
            self._no_recent_resync = {
                r: t for r, t in self._no_recent_resync.items() if now - t < _HISTORY_RECHECK_S
            }
        self._no_recent_resync[room_id] = now
        return False

    async def on_staged(self, room_id: str) -> None:
        """Patch 0020's callback, after each inbound event is staged: bounds a
        kept queue as events arrive, also while its processing is stalled (an
        event waiting for a fetch, or for the room's full state), when
        `may_prune` is not asked."""
        if room_id not in self._protected:
            if not await self._main_store.is_partial_state_room(room_id):
                return
            self._protected.add(room_id)
        if self._within_headroom(room_id, arriving=1):
            return
        dropped, staged, pending = await self._check_bound(room_id)
        if dropped:
            self._note_dropped(room_id, dropped, staged, pending)

    def _within_headroom(self, room_id: str, arriving: int) -> bool:
        """Whether the room's queue is known to be within its bound with no
        dropped event waiting, after `arriving` more staged events (counted),
        without asking the database."""
        known = self._headroom.get(room_id)
        if known is None:
            return False
        if self._monotonic() - known.checked_at > _RECHECK_S:
            return False
        if self.limit and known.arrived + arriving > (self.limit - known.staged) // 2:
            return False
        known.arrived += arriving
        self.checks_skipped += 1
        return True

    async def _check_bound(self, room_id: str) -> tuple[int, int, int]:
        """Bound the room's queue (storage/inbound.py `bound_queue_txn`) and
        remember whether the next checks can be answered without it."""
        # The time is taken before the check: arrivals counted from here on
        # may or may not be in its count, never missing from both.
        started = self._monotonic()
        self._headroom.pop(room_id, None)
        seq = self._check_seq.get(room_id, 0) + 1
        self._check_seq[room_id] = seq
        self.checks += 1
        dropped, staged, pending = await self._store.bound_inbound_queue(
            room_id, self.limit, _now_ms(), quick=True
        )
        if (
            self._check_seq.get(room_id) == seq
            and not dropped
            and not pending
            and (not self.limit or staged < self.limit)
        ):
            # (A check started after this one may have counted events this
            # one did not, and they were not counted as arrivals: keep only
            # the newest check's answer.)
            self._headroom[room_id] = _Headroom(staged, started)
        return dropped, staged, pending

    def _forget(self, room_id: str) -> None:
        self._headroom.pop(room_id, None)
        self._check_seq.pop(room_id, None)

    def _room_for_refill(self, staged: int) -> bool:
        return not self.limit or staged <= self.limit // 2

    def _note_dropped(self, room_id: str, dropped: int, staged: int, pending: int) -> None:
        self.stats.dropped += dropped
        now = time.monotonic()
        last, since = self._log_state.get(room_id, (0.0, 0))
        since += dropped
        if now - last < _LOG_INTERVAL_S:
            self._log_state[room_id] = (last, since)
            return
        self._log_state[room_id] = (now, 0)
        logger.info(
            "Inbound queue of %s passed its bound of %d events: dropped %d events to "
            "fetch again later (%d queued, %d dropped events to fetch again)",
            room_id,
            self.limit,
            since,
            staged,
            pending,
        )

    def schedule_refill(self, room_id: str) -> None:
        if room_id in self._refilling:
            return
        self._run_in_background("fastjoin_inbound_refill_room", self._refill_logged, room_id)

    async def refill_all(self) -> None:
        """Fetch again what waits in every room whose queue has room (run
        periodically, and after a resync ends)."""
        for room_id in await self._store.rooms_with_dropped_pending():
            self._protected.add(room_id)
            self.schedule_refill(room_id)

    async def _refill_logged(self, room_id: str) -> None:
        try:
            await self.refill(room_id)
        except Exception:
            logger.exception("Fetching the dropped inbound events of %s again failed", room_id)

    async def refill(self, room_id: str) -> None:
        """Fetch dropped events of the room again, oldest first, and queue
        them, while the queue has room (at most up to the bound)."""
        if room_id in self._refilling:
            return
        self._refilling.add(room_id)
        try:
            await self._refill(room_id)
        finally:
            self._refilling.discard(room_id)

    async def _refill(self, room_id: str) -> None:
        room_version = await self._main_store.get_room_version(room_id)
        if not await self._hs.get_event_auth_handler().is_host_in_room(
            room_id, self._server_name
        ):
            return  # left meanwhile; rejoining fetches what is new
        federation_server = self._hs.get_federation_server()
        client = self._hs.get_federation_client()
        restaged = arrived = failed = 0
        while True:
            staged = await self._store.count_staged(room_id)
            if not self._room_for_refill(staged) and restaged == 0:
                break
            space = (self.limit - staged) if self.limit else _REFETCH_BATCH
            if space <= 0:
                break
            now = _now_ms()
            pending = await self._store.get_dropped_pending(
                room_id, min(space, _REFETCH_BATCH), now
            )
            if not pending:
                break
            ids = [event_id for event_id, _, _ in pending]
            stored = await self._main_store.have_events_in_timeline(ids)
            if stored:
                await self._store.mark_dropped_arrived(room_id, list(stored), now)
                arrived += len(stored)
            todo = [p for p in pending if p[0] not in stored]
            if not todo:
                continue
            await self._store.begin_dropped_attempts(
                room_id,
                [(event_id, now + _RETRY_BASE_MS * 2**attempts) for event_id, _, attempts in todo],
            )
            servers = await self._servers(room_id)

            async def fetch(item: tuple[str, str, int]) -> tuple[tuple[str, str, int], Any, str]:
                event_id, origin, _ = item
                destinations = [origin] + [s for s in servers if s != origin]
                try:
                    pulled = await client.get_pdu(
                        destinations[:_REFETCH_SERVERS], event_id, room_version
                    )
                except Exception as e:
                    return item, None, f"{type(e).__name__}: {e}"
                if pulled is None:
                    return item, None, "no server served it"
                return item, pulled, ""

            results = await yieldable_gather_results(fetch, todo)
            # Queued in order (the order they were first received in).
            queued: list[str] = []
            for (event_id, origin, attempts), pulled, error in results:
                if pulled is None:
                    give_up = attempts + 1 >= _MAX_ATTEMPTS
                    await self._store.mark_dropped_failed(
                        room_id, event_id, error, give_up, _now_ms()
                    )
                    if give_up:
                        failed += 1
                        self.stats.failed += 1
                        logger.warning(
                            "Dropped inbound event %s of %s could not be fetched again "
                            "after %d attempts (%s): given up",
                            event_id,
                            room_id,
                            attempts + 1,
                            error,
                        )
                    continue
                try:
                    await federation_server._handle_received_pdu(origin, pulled.pdu)
                except FederationError as e:
                    # Its signatures do not check: Synapse refuses it, as it
                    # would have when it first came.
                    await self._store.mark_dropped_failed(
                        room_id, event_id, str(e), True, _now_ms()
                    )
                    failed += 1
                    self.stats.failed += 1
                    logger.warning(
                        "Dropped inbound event %s of %s fetched again, but refused: %s",
                        event_id,
                        room_id,
                        e,
                    )
                    continue
                queued.append(event_id)
            if queued:
                marked, stored_now = await self._store.mark_dropped_restaged(
                    room_id, queued, _now_ms()
                )
                restaged += marked
                arrived += stored_now
                self.stats.refetched += marked
        self.stats.arrived += arrived
        if restaged or arrived or failed:
            stats = await self._store.inbound_queue_stats(room_id)
            logger.info(
                "Inbound queue of %s: fetched %d dropped events again and queued them, "
                "%d had arrived meanwhile, %d failed; %d dropped in all, %d fetched again, "
                "%d still to fetch, %d failed",
                room_id,
                restaged,
                arrived,
                failed,
                stats["dropped"],
                stats["refetched"],
                stats["pending"],
                stats["failed"],
            )

    async def _servers(self, room_id: str) -> list[str]:
        """Servers to ask after the event's origin: those known while partial
        (the one joined through first), else the room's current servers."""
        if await self._main_store.is_partial_state_room(room_id):
            servers = sorted(
                await self._main_store.get_partial_state_servers_at_join(room_id) or ()
            )
        else:
            servers = sorted(await self._main_store.get_current_hosts_in_room(room_id))
        return [s for s in servers if s != self._server_name]

    async def room_json(self, room_id: str) -> dict[str, Any]:
        """The room's queue for the admin API."""
        stats = await self._store.inbound_queue_stats(room_id)
        return {"limit": self.limit, **stats}
