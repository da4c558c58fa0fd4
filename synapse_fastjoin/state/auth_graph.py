# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""A room's auth graph in memory, for state resolutions made again and again
against the same partial state.

Synapse's state resolution v2 (`synapse/state/v2.py`) asks the database for
the *auth chain difference* of its state sets, and for room versions with
state resolution v2.1 (room version 12) also for the *conflicted subgraph*
(`get_auth_chain_difference_extended`, answered from the chain cover index).
In a partial-state room every inbound event whose sender's membership the
partial state lacks is authorised with such a resolution of the whole partial
state P against the event's claimed auth events A; on a database busy with the
resync that query took 25 to 100 ms per event, for a question whose answer is
mostly the same each time (P does not change between the events of a run).

The chain cover index is an exact encoding of auth-event reachability, so the
answers are set computations over the graph whose edges are the events'
`auth_event_ids()`:

- the auth chain of a state set S is anc(S): S and every event reachable from
  it through auth events;
- the auth chain difference of S1..Sn is the union of their anc() minus the
  intersection;
- the conflicted subgraph of a conflicted set C is the set of events x with
  x in anc(C) (reachable from some conflicted event, or one itself) and
  anc({x}) meeting C (x reaches some conflicted event, or is one).

`AuthGraph` holds the edges of the events it has been asked about and their
ancestors, loaded from Synapse's event cache or database, and computes those
sets; `tests/unit/test_partial_resolution.py` compares them with Synapse's
`get_auth_chain_difference_extended` on generated rooms (forks, bans, kicks,
rejected events), both databases. An event that is not stored (an auth event
never fetched) makes the graph decline (`load` returns False), and the
caller then asks Synapse. Edges never change (an event's auth events are
covered by its id, a hash, in every room version the resolver serves), so
what is loaded stays true; rejections are not kept here.
"""

from typing import Callable, Collection, Iterable

from synapse.events import EventBase
from synapse.state.v2 import _is_power_event
from synapse.storage.databases.main import DataStore
from synapse.types import StateKey
from synapse.util.iterutils import batch_iter

# Events fetched at once while loading ancestors.
_FETCH_BATCH = 500


class GraphLimitExceeded(Exception):
    """The graph would hold more events than it may."""


class AuthGraph:
    """The auth edges of some of one room's stored events, with each event's
    state key and whether it is a power event (Synapse's `_is_power_event`).

    Args:
        store: Synapse's main data store.
        room_id: the room; an event of another room makes `load` decline.
        max_events: the most events held; `load` raises
            `GraphLimitExceeded` beyond it.
    """

    def __init__(self, store: DataStore, room_id: str, max_events: int = 100_000) -> None:
        self._store = store
        self.room_id = room_id
        self._max_events = max_events
        self.parents: dict[str, tuple[str, ...]] = {}
        self.children: dict[str, list[str]] = {}
        self.key: dict[str, StateKey | None] = {}
        self.power: set[str] = set()
        self.by_key: dict[StateKey, set[str]] = {}

    def __len__(self) -> int:
        return len(self.parents)

    def _add(self, event: EventBase) -> None:
        event_id = event.event_id
        if event_id in self.parents:
            return
        parents = tuple(event.auth_event_ids())
        self.parents[event_id] = parents
        for parent in parents:
            self.children.setdefault(parent, []).append(event_id)
        if event.is_state():
            key = (event.type, event.state_key)
            self.key[event_id] = key
            self.by_key.setdefault(key, set()).add(event_id)
        else:
            self.key[event_id] = None
        if _is_power_event(event):
            self.power.add(event_id)

    async def load(self, event_ids: Iterable[str]) -> bool:
        """Load `event_ids` and all their ancestors. False if one of them is
        not stored or is in another room (Synapse must answer); raises
        `GraphLimitExceeded` if the graph would grow beyond its bound.

        What a load finds is added at its end, all at once: the graph only
        ever holds events whose ancestors it holds too, whatever other loads
        are under way meanwhile."""
        found: dict[str, EventBase] = {}
        wanted = {e for e in event_ids if e not in self.parents}
        while wanted:
            if len(self.parents) + len(found) + len(wanted) > self._max_events:
                raise GraphLimitExceeded()
            fetched: dict[str, EventBase] = {}
            for batch in batch_iter(wanted, _FETCH_BATCH):
                fetched.update(await self._store.get_events(batch, allow_rejected=True))
            if len(fetched) != len(wanted):
                return False
            for event in fetched.values():
                if event.room_id != self.room_id:
                    return False
            found.update(fetched)
            wanted = {
                a
                for event in fetched.values()
                for a in event.auth_event_ids()
                if a not in self.parents and a not in found
            }
        for event in found.values():
            self._add(event)
        return True

    @staticmethod
    def _walk(start: Iterable[str], next_of: Callable[[str], Iterable[str]]) -> set[str]:
        """`start` and everything `next_of` leads to from it, transitively."""
        seen: set[str] = set()
        todo = list(start)
        while todo:
            event_id = todo.pop()
            if event_id in seen:
                continue
            seen.add(event_id)
            todo.extend(n for n in next_of(event_id) if n not in seen)
        return seen

    def ancestry(self, event_ids: Iterable[str], stop: Collection[str] = ()) -> set[str]:
        """anc(event_ids): the events and every event reachable from them,
        all loaded. Events in `stop` (an ancestor-closed set) are reported but
        not walked past: the result then holds anc(event_ids) minus what lies
        beyond them."""
        parents = self.parents
        return self._walk(event_ids, lambda e: () if e in stop else parents[e])

    def ancestors_within(self, event_ids: Iterable[str], within: Collection[str]) -> set[str]:
        """`event_ids` and their ancestors reachable through events of
        `within` (the nodes Synapse's power sort walks)."""
        parents = self.parents
        return self._walk(event_ids, lambda e: (p for p in parents[e] if p in within))

    def descendants_within(self, event_ids: Iterable[str], within: Collection[str]) -> set[str]:
        """The events of `within` (an ancestor-closed set) reachable forwards
        from `event_ids` (they included, where in `within`)."""
        children = self.children
        return self._walk(
            (e for e in event_ids if e in within), lambda e: (c for c in children.get(e, ()) if c in within)
        )

    def reaching(self, candidates: Iterable[str], targets: Collection[str], memo: dict[str, bool]) -> set[str]:
        """The events of `candidates` whose ancestry (themselves included)
        meets `targets`. `memo` holds earlier answers for the same `targets`
        (an event's ancestry never changes, so they stay true)."""
        parents = self.parents
        result: set[str] = set()
        for start in candidates:
            if start not in memo:
                # Iterative post-order: an event's answer after its parents'.
                stack = [(start, False)]
                while stack:
                    event_id, expanded = stack.pop()
                    if event_id in memo:
                        continue
                    if event_id in targets:
                        memo[event_id] = True
                        continue
                    if expanded:
                        # (.get: a cycle, possible only where event ids are not
                        # hashes, counts as not reaching.)
                        memo[event_id] = any(memo.get(p, False) for p in parents[event_id])
                        continue
                    stack.append((event_id, True))
                    stack.extend((p, False) for p in parents[event_id] if p not in memo)
            if memo[start]:
                result.add(start)
        return result


def auth_difference(graph: AuthGraph, state_sets: list[set[str]]) -> set[str]:
    """The auth chain difference of `state_sets` (all loaded), as Synapse's
    `get_auth_chain_difference` gives it."""
    chains = [graph.ancestry(s) for s in state_sets]
    return set.union(*chains) - set.intersection(*chains)


def conflicted_subgraph(graph: AuthGraph, conflicted: set[str]) -> set[str]:
    """State resolution v2.1's conflicted subgraph of `conflicted` (all
    loaded), as Synapse's `get_auth_chain_difference_extended` gives it."""
    back = graph.ancestry(conflicted)
    return graph.descendants_within(conflicted, back)
