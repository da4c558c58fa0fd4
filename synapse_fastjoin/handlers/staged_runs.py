# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""A room's staged inbound events processed in runs (patch 0027).

Synapse processes a room's staged inbound events one at a time
(FederationServer `_process_incoming_pdus_in_room_inner`, then
`FederationEventHandler.on_receive_pdu`), about thirty database transactions
each. On SQLite every transaction of the process waits for the one
connection, so a backlog drains at some 40 events a second on an idle server,
and far slower while a resync writes. A backlog is what a busy room leaves
while it resyncs, and what a burst leaves at any time.

Patch 0027 offers the module the next staged event first. When it heads a
*run*, the module processes the run together and does for each event what
`on_receive_pdu` would, with Synapse's own functions; what it saves is the
per-event overhead around them: one staging read for the run, one
`persist_events` call (one forward-extremity update, one stream allocation,
one wake of the notifier and of the replication listeners), one push-rule
pass, and one transaction for the staging deletes and the forward-extremity
history.

A run is a chain of events that `on_receive_pdu` would take down its plain
path, for which the outcome of processing them one after another is known
before any of them is persisted:

- the first event's prev events are exactly the room's forward extremities,
  and each next event's only prev event is the event before it. So no prev
  event is missing (no `get_missing_events`), and after each event Synapse's
  extremities would be that event alone: the next event's soft-fail check
  returns at once in Synapse's path (its prev events are the extremities),
  as it does in partial-state rooms (no soft-fail while partial);
- every event is a non-state event other than a redaction, is not yet
  stored (not even as an outlier), passes `_sanity_check_event`, has every
  auth event stored (so `_check_event_auth` asks no other server; before
  that, the auth chains Synapse's `_check_event_auth` would fetch for the
  run's events, such as their senders' memberships in a partial-state room,
  are fetched for several events at once, as Synapse fetches them, and
  stored together; those of the next run are fetched while a run is
  checked and written, `_prefetch_auth_chains`), is not referenced as a
  prev event by a stored event (which would change the extremities), and
  does not relate (`m.relates_to`) to an event of the run;
- the spam checker's `should_drop_federated_event` keeps every event after
  the first (Synapse asked for the first);
- `_check_event_auth` accepts each one, except perhaps the last: an event it
  rejects is persisted rejected (as Synapse would: no push actions, nothing
  run after it) and ends the run; what follows it is left to Synapse.

The state before a non-state event is the state after its prev event, so
every event of a run has the first one's state group: the first event's
context is Synapse's `compute_event_context`; each next one is what
`compute_event_context` would build from its prev event (Synapse's
`UnpersistedEventContext` with the group, the group's delta from Synapse's
`get_state_group_delta`, and the first event's partial-state flag, which is
what `get_partial_state_events` gives for a prev event persisted with it).

An event the run cannot take ends the run; it and what follows are left to
Synapse's own path, and the next run may start after it. A chain of one event
is not worth it: the event is left to Synapse. Once the first context is
computed the run is persisted, however short the auth checks leave it (the
context may have stored a state group, which Synapse's path would store
again). If the run's persistence fails
(the room was un-partial-stated meanwhile, say), the run is given back to
Synapse whole: its push actions are removed and nothing was removed from the
staging area, so `on_receive_pdu` processes the first event afresh. So is a
run during which another path stored an event in the room (the room's
forward extremities are read again just before the write): a local user's
ban, say, after which Synapse's path checks the banned user's events for
soft-failure.
`tests/unit/test_staged_runs_parity.py` drains the same staged events through
Synapse's path and through runs into two databases and compares the rows.
"""

import logging
import time
from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure

from synapse.api.constants import EventTypes
from synapse.api.errors import (
    AuthError,
    PartialStateConflictError,
    SynapseError,
)
from synapse.event_auth import auth_types_for_event
from synapse.events import EventBase, make_event_from_dict, relation_from_event
from synapse.events.snapshot import EventContext, UnpersistedEventContext
from synapse.federation.federation_server import pdu_process_time
from synapse.logging.context import make_deferred_yieldable, run_in_background
from synapse.metrics import SERVER_NAME_LABEL
from synapse.storage._base import db_to_json
from synapse.storage.engines import Sqlite3Engine
from synapse.types.state import StateFilter
from synapse.util.async_helpers import concurrently_execute
from synapse.util.duration import Duration

from synapse_fastjoin.federation.event_auth import AuthChainFetch, fetch_auth_chains
from synapse_fastjoin.storage.events import get_events_without_waiting
from synapse_fastjoin.storage.push_actions import StagedPushActions
from synapse_fastjoin.storage.store import FastJoinStore

if TYPE_CHECKING:
    from synapse.server import HomeServer

    from synapse_fastjoin.resync.finish_gate import FinishGate

logger = logging.getLogger(__name__)

# Runs shorter than this are left to Synapse: nothing to save.
_MIN_RUN = 2
# Auth chains fetched at once for a run's events (see _fetch_missing_auth_events).
_AUTH_FETCH_CONCURRENCY = 10
# At most this many events whose auth chains a run refused are remembered.
_REFUSED_KEPT = 10_000
# A run's auth checks, and its push-rule evaluations, made at once on
# PostgreSQL (each may hold one of the database pool's connections: Synapse's
# default pool has 10). On SQLite, whose one connection runs every
# transaction in turn, one at a time: more only queues the run's reads ahead
# of the resync's writes.
_CHECK_CONCURRENCY = 5
_CHECK_CONCURRENCY_SQLITE = 1
# A run's steps go through its events one after another on the reactor, and
# where every read finds its answer in a cache nothing suspends: a run of
# hundreds of events held the reactor for hundreds of milliseconds at a time
# (its push-rule evaluations, its checks), while every request of the server
# waited. The steps give the reactor back once they have held it this long.
_REACTOR_SLICE_S = 0.02


class _ExtremitiesMoved(Exception):
    """The room's forward extremities changed while a run was checked."""


async def _parse_staged(rows: list[Any], room_version: Any, slices: "_Slices") -> list[tuple[str, EventBase]]:
    """(origin, event) of staged rows (`next_staged_events`), as Synapse's
    `get_next_staged_event_for_room` builds them."""
    parsed = []
    for origin, _event_id, event_json, internal_metadata in rows:
        await slices.take_turn()
        parsed.append(
            (
                origin,
                make_event_from_dict(
                    event_dict=db_to_json(event_json),
                    room_version=room_version,
                    internal_metadata_dict=db_to_json(internal_metadata),
                ),
            )
        )
    return parsed


class _Slices:
    """Gives the reactor back to the rest of the server every
    `_REACTOR_SLICE_S` of a run's steps (shared by the steps' concurrent
    tasks: the time counts from the last time any of them gave it back)."""

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._since = time.monotonic()
        self.turns = 0
        """Times the reactor was given back."""

    async def take_turn(self) -> None:
        if time.monotonic() - self._since >= _REACTOR_SLICE_S:
            self.turns += 1
            await self._clock.sleep(Duration(seconds=0))
            self._since = time.monotonic()


class _Phases:
    """Seconds a run spent in each of its phases, for its log line."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._nested: dict[str, float] = {}

    def done(self, name: str, started: float, within: str | None = None) -> float:
        """Record `name` as having run from `started` until now (inside the
        phase `within`, whose own figure leaves it out); returns now."""
        now = time.monotonic()
        self._seconds[name] = self._seconds.get(name, 0.0) + now - started
        if within is not None:
            self._nested[within] = self._nested.get(within, 0.0) + now - started
        return now

    def total(self) -> float:
        return sum(self._seconds.values()) - sum(self._nested.values())

    def __str__(self) -> str:
        return ", ".join(
            f"{name} {seconds - self._nested.get(name, 0.0):.2f}" for name, seconds in self._seconds.items()
        )


class StagedRunStats:
    """Counts for the metrics: runs processed, events in them."""

    def __init__(self) -> None:
        self.runs = 0
        self.events = 0
        self.given_back = 0
        # Events whose auth chains were fetched ahead of their run.
        self.chains_ahead = 0
        # Times the runs gave the reactor back (`_REACTOR_SLICE_S`).
        self.reactor_turns = 0


class StagedRuns:
    def __init__(
        self, hs: "HomeServer", store: FastJoinStore, run_length: int, gate: "FinishGate | None" = None
    ) -> None:
        self._hs = hs
        self._store = store
        self._run_length = run_length
        # The resync engine's (this process runs resyncs): keeps runs checked
        # against partial state out of the end of a resync (resync/finish_gate.py).
        self._gate = gate
        self.stats = StagedRunStats()
        self._ready = False
        # Events whose auth chains came with staged events in them
        # (`_fetch_missing_auth_events`): left to Synapse's path.
        self._refused: set[str] = set()

    def _setup(self) -> None:
        # Synapse's handlers are made when first asked for: not while the
        # module is being loaded.
        hs = self._hs
        self._main = hs.get_datastores().main
        self._persist_store = hs.get_datastores().persist_events
        self._storage = hs.get_storage_controllers()
        self._state_handler = hs.get_state_handler()
        self._state_deletion = hs.get_datastores().state_deletion
        self._federation_event_handler = hs.get_federation_event_handler()
        self._event_auth_handler = hs.get_event_auth_handler()
        self._spam_checker = hs.get_module_api_callbacks().spam_checker
        self._push_evaluator = hs.get_bulk_push_rule_evaluator()
        self._server_name = hs.hostname
        self._instance_name = hs.get_instance_name()
        self._clock = hs.get_clock()
        self._concurrency = (
            _CHECK_CONCURRENCY_SQLITE if isinstance(self._main.database_engine, Sqlite3Engine) else _CHECK_CONCURRENCY
        )
        self._ready = True

    async def process_staged_run(self, origin: str, event: EventBase, room_version: Any) -> bool:
        """Patch 0027's callback: process the run `event` heads, or say no."""
        if not self._ready:
            self._setup()
        room_id = event.room_id
        if self._hs.config.worker.events_shard_config.get_instance(room_id) != self._instance_name:
            return False
        if room_id in self._federation_event_handler.room_queues:
            return False
        gate = self._gate
        if gate is not None and await self._main.is_partial_state_room(room_id):
            if not await gate.wait_open(room_id):
                logger.debug("Staged events of %s waited for the end of its resync", room_id)
            if await self._main.is_partial_state_room(room_id):
                async with gate.partial_run(room_id):
                    return await self._process(origin, event, room_version)
        return await self._process(origin, event, room_version)

    async def _process(self, origin: str, event: EventBase, room_version: Any) -> bool:
        """A run from `event`, or False: Synapse's path takes `event`. A
        failure gives the run back too, counted as such (patch 0027's caller
        would log it and fall back to Synapse's path by itself)."""
        try:
            return await self._process_run(origin, event, room_version)
        except Exception:
            self.stats.given_back += 1
            logger.warning(
                "Run of staged events from %s in %s given back after an error", event.event_id, event.room_id,
                exc_info=True,
            )
            return False

    async def _process_run(self, origin: str, event: EventBase, room_version: Any) -> bool:
        room_id = event.room_id
        phases = _Phases()
        started = time.monotonic()
        staged = await self._store.next_staged_events(room_id, self._run_length)
        if len(staged) < _MIN_RUN or (staged[0][0], staged[0][1]) != (origin, event.event_id):
            return False
        slices = _Slices(self._clock)
        candidates = [(origin, event), *await _parse_staged(staged[1:], room_version, slices)]
        extremities = await self._main.get_latest_event_ids_in_room(room_id)
        run = await self._chain(room_id, extremities, candidates, phases)
        started = phases.done("chain", started)
        if len(run) < _MIN_RUN:
            logger.debug("No run from %s in %s: a chain of %d", event.event_id, room_id, len(run))
            return False
        if not await self._event_auth_handler.is_host_in_room(room_id, self._server_name):
            return False
        # The next run's auth chains are fetched while this one is checked
        # and written (`_prefetch_auth_chains`); the run ends when both have.
        ahead = run_in_background(self._prefetch_auth_chains, room_id, room_version, run)
        # The auth events the checks read stay in memory until the run is
        # written: its push-rule evaluations read the power levels and the
        # senders' memberships again (`_authorised`).
        held: list[Any] = []
        try:
            checked = await self._authorised(run, held, slices)
            phases.done("checks", started)
            persisted = bool(checked) and await self._persist(room_id, extremities, checked, phases, slices)
        finally:
            held.clear()
            waited = time.monotonic()
            await make_deferred_yieldable(ahead)
            phases.done("wait for the next chains", waited)
        self.stats.reactor_turns += slices.turns
        if persisted:
            logger.info(
                "Processed a run of %d staged events in %s (%s .. %s) in %.2f s: %s; reactor given back %d times",
                len(checked),
                room_id,
                checked[0][1].event_id,
                checked[-1][1].event_id,
                phases.total(),
                phases,
                slices.turns,
            )
        return persisted

    async def _prefetch_auth_chains(
        self, room_id: str, room_version: Any, run: list[tuple[str, EventBase]]
    ) -> None:
        """Fetch ahead the auth chains the room's next run will need, while
        `run` is checked and written.

        The next run, if `run` is written whole, is a chain of the staged
        events after it, on `run`'s last event. For the events of that chain
        (as `_linked` finds it now, without asking the spam checker, which
        the next run asks as before) with auth events we do not hold, the
        chains are fetched and persisted as `_fetch_missing_auth_events`
        does for a run, so that the next run finds them stored and asks no
        server (Synapse's `_check_event_auth` fetches an event's chain when
        it comes to the event, and finds stored what was fetched before).
        An answer that holds an event of `run` or of that chain (other than
        the event asked about) is not taken, nor are the answers after it,
        as in a run's own fetch (`_fetch_missing_auth_events`).

        What may differ from Synapse's path, one event at a time: the chain
        of an event that is then not processed as the guess had it is stored
        all the same. The events are staged, so Synapse's path processes
        them after `run` whatever happens to it (given back, or written),
        and fetches those chains then, unless it drops the event first: when
        the spam checker, which kept the event when it was staged, drops it
        when it comes up, or when it turns out already stored. Then the
        chain (valid events of the room, checked as Synapse checks them) is
        stored where Synapse's path would not have fetched it.

        A failure only logs: the next run then fetches what it needs itself."""
        try:
            # Read again rather than kept from the run's own read: the events
            # staged while the run's chain was found (its own requests take a
            # second or more) are the ones the next run will start with.
            staged = await self._store.next_staged_events(room_id, len(run) + self._run_length)
            if [row[1] for row in staged[: len(run)]] != [ev.event_id for _, ev in run]:
                return
            candidates = await _parse_staged(staged[len(run) :], room_version, _Slices(self._clock))
            if len(candidates) < _MIN_RUN:
                return
            following = await self._linked(
                room_id, candidates, frozenset((run[-1][1].event_id,)), ask_spam_checker=False
            )
            if len(following) < _MIN_RUN:
                return
            auth_ids = {a for _, ev in following for a in ev.auth_event_ids()}
            have = await self._main.have_seen_events(room_id, auth_ids)
            if auth_ids <= have:
                return
            phases = _Phases()
            started = time.monotonic()
            await self._fetch_missing_auth_events(
                following, have, phases, exclude=frozenset(ev.event_id for _, ev in run), ahead=True
            )
            logger.info(
                "Auth chains ahead of a run in %s: %.2f s (%s)", room_id, time.monotonic() - started, phases
            )
        except Exception:
            logger.warning("Fetching auth chains ahead of a run in %s failed", room_id, exc_info=True)

    async def _linked(
        self,
        room_id: str,
        candidates: list[tuple[str, EventBase]],
        first_prevs: frozenset[str],
        ask_spam_checker: bool = True,
    ) -> list[tuple[str, EventBase]]:
        """The longest prefix of `candidates` that is a chain a run takes
        (module docstring) and whose first event's prev events are exactly
        `first_prevs`, apart from its auth events and the auth checks. The
        spam checker is asked for every event after the first unless
        `ask_spam_checker` is False (a look ahead that decides nothing,
        `_prefetch_auth_chains`)."""
        run: list[tuple[str, EventBase]] = []
        in_run: set[str] = set()
        for i, (origin, ev) in enumerate(candidates):
            if ev.room_id != room_id or ev.is_state() or ev.type == EventTypes.Redaction:
                break
            if ev.internal_metadata.is_outlier():
                break
            prevs = ev.prev_event_ids()
            if i == 0:
                if set(prevs) != first_prevs:
                    break
            elif prevs != [run[-1][1].event_id]:
                break
            relation = relation_from_event(ev)
            if relation is not None and relation.parent_id in in_run:
                break
            try:
                self._federation_event_handler._sanity_check_event(ev)
            except SynapseError:
                break
            if i > 0 and ask_spam_checker and await self._spam_checker.should_drop_federated_event(ev):
                break
            run.append((origin, ev))
            in_run.add(ev.event_id)
        if not run:
            return run
        ids = [ev.event_id for _, ev in run]
        seen = await self._main.have_seen_events(room_id, ids)
        referenced = set(await self._persist_store._get_events_which_are_prevs(ids))
        for i, (_, ev) in enumerate(run):
            if ev.event_id in seen or ev.event_id in referenced:
                run = run[:i]
                break
        return run

    async def _chain(
        self,
        room_id: str,
        extremities: frozenset[str],
        candidates: list[tuple[str, EventBase]],
        phases: "_Phases",
    ) -> list[tuple[str, EventBase]]:
        """The longest prefix of `candidates` that is a run (module docstring),
        apart from the auth checks."""
        run = await self._linked(room_id, candidates, frozenset(extremities))
        if not run:
            return run
        ids = [ev.event_id for _, ev in run]
        auth_ids = {a for _, ev in run for a in ev.auth_event_ids()}
        have_auth = await self._main.have_seen_events(room_id, auth_ids)
        if not auth_ids <= have_auth:
            # What Synapse's `_check_event_auth` would fetch for each event
            # (its sender's membership, say, in a partial-state room).
            await self._fetch_missing_auth_events(run, have_auth, phases)
            have_auth = await self._main.have_seen_events(room_id, auth_ids)
            # A chain that named an event of the run stored it as an outlier.
            seen = await self._main.have_seen_events(room_id, ids)
            for i, (_, ev) in enumerate(run):
                if ev.event_id in seen:
                    run = run[:i]
                    break
        for i, (_, ev) in enumerate(run):
            if not set(ev.auth_event_ids()) <= have_auth:
                return run[:i]
        return run

    async def _fetch_missing_auth_events(
        self,
        run: list[tuple[str, EventBase]],
        have: set[str],
        phases: "_Phases",
        exclude: frozenset[str] = frozenset(),
        ahead: bool = False,
    ) -> None:
        """For the run's events with auth events not stored, what Synapse's
        `_check_event_auth` does first (`_load_or_fetch_auth_events_for_event`:
        the event's auth chain from the server that sent it, with Synapse's
        signature and hash checks, persisted as outliers), for several events
        at once, each missing auth event asked for once, and the chains
        persisted together: one `_auth_and_persist_outliers` for the run
        instead of one for each event (which on a busy database costs more
        than the requests). The events of an answer we hold exactly as
        received are not checked again (`federation.event_auth`: Synapse's
        path checks them, then drops them as stored). Where two chains hold
        the same event, the copy of the earlier event's chain is kept, as
        Synapse's one-at-a-time path keeps the copy it stored first. An
        event whose auth events are still missing afterwards ends the run,
        and Synapse's path then tries (and fails) as it would have.

        `exclude`: more staged events no answer may hold (the run being
        written while the chains of the next one are fetched ahead; see
        below). `ahead` only words the log line."""
        covered = set(have)
        wanted: list[tuple[str, EventBase]] = []
        for origin, ev in run:
            missing = set(ev.auth_event_ids()) - covered
            if missing:
                if ev.event_id in self._refused:
                    # Its chain came with staged events before: Synapse's
                    # path fetches it (the run ends before it).
                    break
                wanted.append((origin, ev))
                covered |= missing
        if not wanted:
            return
        room_id = run[0][1].room_id
        for _, ev in wanted:
            logger.info("Event %s refers to unknown auth events: fetching auth chain", ev.event_id)
        started = time.monotonic()
        fetch = AuthChainFetch()
        chains = await fetch_auth_chains(
            self._hs, room_id, [(origin, ev.event_id) for origin, ev in wanted], _AUTH_FETCH_CONCURRENCY, fetch
        )
        started = phases.done("auth requests", started, within="chain")
        # An answer that holds a staged event of the chain other than the one
        # asked about (a hostile or broken server: auth chains hold state
        # events only, and these are not) is not taken, nor are the answers
        # after it: Synapse's path, one event at a time, would have stored
        # some of those staged events by then and drop them as stored, and
        # store others as outliers only where their own auth events had been
        # fetched by then. The answers before it are taken; the run ends
        # before the event it was for (its auth events still missing), and
        # Synapse's path fetches from there one event at a time. Its chain
        # is not asked for again by a run (`_refused`).
        staged_ids = {ev.event_id for _, ev in run} | exclude
        fetched: dict[str, EventBase] = {}
        taking = True
        taken = 0
        for _, ev in wanted:
            answer = chains.get(ev.event_id, ())
            refused = next(
                (e.event_id for e in answer if e.event_id != ev.event_id and e.event_id in staged_ids), None
            )
            if refused is not None:
                logger.warning(
                    "The auth chain of %s holds the staged event %s: left to Synapse's path", ev.event_id, refused
                )
                if len(self._refused) >= _REFUSED_KEPT:
                    self._refused.clear()
                self._refused.add(ev.event_id)
                taking = False
            if not taking:
                continue
            taken += 1
            for auth_event in answer:
                # (The event itself may be returned: as Synapse, it is not
                # processed yet.)
                if auth_event.event_id != ev.event_id:
                    fetched.setdefault(auth_event.event_id, auth_event)
        logger.info(
            "Auth chains of %d staged events in %s%s: %d events from %d answers (%d of %d received checked,"
            " the rest held as received)",
            len(wanted), room_id, " (ahead of their run)" if ahead else "", len(fetched), len(chains),
            fetch.checked, fetch.received,
        )
        if not fetched:
            return
        try:
            await self._federation_event_handler._auth_and_persist_outliers(room_id, fetched.values())
            phases.done("auth chains stored", started, within="chain")
            if ahead:
                self.stats.chains_ahead += taken
        except Exception as e:
            # As Synapse's path: the events left without their auth events
            # end the run below.
            logger.warning("Failed to persist the auth chains of staged events in %s: %s", room_id, e)

    async def _authorised(
        self, run: list[tuple[str, EventBase]], held: list[Any] | None = None, slices: _Slices | None = None
    ) -> list[tuple[str, EventBase, EventContext]]:
        """Contexts and auth checks, in order, up to and with the first event
        Synapse's `_check_event_auth` rejects (its context says so), or up to
        one it cannot check.

        The contexts are built in order; the checks run several at once (on
        PostgreSQL; one at a time on SQLite: `_CHECK_CONCURRENCY_SQLITE`). Each
        check's outcome depends only on its own event and context and on
        stored events: the run's events are not state events, none is an auth
        event of another (each one's auth events were stored before the run,
        see `_chain`), and a check only sets its own context's rejection. So
        the outcomes are those of checks one after another; what the
        concurrency saves is the wait for the database (busy with the
        resync's writes). In a partial-state room each check resolves the
        partial state with the event's auth events; the module computes that
        at the event's auth keys from the auth graph it keeps in memory
        (`state/partial_resolution.py`), where Synapse's whole resolution
        asked the database for the auth chain difference, 25 to 100 ms an
        event on PostgreSQL during a resync of 50,000 members, and worked
        through the whole partial state. Checks of events after the first
        rejection or unchecked event are skipped once that is known (some may
        already be under way; their outcomes are not used)."""
        slices = slices if slices is not None else _Slices(self._clock)
        built: list[tuple[str, EventBase, EventContext]] = []
        first_context: EventContext | None = None
        group_delta: tuple[int | None, Any] | None = None
        for origin, ev in run:
            await slices.take_turn()
            if first_context is None:
                context = await self._state_handler.compute_event_context(ev)
                first_context = context
            else:
                group = first_context.state_group
                assert group is not None
                if group_delta is None:
                    # compute_event_context with the prev event persisted: its
                    # one state group, that group's delta, the deletion check.
                    if await self._state_deletion.check_state_groups_and_bump_deletion({group}):
                        break
                    group_delta = await self._storage.state.get_state_group_delta(group)
                prev_group, delta_ids = group_delta
                context = await UnpersistedEventContext(
                    storage=self._storage,
                    state_group_before_event=group,
                    state_group_after_event=group,
                    state_delta_due_to_event={},
                    prev_group_for_state_group_before_event=prev_group,
                    delta_ids_to_state_group_before_event=delta_ids,
                    partial_state=first_context.partial_state,
                ).persist(ev)
            built.append((origin, ev, context))
        if first_context is not None and first_context.state_group_before_event is not None:
            # Every event of the run has the state before it at one state
            # group, and each check (and each push-rule evaluation) reads it
            # at the event's auth keys: its sender's membership among them.
            # One read of those keys for the whole run fills Synapse's
            # state-group caches, so that those reads find them there instead
            # of making a query each.
            keys: set[tuple[str, str]] = set()
            for _, ev, _ in built:
                keys.update(auth_types_for_event(ev.room_version, ev))
            await self._storage.state.get_state_ids_for_group(
                first_context.state_group_before_event, StateFilter.from_types(keys)
            )
        # Likewise each check loads its event's auth events (the senders'
        # memberships among them, often stored just before by the run's
        # fetch): one read of all of them fills Synapse's event cache. They
        # are held until the checks are done (in `held`, until the caller
        # lets it go: the run's push-rule evaluations read them again), and
        # known to Synapse's map of
        # events still in memory (`_event_ref`, which its fetches consult
        # after the LRU cache, as they do for every event they read from the
        # database): while something else reads many events through the
        # cache (a big room's `/members` right after its resync), the cache
        # lets them go, and each check then waited for the database behind
        # it. A redacted event is left out (Synapse keeps only originals
        # there); an invalidation drops the entry as it drops its own. The
        # read does not wait for another caller's read of the same events
        # (that `/members` reads them all, and builds them for seconds).
        auth_events = await get_events_without_waiting(
            self._main, {a for _, ev, _ in built for a in ev.auth_event_ids()}
        )
        if held is not None:
            held.append(auth_events)
        in_memory = getattr(self._main, "_event_ref", None)
        if in_memory is not None:
            for event_id, auth_event in auth_events.items():
                if not auth_event.internal_metadata.is_redacted():
                    in_memory.setdefault(event_id, auth_event)

        outcomes: list[Exception | None] = [None] * len(built)
        # The first event that ends the run, as far as known: events after it
        # are not checked (their outcomes would not be used).
        end = len(built)

        async def check(i: int) -> None:
            nonlocal end
            await slices.take_turn()
            if i > end:
                return
            origin, ev, context = built[i]
            try:
                await self._federation_event_handler._check_event_auth(origin, ev, context)
            except Exception as e:
                outcomes[i] = e
                end = min(end, i)
                return
            if context.rejected:
                end = min(end, i)

        await concurrently_execute(check, range(len(built)), self._concurrency)
        del auth_events
        accepted: list[tuple[str, EventBase, EventContext]] = []
        for (origin, ev, context), outcome in zip(built, outcomes):
            if isinstance(outcome, AuthError):
                break
            if outcome is not None:
                raise outcome
            accepted.append((origin, ev, context))
            if context.rejected:
                break
        return accepted

    async def _warm_ignored_by(self, senders: set[str]) -> None:
        """Fill Synapse's `ignored_by` cache for the run's senders with one
        query: each push-rule evaluation reads it for its event's sender
        (`filter_event_for_clients_with_state`), and in a busy room nearly
        every sender is new, so each read was a transaction of its own.

        Filled as Synapse's own batched lookups fill a cache
        (`start_bulk_input`, then `complete_bulk`): an invalidation while the
        query runs drops the entry instead of caching what it read. A failure
        only logs: the evaluations then read as before."""
        # (A cache of a one-argument function is keyed by the argument itself.)
        cache = self._main.ignored_by.cache
        missing = [s for s in senders if cache.get_immediate(s, None, update_metrics=False) is None]
        if not missing:
            return
        entry = cache.start_bulk_input(missing)
        try:
            found = await self._store.ignored_by(missing)
        except Exception:
            entry.error_bulk(cache, missing, Failure())
            logger.warning("Reading who ignores the senders of a run failed", exc_info=True)
            return
        entry.complete_bulk(cache, {s: found[s] for s in missing})

    async def _persist(
        self,
        room_id: str,
        extremities: frozenset[str],
        run: list[tuple[str, EventBase, EventContext]],
        phases: "_Phases",
        slices: _Slices,
    ) -> bool:
        pairs = [(ev, context) for _, ev, context in run]
        started = time.monotonic()
        try:
            min_depth = await self._main.get_min_depth(room_id)
            # Push actions for the events Synapse would compute them for (its
            # `_run_push_actions_and_persist_event`), several at once: each
            # event's staging rows depend on it and on stored events only (the
            # run holds no state event, and no event relating to another of
            # the run: `_chain`), as when Synapse computes them one by one.
            # Their rows are written together (patch 0032), one transaction
            # for the run instead of one for each event.
            staging: list[StagedPushActions] = []
            await self._warm_ignored_by({ev.sender for ev, context in pairs if not context.rejected})

            async def push_actions(pair: tuple[EventBase, EventContext]) -> None:
                await slices.take_turn()
                await self._push_evaluator.action_for_events_by_user([pair], staging=staging)

            await concurrently_execute(
                push_actions,
                [
                    (ev, context)
                    for ev, context in pairs
                    if not context.rejected and min_depth is not None and min_depth <= ev.depth
                ],
                self._concurrency,
            )
            if staging:
                await self._store.add_push_actions_to_staging(staging, self._clock.time_msec())
            # Another path may have persisted an event in the room since the
            # run's extremities were read (a local user's ban, say): Synapse
            # would check the events after it for soft-failure against it.
            if await self._main.get_latest_event_ids_in_room(room_id) != extremities:
                raise _ExtremitiesMoved()
            started = phases.done("push actions", started)
            await self._federation_event_handler.persist_events_and_notify(room_id, pairs)
            started = phases.done("persist", started)
        except Exception as e:
            for ev, _ in pairs:
                await self._main.remove_push_actions_from_staging(ev.event_id)
            self.stats.given_back += 1
            if isinstance(e, PartialStateConflictError):
                logger.info("Run of %d staged events in %s given back: the room was un-partial-stated", len(pairs), room_id)
            elif isinstance(e, _ExtremitiesMoved):
                logger.info("Run of %d staged events in %s given back: another event was stored meanwhile", len(pairs), room_id)
            else:
                logger.warning("Run of %d staged events in %s given back: %r", len(pairs), room_id, e)
            return False
        accepted = [ev for ev, context in pairs if not context.rejected]
        for ev, context in pairs:
            if context.rejected:
                continue
            await slices.take_turn()
            try:
                await self._federation_event_handler._after_received_pdu_persisted(ev)
            except Exception:
                logger.exception("Failed to handle PDU %s after persisting it", ev.event_id)
        # One transaction for the run's last writes: the forward-extremity
        # history as one-at-a-time persistence writes it (storage/events.py;
        # Synapse's batch wrote only its last accepted event's row), then the
        # removal of its staged events, last, as in Synapse's path. After a
        # crash between the persistence and this, the events are processed
        # again from the staging area (and dropped as stored), and the
        # history keeps the batch's one row.
        history = (
            [(ev.event_id, ev.internal_metadata.stream_ordering) for ev in accepted]
            if len(accepted) > 1 or (accepted and accepted[-1] is not pairs[-1][0])
            else None
        )
        received = await self._store.finish_run(
            room_id, history, [(origin, ev.event_id) for origin, ev, _ in run]
        )
        now = self._clock.time_msec()
        histogram = pdu_process_time.labels(**{SERVER_NAME_LABEL: self._server_name})
        for received_ts in received:
            histogram.observe((now - received_ts) / 1000)
        phases.done("after", started)
        self.stats.runs += 1
        self.stats.events += len(pairs)
        return True
