# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Synapse's state resolution of a partial state P with an event's claimed
auth events A, computed only as far as the event's auth keys need it.

`FederationEventHandler._check_event_auth` resolves P (the partial state
before the event: a few hundred to many thousand events) with A (the three to
five claimed auth events), and `compute_auth_events` then reads the result at
the keys `auth_types_for_event` names. Synapse's resolution (`state/v2.py`,
`resolve_events_with_store`) works through the whole full conflicted set F
(nearly all of P, plus the auth chain difference, plus v2.1's conflicted
subgraph) for each event: an auth-chain query (25 to 100 ms on a busy
database), then a sort and an auth check of every event of F (1.3 s per event
at 5,000 state keys on these machines: `tests/unit/test_partial_auth_bench.py`).

`PartialStateResolver.resolve_at_auth_keys` gives the same answer at those
keys, with Synapse's own sort and check functions, on a part of F:

1. F is computed from the room's auth graph in memory (`auth_graph.py`:
   the same sets the chain cover index gives), with what depends only on P
   kept from one event to the next (all events of a run share P).
2. Phase 1, the power events (Synapse's `_reverse_topological_power_sort` and
   `_iterative_auth_checks`), runs on exactly Synapse's input: every power
   event of F, the graph walked through F. Its order depends on all of them
   (a lexicographic topological sort is not stable under removing nodes), so
   none is left out; power events are few.
3. Phase 2, the other events of F in mainline order, runs only on the events
   of F at the *closure* of the event's auth keys: start with
   `auth_types_for_event(event)`; for every phase-2 event of F at a key in the
   closure, add that event's own auth types; repeat until nothing is added.
   Why that is exact:
   - the mainline order is a sort by a key of each event alone (its mainline
     depth under the power levels phase 1 resolved, its timestamp, its id), so
     the closure's events keep their relative order;
   - `_iterative_auth_checks` decides an event from its own auth events and
     the state resolved so far *at its auth types* only; for an event at a
     closure key those are closure keys, or keys only power events (phase 1,
     done before) hold;
   - an event at another key changes no closure key.
   So, event after event, the resolved state at every closure key is what the
   whole phase 2 would have at that point; the event's auth keys are closure
   keys.
4. The result at the auth keys is Synapse's: the unconflicted state where P and
   A agree, else what the phases resolved, else nothing.

The base state phase 1 starts from (state resolution v2: the unconflicted
state at the auth types of F's events and the power levels) is the same at
every key either phase reads. Where the graph cannot answer (an event not
stored, another room's event, a room version with state resolution v1, more
events than the bound) the resolver returns None and Synapse resolves.
`tests/unit/test_partial_resolution.py` compares the answer with Synapse's
`resolve_events_with_store` key by key on generated rooms, both databases.
"""

import logging
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Collection, Iterable, Iterator, Mapping

from synapse.api.constants import EventTypes
from synapse.api.room_versions import EventFormatVersions, RoomVersion, StateResolutionVersions
from synapse.event_auth import auth_types_for_event
from synapse.events import EventBase
from synapse.state import StateResolutionStore
from synapse.state.v2 import _iterative_auth_checks, _mainline_sort, _reverse_topological_power_sort
from synapse.storage.databases.main import DataStore
from synapse.types import StateKey
from synapse.util.clock import Clock

from synapse_fastjoin.state.auth_graph import AuthGraph, GraphLimitExceeded

logger = logging.getLogger(__name__)

# Rooms whose graphs are kept, and partial states kept per room.
_ROOMS = 4
_STATES_PER_ROOM = 2
# Variants (which of A's events P agrees with) kept per partial state. Each
# holds sets as large as anc(P); most events of a run share one or two
# (A's create and power levels agreeing with P's, or those and the sender's
# membership).
_VARIANTS = 4


class _Union(Collection[str]):
    """Membership in any of some sets, without copying them."""

    def __init__(self, *parts: Collection[str]) -> None:
        self._parts = [p for p in parts if p]

    def __contains__(self, item: object) -> bool:
        return any(item in p for p in self._parts)

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for part in self._parts:
            for item in part:
                if item not in seen:
                    seen.add(item)
                    yield item

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _Variant:
    """What depends on P and on which of P's events A agrees with."""

    def __init__(self, graph: AuthGraph, partial: "_PartialState", agree: frozenset[str], v21: bool) -> None:
        self.conflicted = partial.ids - agree
        self.back: set[str] = set()
        self.subgraph: set[str] = set()
        if v21:
            # The conflicted subgraph from P's side: anc(C_P) reaching C_P.
            self.back = graph.ancestry(self.conflicted)
            self.subgraph = graph.descendants_within(self.conflicted, self.back)
        self.reach_memo: dict[str, bool] = {}
        self.power = {e for e in _Union(self.conflicted, self.subgraph) if e in graph.power}


class _PartialState:
    """What depends on P only (one state group)."""

    def __init__(self, graph: AuthGraph, state: Mapping[StateKey, str]) -> None:
        self.state = state
        self.ids = frozenset(state.values())
        self.ancestry = graph.ancestry(self.ids)
        self.variants: OrderedDict[frozenset[str], _Variant] = OrderedDict()
        # anc(P) minus the ancestry of A's events that lie in it, by those events.
        self.differences: OrderedDict[frozenset[str], tuple[set[str], set[str]]] = OrderedDict()

    def variant(self, graph: AuthGraph, agree: frozenset[str], v21: bool) -> _Variant:
        found = self.variants.get(agree)
        if found is None:
            found = self.variants[agree] = _Variant(graph, self, agree, v21)
            if len(self.variants) > _VARIANTS:
                self.variants.popitem(last=False)
        else:
            self.variants.move_to_end(agree)
        return found

    def difference_part(self, graph: AuthGraph, frontier: frozenset[str]) -> tuple[set[str], set[str]]:
        """anc(P) minus anc(frontier), and the power events in it."""
        found = self.differences.get(frontier)
        if found is None:
            part = self.ancestry - graph.ancestry(frontier)
            found = self.differences[frontier] = (part, {e for e in part if e in graph.power})
            if len(self.differences) > _VARIANTS:
                self.differences.popitem(last=False)
        else:
            self.differences.move_to_end(frontier)
        return found


class _Room:
    def __init__(self, store: DataStore, room_id: str, max_events: int) -> None:
        self.graph = AuthGraph(store, room_id, max_events)
        self.states: OrderedDict[int, _PartialState] = OrderedDict()


class PartialStateResolver:
    """Resolves partial states with claimed auth events at an event's auth
    keys (module docstring). One per process; holds bounded caches.

    Args:
        store: Synapse's main data store.
        state_res_store: what Synapse's resolution functions read events from.
        clock: Synapse's clock (the resolution functions yield to the reactor
            with it on long inputs).
        max_events: the most events one room's graph may hold (some 400
            bytes each); beyond it the room's graph is dropped and Synapse
            resolves for that room until `forget_room` (its resync ended).
    """

    def __init__(
        self, store: DataStore, state_res_store: StateResolutionStore, clock: Clock, max_events: int = 100_000
    ) -> None:
        self._store = store
        self._state_res_store = state_res_store
        self._clock = clock
        self._max_events = max_events
        self._rooms: OrderedDict[str, _Room] = OrderedDict()
        # Rooms whose graph outgrew `max_events`.
        self._too_big: set[str] = set()

    def forget_room(self, room_id: str) -> None:
        self._rooms.pop(room_id, None)
        self._too_big.discard(room_id)

    def _room(self, room_id: str) -> _Room:
        room = self._rooms.get(room_id)
        if room is None:
            room = self._rooms[room_id] = _Room(self._store, room_id, self._max_events)
            if len(self._rooms) > _ROOMS:
                self._rooms.popitem(last=False)
        else:
            self._rooms.move_to_end(room_id)
        return room

    async def resolve_at_auth_keys(
        self,
        event: EventBase,
        room_version: RoomVersion,
        state_group: int,
        partial_state: Callable[[], Awaitable[Mapping[StateKey, str]]],
        claimed: Mapping[StateKey, str],
    ) -> dict[StateKey, str] | None:
        """Synapse's `resolve_events_with_store(room, version, [partial_state,
        claimed])` at the keys `auth_types_for_event(event)` names (absent
        where it has nothing), or None where it must be asked.

        Args:
            event: the event being authorised.
            room_version: the room's version.
            state_group: the state group of the partial state before the event
                (what depends on it alone is kept for the next event).
            partial_state: gives P, the whole partial state before the event
                (the state of `state_group`); asked only when it is not kept.
            claimed: A, the event's claimed auth events by key.
        """
        if room_version.state_res not in (StateResolutionVersions.V2, StateResolutionVersions.V2_1):
            return None
        if room_version.event_format == EventFormatVersions.ROOM_V1_V2:
            return None
        if event.room_id in self._too_big:
            return None
        room = self._room(event.room_id)
        try:
            return await self._resolve(room, event, room_version, state_group, partial_state, claimed)
        except GraphLimitExceeded:
            logger.warning(
                "Auth graph of %s over %d events: its partial-state resolutions are left to Synapse",
                event.room_id, self._max_events,
            )
            self._rooms.pop(event.room_id, None)
            self._too_big.add(event.room_id)
            return None
        except Exception:
            # Not expected; Synapse's own resolution gives the answer.
            logger.warning(
                "Resolution of %s at its auth keys failed: left to Synapse", event.event_id, exc_info=True
            )
            return None

    async def _resolve(
        self,
        room: _Room,
        event: EventBase,
        room_version: RoomVersion,
        state_group: int,
        load_partial_state: Callable[[], Awaitable[Mapping[StateKey, str]]],
        claimed: Mapping[StateKey, str],
    ) -> dict[StateKey, str] | None:
        graph = room.graph
        room_id = event.room_id
        auth_keys = auth_types_for_event(room_version, event)

        partial = room.states.get(state_group)
        if partial is None:
            partial_state = await load_partial_state()
            if not await graph.load(partial_state.values()):
                return None
            partial = room.states[state_group] = _PartialState(graph, partial_state)
            if len(room.states) > _STATES_PER_ROOM:
                room.states.popitem(last=False)
        else:
            room.states.move_to_end(state_group)
        partial_state = partial.state

        # Unconflicted: where P and A hold the same event (with two state
        # sets, a key in one only is conflicted: Synapse's `_seperate`).
        unconflicted = {k: v for k, v in claimed.items() if partial_state.get(k) == v}
        if len(unconflicted) == len(claimed) == len(partial_state):
            return {k: unconflicted[k] for k in auth_keys if k in unconflicted}
        claimed_ids = set(claimed.values())
        if not await graph.load(claimed_ids):
            return None

        agree = frozenset(unconflicted.values())
        conflicted_claimed = claimed_ids - agree

        # The auth chain difference: anc(P) xor anc(A). anc(A) is walked up
        # to anc(P) (`visited`): its events outside anc(P) are all of
        # anc(A) - anc(P); those inside (the frontier) span anc(A) & anc(P).
        visited = graph.ancestry(claimed_ids, stop=partial.ancestry)
        outside = visited - partial.ancestry
        frontier = frozenset(visited - outside)
        p_only, p_only_power = partial.difference_part(graph, frontier)

        v21 = room_version.state_res == StateResolutionVersions.V2_1
        variant = partial.variant(graph, agree, v21)
        pieces: list[Collection[str]] = [variant.conflicted, conflicted_claimed, outside, p_only]
        power: set[str] = set(variant.power) | p_only_power
        power.update(e for e in conflicted_claimed if e in graph.power)
        power.update(e for e in outside if e in graph.power)
        if v21:
            # The conflicted subgraph of C = C_P + C_A: events of anc(C)
            # that reach C. anc(C) = anc(C_P) + what anc(C_A) adds.
            added = graph.ancestry(conflicted_claimed, stop=variant.back) - variant.back
            back = _Union(variant.back, added)
            from_claimed = graph.descendants_within(conflicted_claimed, back)
            from_partial = graph.reaching(added, variant.conflicted, variant.reach_memo)
            pieces += [variant.subgraph, from_claimed, from_partial]
            power.update(e for e in from_claimed if e in graph.power)
            power.update(e for e in from_partial if e in graph.power)
        full_conflicted = _Union(*pieces)

        # Phase 1 on its exact input: the power events of F and, as Synapse's
        # sort walks them, their ancestors in F.
        phase1_nodes = graph.ancestors_within(power, full_conflicted)
        event_map: dict[str, EventBase] = {}
        await self._fetch(event_map, phase1_nodes, graph)
        base_keys: set[StateKey] = {(EventTypes.PowerLevels, "")}
        for event_id in phase1_nodes:
            base_keys.update(auth_types_for_event(room_version, event_map[event_id]))

        # Phase 2's events: those of F at the closure of the auth keys.
        phase1 = phase1_nodes
        closure: set[StateKey] = set(auth_keys)
        todo = list(closure)
        leftover: list[str] = []
        while todo:
            key = todo.pop()
            at_key = [e for e in graph.by_key.get(key, ()) if e not in phase1 and e in full_conflicted]
            if not at_key:
                continue
            await self._fetch(event_map, at_key, graph)
            for event_id in at_key:
                leftover.append(event_id)
                for needed in auth_types_for_event(room_version, event_map[event_id]):
                    base_keys.add(needed)
                    if needed not in closure:
                        closure.add(needed)
                        todo.append(needed)

        base_state: dict[StateKey, str] = {}
        if room_version.state_res != StateResolutionVersions.V2_1:
            base_state = {k: unconflicted[k] for k in base_keys if k in unconflicted}

        store: Any = self._state_res_store
        sorted_power = await _reverse_topological_power_sort(
            self._clock, room_id, power, event_map, store, full_conflicted  # type: ignore[arg-type]
        )
        resolved = await _iterative_auth_checks(
            self._clock, room_id, room_version, sorted_power, base_state, event_map, store
        )
        pl = resolved.get((EventTypes.PowerLevels, ""))
        leftover = await _mainline_sort(self._clock, room_id, leftover, pl, event_map, store)
        resolved = await _iterative_auth_checks(
            self._clock, room_id, room_version, leftover, resolved, event_map, store
        )
        answer: dict[StateKey, str] = {}
        for key in auth_keys:
            value = unconflicted.get(key, resolved.get(key))
            if value is not None:
                answer[key] = value
        return answer

    async def _fetch(self, event_map: dict[str, EventBase], event_ids: Iterable[str], graph: AuthGraph) -> None:
        """The events and their auth events into `event_map` (Synapse's
        resolution functions read both)."""
        wanted: set[str] = set()
        for event_id in event_ids:
            if event_id not in event_map:
                wanted.add(event_id)
            wanted.update(p for p in graph.parents[event_id] if p not in event_map)
        if wanted:
            event_map.update(await self._state_res_store.get_events(wanted, allow_rejected=True))
