# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Filtered state reads (patch 0025): the rows Synapse's
`_get_state_groups_from_groups_txn`, `_get_current_state_event_ids` and
`get_partial_filtered_current_state_ids` return for a filter are exactly the
filter applied to the whole state, and on SQLite a read of a few keys does not
go through every row of a big state group or room.

A real in-process HomeServer (`--db`) stores a snapshot group of a room with
many members and odd state types (types that sort just before and after
`m.room.member`, a custom type below every `m.` type), then a chain of delta
groups over it that overwrite and add entries. Every group is read with a set
of filters (concrete keys present and absent, wildcard types, "all but these
types" with and without member keys, the full and the empty filter), straight
from the database (Synapse's caches play no part), and compared with the
filter applied to the state the test wrote. On SQLite, the number of virtual
machine steps SQLite takes to read two keys of the snapshot group (one of them
absent, so the read cannot stop early) is counted: without the patch its
planner reads every row of the group, which this catches. The same state is
written as a room's `current_state_events` rows and read the same ways through
the current-state functions (their database reads, Synapse's caches cleared).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from synapse.api.constants import EventTypes
from synapse.app.homeserver import SynapseHomeServer
from synapse.types.state import StateFilter

from tests.harness.inprocess import homeserver_on_fresh_database

ROOM = "!filtered:state.example"
MEMBERS = 20_000
Key = tuple[str, str]


@pytest.fixture
def homeserver(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[SynapseHomeServer]:
    with homeserver_on_fresh_database(
        "state_read", "state.example", db_backend, tmp_path_factory, request
    ) as hs:
        yield hs


def _member(i: int) -> Key:
    return (EventTypes.Member, f"@u{i}:s{i % 97}.example")


def _base() -> dict[Key, str]:
    state: dict[Key, str] = {
        (EventTypes.Create, ""): "$create",
        (EventTypes.PowerLevels, ""): "$power",
        (EventTypes.JoinRules, ""): "$rules",
        (EventTypes.Name, ""): "$name",
        (EventTypes.Topic, ""): "$topic0",
        ("m.room.membeq", ""): "$just_below",  # sorts right before m.room.member
        ("m.room.member.x", "k"): "$just_above",  # and right after it
        ("a.custom", "one"): "$custom1",
        ("a.custom", "two"): "$custom2",
        ("z.last", ""): "$last",
    }
    for i in range(MEMBERS):
        state[_member(i)] = f"$m{i}"
    return state


DELTAS: list[dict[Key, str]] = [
    {(EventTypes.Topic, ""): "$topic1", _member(MEMBERS): "$new_member"},
    {("a.custom", "three"): "$custom3", _member(5): "$m5_left"},
    {(EventTypes.PowerLevels, ""): "$power2", ("b.new_type", "x"): "$b"},
]


def _filters() -> list[StateFilter]:
    absent = (EventTypes.Member, "@nobody:else.example")
    return [
        StateFilter.from_types([(EventTypes.JoinRules, ""), absent]),
        StateFilter.from_types([(EventTypes.JoinRules, ""), _member(5)]),
        StateFilter.from_types(
            [(EventTypes.Create, ""), (EventTypes.PowerLevels, ""), _member(MEMBERS), absent]
        ),
        StateFilter.from_types([_member(i) for i in range(0, 3000, 97)] + [absent]),
        StateFilter.from_types([(EventTypes.Topic, "")]),
        StateFilter.from_types([("a.custom", None)]),  # type: ignore[list-item]
        StateFilter.from_types([("a.custom", None), (EventTypes.Name, "")]),  # type: ignore[list-item]
        StateFilter.freeze({EventTypes.Member: None}, include_others=False),
        StateFilter.freeze({EventTypes.Member: {absent[1], _member(7)[1]}}, include_others=True),
        StateFilter.freeze({EventTypes.Member: set()}, include_others=True),
        StateFilter.freeze(
            {EventTypes.Member: set(), "a.custom": {"two"}, "z.last": None}, include_others=True
        ),
        StateFilter.freeze({"m.room.membeq": None}, include_others=True),
        StateFilter.all(),
        StateFilter.none(),
    ]


async def _read(hs: SynapseHomeServer, group: int, state_filter: StateFilter) -> tuple[dict[Key, str], int]:
    """The group's state under `state_filter`, read from the database, and how
    many SQLite VM steps (in thousands) the read took (0 on PostgreSQL)."""
    store: Any = hs.get_datastores().state

    def read(txn: Any) -> tuple[dict[Key, str], int]:
        conn = getattr(txn.txn, "connection", None)
        steps = [0]
        counting = conn is not None and hasattr(conn, "set_progress_handler")
        if counting:

            def tick() -> int:
                steps[0] += 1
                return 0

            conn.set_progress_handler(tick, 1000)
        try:
            result = store._get_state_groups_from_groups_txn(txn, [group], state_filter)
        finally:
            if counting:
                conn.set_progress_handler(None, 0)
        return dict(result[group]), steps[0]

    return await store.db_pool.runInteraction("test_filtered_read", read)


@pytest_twisted.ensureDeferred
async def test_filtered_reads_match_the_filtered_state(homeserver: SynapseHomeServer, db_backend: str) -> None:
    state_storage = homeserver.get_datastores().state
    expected: dict[int, dict[Key, str]] = {}
    state = _base()
    group = await state_storage.store_state_group("$base", ROOM, None, None, dict(state))
    expected[group] = dict(state)
    base_group = group
    for n, delta in enumerate(DELTAS):
        group = await state_storage.store_state_group(f"$delta{n}", ROOM, group, dict(delta), None)
        state = {**state, **delta}
        expected[group] = dict(state)

    for group, whole in expected.items():
        for state_filter in _filters():
            if db_backend == "postgres" and state_filter == StateFilter.none():
                # Synapse's PostgreSQL query has no SELECT for it (a syntax
                # error); its callers never ask the database for nothing.
                continue
            got, _ = await _read(homeserver, group, state_filter)
            assert got == state_filter.filter_state(whole), (group, state_filter)

    if db_backend == "sqlite":
        # Two keys of the snapshot group, one absent: a few index lookups, not
        # a pass over its MEMBERS rows (which takes several VM steps per row).
        two_keys = StateFilter.from_types(
            [(EventTypes.JoinRules, ""), (EventTypes.Member, "@nobody:else.example")]
        )
        got, thousands = await _read(homeserver, base_group, two_keys)
        assert got == {(EventTypes.JoinRules, ""): "$rules"}
        assert thousands * 1000 < MEMBERS, f"{thousands}k VM steps: the read went through the group"
        # All but the memberships: the other types' rows, by index ranges.
        got, thousands = await _read(
            homeserver, base_group, StateFilter.freeze({EventTypes.Member: set()}, include_others=True)
        )
        assert len(got) == 10
        assert thousands * 1000 < MEMBERS, f"{thousands}k VM steps: the read went through the group"


async def _read_current(
    hs: SynapseHomeServer, room_id: str, state_filter: StateFilter
) -> tuple[dict[Key, str], int]:
    """The room's current state under `state_filter` from the database (the
    store's caches of it cleared first), and the SQLite VM steps (thousands)
    its reads took."""
    store: Any = hs.get_datastores().main
    store._get_current_state_event_id.invalidate_all()
    store.get_partial_current_state_ids.invalidate_all()
    steps = [0]
    counted: list[Any] = []
    pool = store.db_pool

    def tick() -> int:
        steps[0] += 1
        return 0

    original = pool.runInteraction

    async def counting(desc: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        def wrapped(txn: Any, *a: Any, **k: Any) -> Any:
            conn = getattr(txn.txn, "connection", None)
            if conn is not None and hasattr(conn, "set_progress_handler"):
                conn.set_progress_handler(tick, 1000)
                counted.append(conn)
            try:
                return func(txn, *a, **k)
            finally:
                if counted:
                    counted.pop().set_progress_handler(None, 0)

        return await original(desc, wrapped, *args, **kwargs)

    pool.runInteraction = counting
    try:
        result = await store.get_partial_filtered_current_state_ids(room_id, state_filter)
    finally:
        pool.runInteraction = original
    return dict(result), steps[0]


@pytest_twisted.ensureDeferred
async def test_current_state_reads_match_the_filtered_state(
    homeserver: SynapseHomeServer, db_backend: str
) -> None:
    store: Any = homeserver.get_datastores().main
    rooms = {"!big:state.example": {**_base(), **DELTAS[0]}, "!other:state.example": dict(DELTAS[1])}

    def write(txn: Any) -> None:
        for room_id, state in rooms.items():
            store.db_pool.simple_insert_many_txn(
                txn,
                table="current_state_events",
                keys=("event_id", "room_id", "type", "state_key", "membership"),
                values=[
                    (f"{event_id}{room_id}", room_id, typ, state_key, "join" if typ == EventTypes.Member else None)
                    for (typ, state_key), event_id in state.items()
                ],
            )

    await store.db_pool.runInteraction("test_current_state", write)
    for room_id, state in rooms.items():
        whole = {key: f"{event_id}{room_id}" for key, event_id in state.items()}
        for state_filter in _filters():
            if state_filter.is_full() or state_filter == StateFilter.none():
                continue  # answered by other functions (or not at all)
            got, _ = await _read_current(homeserver, room_id, state_filter)
            assert got == state_filter.filter_state(whole), (room_id, state_filter)

    if db_backend == "sqlite":
        room_id = "!big:state.example"
        # Concrete keys (the per-key cache's batched read), one absent.
        got, thousands = await _read_current(
            homeserver,
            room_id,
            StateFilter.from_types(
                [(EventTypes.Create, ""), (EventTypes.PowerLevels, ""), (EventTypes.Member, "@nobody:else.example")]
            ),
        )
        assert len(got) == 2
        assert thousands * 1000 < MEMBERS, f"{thousands}k VM steps: the read went through the room"
        # A wildcard type and the others (the filtered read).
        got, thousands = await _read_current(
            homeserver, room_id, StateFilter.freeze({EventTypes.Member: {_member(3)[1]}}, include_others=True)
        )
        assert len(got) == 11
        assert thousands * 1000 < MEMBERS, f"{thousands}k VM steps: the read went through the room"
