"""The resync engine: takes over Synapse's background resync of partial-state rooms.

Patch 0004 routes every start and every resume (after a restart) of a
partial-state resync here instead of `FederationHandler._sync_partial_state_room`.
For each room the engine:

1. walks the room's partial-state events in topological order;
2. for an event whose prev events we lack (the join event, and any event that
   arrived with a gap before it) fetches the full state after each missing prev
   event with `StateFetcher` (streamed, checked off the reactor, batched), and
   recomputes the event's state and auth from it;
3. for an event whose prev events are all stored (the events that arrived while
   the room was partial), recomputes its state from theirs with Synapse's own
   state handler and re-runs the auth checks, so an event the full state
   rejects ends up rejected and one it accepts ends up accepted;
4. finishes exactly as Synapse does: current state updated, pending device-list
   updates replayed, the partial-state flag cleared, waiters, `/sync` and
   workers notified.

It never gives up: a failure is retried with exponential backoff, rotating
through every server known to be in the room (refreshed from the room's state on
every cycle), and the admin API shows the room as waiting, with the last error
and the time of the next attempt. It stops only when the room is no longer
partial (done, or purged), or when it fails after no local user is left in the
room (other servers refuse state to a server that left, as Synapse's own loop
finds; a rejoin starts a new resync).
"""

import logging
import random
import time
from typing import TYPE_CHECKING, Any, Callable, Collection

from twisted.internet import defer
from twisted.python.threadpool import ThreadPool

from synapse.events import EventBase
from synapse.events.snapshot import EventContext
from synapse.logging.context import (
    PreserveLoggingContext,
    make_deferred_yieldable,
    nested_logging_context,
)
from synapse.api.constants import EventTypes
from synapse.event_auth import auth_types_for_event
from synapse.state import StateResolutionStore
from synapse.storage.databases.main.events_worker import EventRedactBehaviour
from synapse.util.duration import Duration

from synapse_fastjoin.handlers.device_lists import RemoteDeviceListCheck
from synapse_fastjoin.resync.checkpool import CheckPool
from synapse_fastjoin.resync.fetch import StateFetcher
from synapse_fastjoin.resync.finish_gate import FinishGate
from synapse_fastjoin.resync.keys import start_key_prefetch
from synapse_fastjoin.resync.policy import FetchPolicy, NoServerAnswered
from synapse_fastjoin.storage.current_state import update_current_state
from synapse_fastjoin.storage.events import partial_state_events_in_order_txn
from synapse_fastjoin.storage.partial_state import un_partial_state_events_txn
from synapse_fastjoin.storage.sqlite_wal import WalCheckpointHold
from synapse_fastjoin.storage.state_groups import (
    ChainItem,
    ChainRef,
    delete_unused_groups_txn,
    state_at_keys_txn,
    store_state_group_chain_txn,
)
from synapse_fastjoin.resync.progress import (
    PHASE_CATCHUP,
    PHASE_DONE,
    PHASE_FINISHING,
    PHASE_RESOLVING,
    PHASE_STARTING,
    PHASE_WAITING,
    ResyncProgress,
)

if TYPE_CHECKING:
    from synapse.server import HomeServer

    from synapse_fastjoin.config import ResyncConfig
    from synapse_fastjoin.storage.store import FastJoinStore

logger = logging.getLogger(__name__)


# Events brought to full state per write during catch-up.
_RUN_LENGTH = 100

# A room with at least this many servers starts the check processes as its
# resync starts (see `_RoomResync.run`); smaller ones once /state_ids shows
# `check_process_min_events` events to fetch.
_BIG_ROOM_SERVERS = 200


class RoomLeft(Exception):
    """No local user is in the room any more: there is nothing to resync for."""


# Phases in which an abort lets the run stop by itself at its next event (it
# is writing to the database), for at most this long, before cancelling it.
_COOPERATIVE_PHASES = (PHASE_RESOLVING, PHASE_CATCHUP, PHASE_FINISHING)
_COOPERATIVE_ABORT_SECONDS = 60


class _Running:
    """A room's resync running in this process: its `_RoomResync`, the
    Deferred of its run (cancelled by `abort`), and whether it was aborted."""

    def __init__(self, run: "_RoomResync") -> None:
        self.run = run
        self.task: "defer.Deferred[None] | None" = None
        self.aborted = False
        self.ended: "defer.Deferred[None]" = defer.Deferred()


class ResyncEngine:
    """One per homeserver (main process); runs one `_RoomResync` per room."""

    def __init__(self, hs: "HomeServer", config: "ResyncConfig", store: "FastJoinStore") -> None:
        self._hs = hs
        self._config = config
        self._store = store
        self.progress: dict[str, ResyncProgress] = {}
        # Called with a run's progress when the run ends (the metrics).
        self.run_observers: list[Callable[[ResyncProgress], None]] = []
        self._running: dict[str, _Running] = {}
        reactor = hs.get_reactor()
        self._threadpool = ThreadPool(
            minthreads=1, maxthreads=config.check_threads, name="fastjoin-checks"
        )
        self._threadpool.start()
        reactor.addSystemEventTrigger("during", "shutdown", self._threadpool.stop)
        self.checkpool = CheckPool(reactor, config.check_processes)
        reactor.addSystemEventTrigger("before", "shutdown", self.checkpool.stop)
        # Between runs of staged events checked against partial state and the
        # end of a resync (resync/finish_gate.py); handed to StagedRuns.
        self.finish_gate = FinishGate(reactor)
        self._wal_hold = WalCheckpointHold(
            hs.get_datastores().main.db_pool, config.sqlite_wal_autocheckpoint, reactor=reactor
        )

    async def resync_room(
        self,
        room_id: str,
        initial_destination: str | None,
        other_destinations: Collection[str],
    ) -> None:
        """Called by the patched Synapse in place of its own resync loop."""
        progress = ResyncProgress(room_id)
        self.progress[room_id] = progress
        try:
            checkpoint = await self._store.get_checkpoint(room_id)
        except Exception:
            # The checkpoint is informative; never let it hold up a resync.
            logger.warning("Resync of %s: could not read its checkpoint", room_id, exc_info=True)
            checkpoint = None
        if checkpoint:
            logger.info(
                "Resync of %s resumes (last checkpoint: phase %s, %s events persisted)",
                room_id,
                checkpoint.get("phase"),
                checkpoint.get("persisted"),
            )
            progress.retries = progress.retries_before = int(checkpoint.get("retries") or 0)
        run = _RoomResync(
            self._hs, self._config, self._store, self._threadpool, self.checkpool, room_id, progress,
            self.finish_gate,
        )
        run.add_destinations(initial_destination, other_destinations)
        logger_call = self._hs.get_clock().looping_call(
            self._hs.run_as_background_process,
            Duration(seconds=self._config.log_interval_seconds),
            "fastjoin_resync_progress",
            run.log_and_checkpoint,
        )
        running = _Running(run)
        self._running[room_id] = running
        try:
            await self._wal_hold.enter()
            running.task = defer.ensureDeferred(run.run())
            try:
                await running.task
            except defer.CancelledError:
                if not running.aborted:
                    raise
                # Ends normally, so Synapse's wrapper neither reports an error
                # nor restarts it; the module records the abort.
                logger.info("Resync of %s aborted by a server admin", room_id)
        finally:
            logger_call.stop()
            if self._running.get(room_id) is running:
                del self._running[room_id]
            await self._wal_hold.exit()
            if not running.aborted:
                await run.log_and_checkpoint()
            self.progress.pop(room_id, None)
            for observe in self.run_observers:
                observe(progress)
            with PreserveLoggingContext():
                running.ended.callback(None)

    def is_running(self, room_id: str) -> bool:
        """Whether a resync of `room_id` runs in this process now."""
        return room_id in self._running

    def wake(self, room_id: str, via: list[str]) -> bool:
        """Ask `via` first from now on and, if the resync of `room_id` waits
        to retry after a failure, retry now. Returns False if no resync of the
        room runs in this process."""
        running = self._running.get(room_id)
        if running is None or running.aborted:
            return False
        running.run.wake(via)
        return True

    async def abort(self, room_id: str) -> bool:
        """Stop the resync of `room_id` for good: cancel it wherever it is and
        wait until it has ended (it returns normally to Synapse's wrapper).
        Returns False if no resync of the room runs in this process."""
        running = self._running.get(room_id)
        if running is None:
            return False
        if not running.aborted:
            running.aborted = True
            running.run.abort()
            if running.run.phase() in _COOPERATIVE_PHASES:
                # Writing to the database: stop at the next event rather than
                # cancel Synapse's code half-way (unless it takes too long).
                await _first_of(self._hs, running.ended, _COOPERATIVE_ABORT_SECONDS)
            if not running.ended.called and running.task is not None:
                # The run resumes (with CancelledError) in its own context.
                with PreserveLoggingContext():
                    running.task.cancel()
        await make_deferred_yieldable(_observe(running.ended))
        return True


async def _first_of(hs: "HomeServer", d: "defer.Deferred[None]", seconds: float) -> None:
    """Wait until `d` fires or `seconds` pass."""
    if d.called:
        return
    done: "defer.Deferred[None]" = defer.Deferred()

    def fire(_: Any = None) -> None:
        if not done.called:
            done.callback(None)

    d.addBoth(lambda r: (fire(), r)[1])
    timer = hs.get_clock().call_later(Duration(seconds=seconds), fire)
    try:
        await make_deferred_yieldable(done)
    finally:
        if timer.active():
            timer.cancel()


def _observe(d: "defer.Deferred[None]") -> "defer.Deferred[None]":
    """A Deferred that fires when `d` has (without consuming its result)."""
    if d.called:
        return defer.succeed(None)
    out: "defer.Deferred[None]" = defer.Deferred()
    d.addBoth(lambda r: (out.callback(None), r)[1])
    return out


class _RoomResync:
    def __init__(
        self,
        hs: "HomeServer",
        config: "ResyncConfig",
        store: "FastJoinStore",
        threadpool: ThreadPool,
        checkpool: CheckPool,
        room_id: str,
        progress: ResyncProgress,
        finish_gate: FinishGate | None = None,
    ) -> None:
        self._hs = hs
        self._finish_gate = finish_gate
        # For the share of SQLite's connection (storage/connection_share.py):
        # runs of staged live events under way in this process.
        self._live_runs_busy = (lambda: finish_gate.runs_in_flight() > 0) if finish_gate is not None else None
        self._config = config
        self._fastjoin_store = store
        self._threadpool = threadpool
        self._checkpool = checkpool
        self._room_id = room_id
        self._progress = progress
        self._main = hs.get_datastores().main
        self._state_groups = hs.get_datastores().state
        self._storage = hs.get_storage_controllers()
        self._clock = hs.get_clock()
        self._federation_handler = hs.get_federation_handler()
        self._federation_event_handler = hs.get_federation_event_handler()
        self._state_handler = hs.get_state_handler()
        self._notifier = hs.get_notifier()
        self._destinations = FetchPolicy(hs, config, room_id, store)
        self._backoff_level = 0
        # Fired by `wake` to cut the backoff sleep short.
        self._wakeup: "defer.Deferred[None] | None" = None
        # Set by `wake`; cleared as a wait after a failure is announced. A wake
        # that comes between the announcement (phase waiting_to_retry, which
        # the admin API shows) and the sleep itself is not lost.
        self._woken = False
        self._aborted = False
        # Users whose membership event in the room the resync found wrongly
        # accepted or rejected (their cached device lists are suspect).
        self._membership_flipped: set[str] = set()
        self._device_lists = RemoteDeviceListCheck(hs)

    # Destinations.

    def add_destinations(self, first: str | None, others: Collection[str]) -> None:
        # The server we joined through answered us: ask it first.
        self._destinations.add([first], answered=True)
        self._destinations.add(sorted(others))
        self._progress.servers_known = len(self._destinations)

    def wake(self, via: list[str]) -> None:
        """An admin asked for a retry now, through `via` first."""
        if via:
            self._destinations.prefer(via)
            self._progress.servers_known = len(self._destinations)
        self._backoff_level = 0
        logger.info(
            "Resync of %s: retry requested by a server admin%s",
            self._room_id,
            f", asking {via} first" if via else "",
        )
        self._woken = True
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None and not wakeup.called:
            with PreserveLoggingContext():
                wakeup.callback(None)

    def abort(self) -> None:
        """Stop for good, at the next event (or sooner: the engine may cancel
        the run's task)."""
        self._aborted = True
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None and not wakeup.called:
            with PreserveLoggingContext():
                wakeup.callback(None)

    def phase(self) -> str:
        return self._progress.phase

    async def _sleep_unless_woken(self, seconds: float) -> None:
        """Sleep `seconds`, or until `wake` is called (or was, since the wait
        was announced)."""
        if self._woken or self._aborted:
            if self._aborted:
                raise defer.CancelledError()
            return
        wakeup: "defer.Deferred[None]" = defer.Deferred()
        self._wakeup = wakeup

        def expire() -> None:
            if not wakeup.called:
                wakeup.callback(None)

        timer = self._clock.call_later(Duration(seconds=seconds), expire)
        try:
            await make_deferred_yieldable(wakeup)
            if self._aborted:
                raise defer.CancelledError()
        finally:
            if self._wakeup is wakeup:
                self._wakeup = None
            if timer.active():
                timer.cancel()

    async def _refresh_destinations(self) -> None:
        """Add the servers the room's (partial) state shows as joined."""
        try:
            hosts = await self._main.get_current_hosts_in_room_ordered(self._room_id)
        except Exception as e:
            logger.warning("Resync of %s: could not list hosts in room: %s", self._room_id, e)
            return
        added = self._destinations.add(hosts)
        self._progress.servers_known = len(self._destinations)
        if added:
            logger.info(
                "Resync of %s: %d more servers from the room state, %d known",
                self._room_id,
                added,
                len(self._destinations),
            )

    # The loop.

    async def run(self) -> None:
        logger.info(
            "Resync of %s starts (synapse-fastjoin engine), %d servers to ask: %s",
            self._room_id,
            len(self._destinations),
            self._destinations.describe(),
        )
        if len(self._destinations) >= _BIG_ROOM_SERVERS:
            # A room on this many servers is a big one: the check processes
            # start importing Synapse now, while /state_ids is asked for, not
            # once its answer shows how big (saves their start-up time).
            self._checkpool.warm_up()
            # And the servers' signing keys are asked of the notaries now,
            # not chunk by chunk as the state reveals them.
            start_key_prefetch(self._hs, self._room_id, self._destinations.names())
        while True:
            try:
                if self._aborted:
                    raise defer.CancelledError()
                if not await self._main.is_partial_state_room(self._room_id):
                    logger.info(
                        "Resync of %s: the room is not partial-state any more", self._room_id
                    )
                    self._progress.set_phase(PHASE_DONE)
                    return
                if await self._one_pass():
                    self._progress.set_phase(PHASE_DONE)
                    return
                self._backoff_level = 0
            except defer.CancelledError:
                raise
            except Exception as e:
                if self._aborted:
                    # Code that took the cancellation for a failed request.
                    raise defer.CancelledError() from e
                try:
                    await self._after_failure(e)
                except RoomLeft:
                    logger.info(
                        "Resync of %s stops after %s: no local user is in the room any more",
                        self._room_id,
                        f"{type(e).__name__}: {e}",
                    )
                    return

    async def _after_failure(self, error: Exception) -> None:
        # Servers refuse state to a server that left the room, so failing after
        # our last user left is expected: stop, as Synapse does, leaving the
        # room partial (a rejoin starts a new resync). While everything works
        # the resync goes on to the end even after a leave, as Synapse's does.
        try:
            joined = await self._main.is_host_joined(self._room_id, self._hs.hostname)
        except Exception:
            joined = True  # cannot tell (database trouble): keep trying
        if not joined:
            raise RoomLeft() from error
        self._progress.retries += 1
        self._progress.count_failure(error)
        self._progress.last_error = f"{type(error).__name__}: {error}"
        if isinstance(error, NoServerAnswered):
            logger.warning("Resync of %s: %s", self._room_id, error)
        else:
            logger.warning("Resync of %s failed", self._room_id, exc_info=error)
        await self._refresh_destinations()
        delay = min(
            self._config.backoff_max_seconds,
            self._config.backoff_initial_seconds * (2 ** self._backoff_level),
        )
        delay *= random.uniform(0.8, 1.2)
        self._backoff_level = min(self._backoff_level + 1, 30)
        self._progress.next_retry_ts = int((time.time() + delay) * 1000)
        self._woken = False
        self._progress.set_phase(PHASE_WAITING)
        logger.info("Resync of %s: next attempt in %.0f s", self._room_id, delay)
        await self._checkpoint()
        await self._sleep_unless_woken(delay)
        self._progress.next_retry_ts = None

    async def _one_pass(self) -> bool:
        """Bring every partial-state event up to full state, then finish.
        Returns True once the room is done; False to go round again.

        The finish gate is closed once the state at the join is stored and
        reopened when the pass ends, however it ends."""
        try:
            return await self._one_pass_gated()
        finally:
            if self._finish_gate is not None:
                self._finish_gate.reopen(self._room_id)

    async def _one_pass_gated(self) -> bool:
        self._progress.set_phase(PHASE_STARTING)
        # Servers that failed in the last attempt get another chance.
        self._destinations.new_round()
        if not await self._catch_up_all():
            return True
        return await self._finish()

    async def _catch_up_all(self) -> bool:
        """Brings every partial-state event of the room up to full state (the
        join event first, with the fetch of the state at it). Returns False
        if the room turned out not to be partial-state any more."""
        while True:
            batch = await self._partial_state_events_in_order()
            self._progress.catchup_remaining = len(batch)
            if not batch:
                break
            progressed = False
            i = 0
            while i < len(batch):
                if self._aborted:
                    raise defer.CancelledError()
                if not await self._main.is_partial_state_room(self._room_id):
                    return False
                # Runs of events whose parents are stored with full state (or
                # earlier in the run) go in batches; anything else (the join
                # event, gaps, forks) one at a time through the general path.
                run_started = time.monotonic()
                done = await self._catch_up_run(batch[i : i + _RUN_LENGTH])
                self._progress.catchup_seconds += time.monotonic() - run_started
                if done == 0:
                    done = 1 if await self._un_partial_event(batch[i]) else 0
                    i += 1
                else:
                    i += done
                if done:
                    progressed = True
                    if self._progress.catchup_remaining:
                        self._progress.catchup_remaining = max(
                            0, self._progress.catchup_remaining - done
                        )
            if not progressed:
                # Every remaining event waits on a partial prev event that is
                # not in our list yet (it is being persisted right now).
                await self._clock.sleep(Duration(seconds=1))
        return True

    async def _partial_state_events_in_order(self) -> list[EventBase]:
        """The room's partial-state events, parents before children (by depth,
        then stream order), a page at a time."""
        ids = await self._main.db_pool.runInteraction(
            "fastjoin_partial_state_events",
            partial_state_events_in_order_txn,
            self._room_id,
            self._config.catchup_batch_size,
        )
        return await self._main.get_events_as_list(
            ids, redact_behaviour=EventRedactBehaviour.as_is, allow_rejected=True
        )

    async def _un_partial_event(self, event: EventBase) -> bool:
        """Recompute the state at one partial-state event from full state and
        re-check its auth. Returns False if it must wait for a parent."""
        prevs = set(event.prev_event_ids())
        seen = await self._main.have_events_in_timeline(prevs)
        missing = prevs - seen
        if seen:
            partial_prevs = await self._main.get_partial_state_events(seen)
            if any(partial_prevs.values()):
                return False
        with nested_logging_context(suffix=event.event_id):
            if missing:
                self._progress.set_phase(PHASE_RESOLVING)
                context = await self._context_from_fetched_state(event, missing, seen)
            else:
                self._progress.set_phase(PHASE_CATCHUP)
                context = await self._state_handler.compute_event_context(event)
            if context.partial_state:
                return False
            # Re-check auth against the full state: an event accepted or
            # rejected against the partial state may have been wrongly so.
            await self._federation_event_handler._check_event_auth(None, event, context)
            self._note_rejection_flip(event, context)
            self._hold_partial_flags([event])
            await self._main.update_state_for_partial_state_event(event, context)
            self._storage.state.notify_event_un_partial_stated(event.event_id)
            self._notifier.notify_replication()
        if missing and self._finish_gate is not None:
            # The state at the join is stored: what is left takes seconds, and
            # a run checked against partial state now would straddle it.
            self._finish_gate.close(self._room_id)
        if not missing:
            self._progress.catchup_done += 1
        return True

    async def _catch_up_run(self, events: list[EventBase]) -> int:
        """Bring the longest prefix of `events` whose parents all have full state
        (stored, or earlier in the prefix) and share one state group up to full
        state, in one write. Returns how many events it did (0: the first needs
        the general path).

        Each event's state is its parents' state plus itself (the single-group
        case of Synapse's compute_event_context, computed here without waiting
        for the previous event's write), and its auth is re-checked against it
        with Synapse's own `_check_event_auth`.

        The state groups of the run's state events are written first, in one
        transaction (`store_state_group_chain_txn`: the rows Synapse's
        `store_state_group` writes), chained on the verdicts as they stand; a
        changed verdict ends the run right after its event (see below), so
        every event checked has the state its verdicts give, and the groups
        written for state events after it are removed (all of them if a
        check fails). Before the checks, Synapse's caches are filled for the
        whole run at once (`_warm_run`): one read of the run's auth events,
        and one of the auth state before its first event, from which that of
        the run's own groups follows by their deltas.
        """
        in_run = {ev.event_id for ev in events}
        outside = {p for ev in events for p in ev.prev_event_ids()} - in_run
        in_timeline = await self._main.have_events_in_timeline(outside)
        partial = await self._main.get_partial_state_events(in_timeline)
        usable = {p for p in in_timeline if not partial.get(p, True)}
        groups: dict[str, int] = {}
        if usable:
            groups = dict(
                await self._storage.state.get_state_group_for_events(
                    usable, await_full_state=False
                )
            )
        # The plan: per event its state group before, and for a state event
        # its own group (a group of the chain: -1 - its index). Stored groups
        # are >= 0.
        after: dict[str, int] = {}
        chain: list[ChainItem] = []
        plan: list[tuple[EventBase, int, int | None]] = []
        for event in events:
            before_groups = set()
            for prev in event.prev_event_ids():
                group = after.get(prev, groups.get(prev))
                if group is None:
                    before_groups = set()
                    break
                before_groups.add(group)
            if len(before_groups) != 1:
                break
            (before,) = before_groups
            own = None
            if event.is_state():
                delta = {(event.type, event.state_key): event.event_id}
                chain.append(
                    (event.event_id, before if before >= 0 else ChainRef(-1 - before), delta)
                )
                own = -len(chain)
                after[event.event_id] = before if event.rejected_reason is not None else own
            else:
                after[event.event_id] = before
            plan.append((event, before, own))
        if not plan:
            return 0

        written: list[int] = []
        if chain:
            written = await self._state_groups.db_pool.runInteraction(
                "fastjoin_catch_up_state_groups",
                store_state_group_chain_txn,
                self._state_groups,
                self._room_id,
                chain,
            )
            if len(written) < len(chain):
                # The next group is stored whole (its delta chain is at the
                # limit): by Synapse, and the run ends with its event.
                event_id, prev, delta = chain[len(written)]
                prev_group = written[prev.index] if isinstance(prev, ChainRef) else prev
                written.append(
                    await self._storage.state.store_state_group(
                        event_id,
                        self._room_id,
                        prev_group=prev_group,
                        delta_ids=delta,
                        current_state_ids=None,
                    )
                )
                last = next(i for i, (ev, _, _) in enumerate(plan) if ev.event_id == event_id)
                del plan[last + 1 :]

        def group_of(ref: int) -> int:
            return ref if ref >= 0 else written[-1 - ref]

        pending: list[tuple[EventBase, EventContext]] = []
        try:
            await self._warm_run(plan, chain, written)
            for event, before_ref, own in plan:
                before = group_of(before_ref)
                if own is not None:
                    after_group = group_of(own)
                    delta = {(event.type, event.state_key): event.event_id}
                    context = EventContext.with_state(
                        storage=self._storage,
                        state_group=after_group,
                        state_group_before_event=before,
                        state_delta_due_to_event=delta,
                        partial_state=False,
                        state_group_deltas={(before, after_group): delta},
                    )
                else:
                    context = EventContext.with_state(
                        storage=self._storage,
                        state_group=before,
                        state_group_before_event=before,
                        state_delta_due_to_event={},
                        partial_state=False,
                        state_group_deltas={},
                    )
                with nested_logging_context(suffix=event.event_id):
                    await self._federation_event_handler._check_event_auth(None, event, context)
                pending.append((event, context))
                if self._note_rejection_flip(event, context):
                    # The run's writes come at its end: a later event whose auth
                    # events include this one would be checked against its old
                    # rejection status, and its state group was chained on it.
                    # End the run here.
                    break
        except BaseException:
            # Nothing refers to the groups written for this run yet.
            if written:
                try:
                    await self._state_groups.db_pool.runInteraction(
                        "fastjoin_catch_up_unused_state_groups",
                        delete_unused_groups_txn,
                        self._state_groups,
                        written,
                    )
                except Exception:
                    logger.warning(
                        "Resync of %s: could not remove unused state groups %s",
                        self._room_id,
                        written,
                        exc_info=True,
                    )
            raise
        unused = [group_of(own) for _, _, own in plan[len(pending) :] if own is not None]
        if unused:
            await self._state_groups.db_pool.runInteraction(
                "fastjoin_catch_up_unused_state_groups",
                delete_unused_groups_txn,
                self._state_groups,
                unused,
            )
        self._progress.set_phase(PHASE_CATCHUP)
        store = self._main
        async with store._un_partial_stated_events_stream_id_gen.get_next_mult(
            len(pending)
        ) as stream_ids:

            def write(txn: Any) -> None:
                # Synapse's `_update_state_for_partial_state_event_txn` for
                # each event, in a few statements for all of them (and the
                # replication listeners woken once, not once per event).
                un_partial_state_events_txn(
                    txn,
                    store,
                    [(event, context, stream_id) for (event, context), stream_id in zip(pending, stream_ids)],
                )

            self._hold_partial_flags([event for event, _ in pending])
            await store.db_pool.runInteraction("fastjoin_un_partial_state_events", write)
        for event, _ in pending:
            self._storage.state.notify_event_un_partial_stated(event.event_id)
        self._notifier.notify_replication()
        self._progress.catchup_done += len(pending)
        return len(pending)

    async def _warm_run(
        self,
        plan: list[tuple[EventBase, int, int | None]],
        chain: list[ChainItem],
        written: list[int],
    ) -> None:
        """Fill Synapse's caches for the checks of a run, so that
        `_check_event_auth` finds there what it would otherwise read event by
        event: the run's auth events (one read), and the state before each
        event at the keys its auth needs (`auth_types_for_event`).

        The state is read once, at the union of those keys, for the group
        before the run's first event (`state_at_keys_txn`: only those rows);
        each group of the run is a delta over the one before it, so its state
        at those keys is that group's with its own delta applied. Both go into
        Synapse's state-group caches as Synapse's own reads put them there:
        the values found, every other key of the union known absent (its
        cache sequence read before the read, as Synapse does)."""
        events = [ev for ev, _, _ in plan]
        auth_ids = {a for ev in events for a in ev.auth_event_ids()}
        keys: set[tuple[str, str]] = set()
        for ev in events:
            keys.update(auth_types_for_event(ev.room_version, ev))
        first = plan[0][1]
        assert first >= 0
        store = self._state_groups
        members_cache = store._state_group_members_cache
        others_cache = store._state_group_cache
        sequences = (members_cache.sequence, others_cache.sequence)
        state = await store.db_pool.runInteraction(
            "fastjoin_catch_up_auth_state", state_at_keys_txn, first, keys
        )
        by_group = {first: state}
        for (_, prev, delta), group in zip(chain, written):
            prev_group = written[prev.index] if isinstance(prev, ChainRef) else prev
            at_prev = by_group.get(prev_group)
            if at_prev is None:
                continue
            at_group = dict(at_prev)
            at_group.update((k, v) for k, v in delta.items() if k in keys)
            by_group[group] = at_group
        member_keys = {k for k in keys if k[0] == EventTypes.Member}
        other_keys = keys - member_keys
        for group, at_group in by_group.items():
            members_cache.update(
                sequences[0],
                key=group,
                value={k: v for k, v in at_group.items() if k in member_keys},
                fetched_keys=member_keys,
            )
            others_cache.update(
                sequences[1],
                key=group,
                value={k: v for k, v in at_group.items() if k in other_keys},
                fetched_keys=other_keys,
            )
            auth_ids.update(at_group.values())
        if auth_ids:
            await self._main.get_events(auth_ids, allow_rejected=True)

    def _hold_partial_flags(self, events: list[EventBase]) -> None:
        """Before events are written as un-partial-stated: their cached
        partial flag is set (True, what the database says until the write
        commits), so that it and their cached state group change together.

        Synapse computes a new event's context from its parents' partial
        flags (read first, from the database unless cached: persisting an
        event does not cache its flag) and then their state groups (cached
        when they were persisted). The write updates both in the database,
        but the caches only once the reactor runs the transaction's
        after-commit callbacks: an event whose context is computed in
        between would read the new flag (not partial) with the old, partial
        state group, and be checked against the partial state as if it were
        the full one (rejected: "not in room", and every event after it with
        it). Seen on PostgreSQL under a burst of live events, where the
        reads run on other connections while the write commits. With the
        flag cached, a reader sees "partial" until the callbacks set the new
        group and clear the flag, one after the other, in one reactor turn.
        """
        for event in events:
            self._main.is_partial_state_event.prefill((event.event_id,), True)

    def _note_rejection_flip(self, event: EventBase, context: EventContext) -> bool:
        """Whether the re-check changed the event's rejection status; a
        membership event's user is remembered then."""
        if bool(context.rejected) == (event.rejected_reason is not None):
            return False
        if event.type == "m.room.member" and event.state_key is not None:
            self._membership_flipped.add(event.state_key)
        return True

    async def _context_from_fetched_state(
        self, event: EventBase, missing_prevs: set[str], seen_prevs: Collection[str]
    ) -> Any:
        room_version = await self._main.get_room_version(self._room_id)
        fetcher = StateFetcher(
            self._hs,
            self._config,
            self._room_id,
            room_version,
            self._destinations,
            self._progress,
            self._threadpool,
            self._checkpool,
            self._live_runs_busy,
        )
        state_maps = []
        # The check processes are not needed after the fetch: the end steps
        # (resolution, the join's state group, the current state) get their memory.
        with self._checkpool.holding():
            for prev in sorted(missing_prevs):
                state_maps.append(await fetcher.fetch_state_after(prev))
        self._progress.set_phase(PHASE_RESOLVING)
        if seen_prevs:
            ours = await self._storage.state.get_state_groups_ids(
                self._room_id, seen_prevs, await_full_state=False
            )
            state_maps.extend(ours.values())
        if len(state_maps) == 1:
            state_map = state_maps[0]
        else:
            state_map = await self._hs.get_state_resolution_handler().resolve_events_with_store(
                self._room_id,
                room_version.identifier,
                state_maps,
                event_map={event.event_id: event},
                state_res_store=StateResolutionStore(
                    self._main, self._hs.get_datastores().state_deletion
                ),
            )
        del state_maps
        logger.info(
            "Resync of %s: full state at %s has %d entries",
            self._room_id,
            event.event_id,
            len(state_map),
        )
        return await self._state_handler.compute_event_context(
            event, state_ids_before_event=state_map, partial_state=False
        )

    async def _finish(self) -> bool:
        """What Synapse does once every event has full state. Returns False if
        a new partial-state event raced in (go round again)."""
        room_id = self._room_id
        self._progress.set_phase(PHASE_FINISHING)
        gate = self._finish_gate
        if gate is not None:
            gate.close(room_id)
            if gate.in_flight(room_id):
                if not await gate.wait_for_runs(room_id):
                    logger.info(
                        "Resync of %s: a run of staged events is still being checked against "
                        "the partial state; going on without it",
                        room_id,
                    )
                # Events the runs persisted with partial state are caught up
                # first (the gate stays closed: no new ones).
                if not await self._catch_up_all():
                    return True
        joined_while_partial = await self._device_lists.remote_joined_users(room_id)
        logger.info("Resync of %s: updating current state", room_id)
        if self._config.current_state_chunk_size:
            await update_current_state(self._hs, room_id, self._config.current_state_chunk_size)
        else:
            await self._state_handler.update_current_state(room_id)
        logger.info("Resync of %s: replaying pending device list updates", room_id)
        await self._hs.get_device_handler().handle_room_un_partial_stated(room_id)
        # Before the room counts as full (clients waiting on it go on at once):
        # device lists cached on memberships the full state contradicts.
        try:
            await self._device_lists.correct(
                room_id, joined_while_partial, self._membership_flipped
            )
        except Exception:
            logger.exception(
                "Resync of %s: checking cached remote device lists failed", room_id
            )
        async with self._federation_handler._is_partial_state_room_linearizer.queue(room_id):
            new_stream_id = await self._main.clear_partial_state_room(room_id)
        if new_stream_id is None:
            logger.info("Resync of %s: more partial-state events arrived; going on", room_id)
            return False
        self._storage.state.notify_room_un_partial_stated(room_id)
        await self._notifier.on_un_partial_stated_room(room_id, new_stream_id)
        logger.info("Resync of %s complete: %s", room_id, self._progress.summary())
        if self._progress.catchup_done:
            logger.info(
                "Resync of %s: caught up %d events that arrived while partial in %.1f s",
                room_id,
                self._progress.catchup_done,
                self._progress.catchup_seconds,
            )
        return True

    # Progress.

    async def log_and_checkpoint(self) -> None:
        logger.info("Resync of %s: %s", self._room_id, self._progress.summary())
        await self._checkpoint()

    async def _checkpoint(self) -> None:
        await self._destinations.save()
        try:
            await self._fastjoin_store.save_checkpoint(self._room_id, self._progress.as_json())
        except Exception:
            logger.warning("Resync of %s: could not save the checkpoint", self._room_id, exc_info=True)
