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

On PostgreSQL (patch 0029), a read with an "all but these types" filter
(`include_others`, a few named types: the partial `/send_join`'s read of the
state before the join) is measured by the rows its scans of the state table go
through and the buffer pages it touched, from `EXPLAIN (ANALYZE, BUFFERS,
FORMAT JSON)` of the very statements the read ran: Synapse's query went through
every row of the snapshot group (or of the room) and dropped the memberships by
a filter; the ranges around the named types and one lookup a named key go
through the rows they return (and a few index pages each). Those arms are also
evaluated in Python against the filter, in Python's order of text and in two
others (a database with another collation).
"""

from __future__ import annotations

import json
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
# PostgreSQL: the buffer pages a read of a few keys and of the other types'
# ranges may touch, in all. Such a read of the snapshot group touched 16 to 110
# (a few per group of the chain and select); a pass over the group, 4,300 (600
# for a pass over the room's current state); its index alone is about 280.
PAGES = 300
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


def _several_types_filters() -> list[StateFilter]:
    """Filters of "all but these types" with several named types: the ranges between and
    around them (0029), types named first and last in the order, before and
    after every type of the state, with empty and concrete key sets (a None key
    set with `include_others` is dropped by StateFilter itself: that type is
    one of the others)."""
    absent = (EventTypes.Member, "@nobody:else.example")
    return [
        StateFilter.freeze(
            {
                EventTypes.Member: {_member(7)[1], absent[1]},
                "a.custom": {"one", "absent"},
                EventTypes.Name: None,
                "m.room.membeq": set(),
            },
            include_others=True,
        ),
        StateFilter.freeze(
            {"z.last": {""}, "a.custom": None, EventTypes.Member: {absent[1]}}, include_others=True
        ),
        StateFilter.freeze(
            {"0.before.all": {"x"}, "zz.after.all": None, EventTypes.Member: set()}, include_others=True
        ),
        StateFilter.freeze(
            {"m.room.member.x": set(), EventTypes.Member: {_member(MEMBERS)[1]}, "m.room.membeq": {""}},
            include_others=True,
        ),
        StateFilter.freeze({"b.new_type": None, "a.custom": set()}, include_others=True),
        # Ten keys or more: Synapse's query (no arms).
        StateFilter.freeze({EventTypes.Member: {_member(i)[1] for i in range(12)}}, include_others=True),
    ]


def _filters() -> list[StateFilter]:
    absent = (EventTypes.Member, "@nobody:else.example")
    return [
        *_several_types_filters(),
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


class _Recording:
    """A transaction that records the statements run through it (and passes
    everything else to the real one: LoggingTransaction has slots)."""

    def __init__(self, txn: Any) -> None:
        self._txn = txn
        self.statements: list[tuple[str, Any]] = []

    def execute(self, sql: str, *args: Any) -> None:
        self.statements.append((sql, args))
        self._txn.execute(sql, *args)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._txn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)


def _explain(txn: Any, statements: list[tuple[str, Any]], table: str) -> tuple[int, int, float]:
    """PostgreSQL: run each recorded statement that reads `table` again under
    `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` in the same transaction (its `SET
    LOCAL`s still apply) and return the rows its scans of `table` went through
    (rows returned plus rows removed by a filter or a recheck, times loops),
    the shared buffers (pages) the statements read, hit or not (which also
    counts the index pages a scan goes through, e.g. a whole index scanned for
    a condition without its first column), and their execution time in ms."""
    rows = 0
    blocks = 0
    ms = 0.0

    def walk(node: dict[str, Any]) -> None:
        nonlocal rows
        if node.get("Relation Name") == table:
            per_loop = (
                node.get("Actual Rows", 0)
                + node.get("Rows Removed by Filter", 0)
                + node.get("Rows Removed by Index Recheck", 0)
            )
            rows += round(per_loop * node.get("Actual Loops", 1))
        for child in node.get("Plans", ()):
            walk(child)

    for sql, args in statements:
        if table not in sql:
            continue
        txn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, *args)
        (plan,) = txn.fetchone()
        if isinstance(plan, str):
            plan = json.loads(plan)
        walk(plan[0]["Plan"])
        blocks += plan[0]["Plan"]["Shared Hit Blocks"] + plan[0]["Plan"]["Shared Read Blocks"]
        ms += plan[0]["Execution Time"]
    return rows, blocks, ms


async def _read(hs: SynapseHomeServer, group: int, state_filter: StateFilter) -> tuple[dict[Key, str], int]:
    """The group's state under `state_filter`, read from the database, and how
    many SQLite VM steps (in thousands) the read took (0 on PostgreSQL)."""
    got, steps, _ = await _read_measured(hs, group, state_filter, explain=False)
    return got, steps


async def _read_measured(
    hs: SynapseHomeServer, group: int, state_filter: StateFilter, explain: bool = True
) -> tuple[dict[Key, str], int, tuple[int, int, float]]:
    """`_read`, and on PostgreSQL the rows of `state_groups_state` its query
    went through, the pages it read and its execution time (`_explain`; (0,
    0, 0.0) on SQLite)."""
    store: Any = hs.get_datastores().state

    def read(raw_txn: Any) -> tuple[dict[Key, str], int, tuple[int, int, float]]:
        txn = _Recording(raw_txn)
        conn = getattr(raw_txn.txn, "connection", None)
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
        measured = (0, 0, 0.0)
        if explain and not counting:
            measured = _explain(raw_txn, txn.statements, "state_groups_state")
        return dict(result[group]), steps[0], measured

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

    if db_backend == "postgres":
        # The partial /send_join's read: every non-member key and the joiner's
        # membership (absent here) plus one present membership; then several
        # named types. The rows returned, a few lookups, not the group's
        # MEMBERS memberships dropped by a filter.
        joiner = StateFilter.freeze(
            {EventTypes.Member: {"@joiner:else.example", _member(7)[1]}}, include_others=True
        )
        several = _several_types_filters()[0]
        top_group = max(expected)
        for state_filter in (joiner, several):
            for read_group in (base_group, top_group):
                got, _, (rows, blocks, ms) = await _read_measured(homeserver, read_group, state_filter)
                assert got == state_filter.filter_state(expected[read_group])
                what = f"{rows} rows of state_groups_state, {blocks} pages read ({ms:.1f} ms)"
                assert rows < 200, f"{what}: a pass over the group"
                assert blocks < PAGES, f"{what}: a pass over the group or its index"


async def _read_current(
    hs: SynapseHomeServer, room_id: str, state_filter: StateFilter
) -> tuple[dict[Key, str], int]:
    """The room's current state under `state_filter` from the database (the
    store's caches of it cleared first), and the SQLite VM steps (thousands)
    its reads took."""
    got, steps, _ = await _read_current_measured(hs, room_id, state_filter, explain=False)
    return got, steps


async def _read_current_measured(
    hs: SynapseHomeServer, room_id: str, state_filter: StateFilter, explain: bool = True
) -> tuple[dict[Key, str], int, tuple[int, int, float]]:
    """`_read_current`, and on PostgreSQL the rows of `current_state_events`
    its queries went through, the pages they read and their execution time
    (`_explain`)."""
    store: Any = hs.get_datastores().main
    store._get_current_state_event_id.invalidate_all()
    store.get_partial_current_state_ids.invalidate_all()
    steps = [0]
    counted: list[Any] = []
    measured = [0, 0, 0.0]
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
            recording = _Recording(txn)
            try:
                result = func(recording, *a, **k)
            finally:
                if counted:
                    counted.pop().set_progress_handler(None, 0)
            if explain and (conn is None or not hasattr(conn, "set_progress_handler")):
                rows, blocks, ms = _explain(txn, recording.statements, "current_state_events")
                measured[0] += rows
                measured[1] += blocks
                measured[2] += ms
            return result

        return await original(desc, wrapped, *args, **kwargs)

    pool.runInteraction = counting
    try:
        result = await store.get_partial_filtered_current_state_ids(room_id, state_filter)
    finally:
        pool.runInteraction = original
    return dict(result), steps[0], (int(measured[0]), int(measured[1]), float(measured[2]))


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

    if db_backend == "postgres":
        room_id = "!big:state.example"
        whole = {key: f"{event_id}{room_id}" for key, event_id in rooms[room_id].items()}
        for state_filter in (
            StateFilter.freeze({EventTypes.Member: {"@joiner:else.example", _member(3)[1]}}, include_others=True),
            _several_types_filters()[0],
        ):
            got, _, (rows, blocks, ms) = await _read_current_measured(homeserver, room_id, state_filter)
            assert got == state_filter.filter_state(whole)
            what = f"{rows} rows of current_state_events, {blocks} pages read ({ms:.1f} ms)"
            assert rows < 200, f"{what}: a pass over the room"
            assert blocks < PAGES, f"{what}: a pass over the room or its index"


def _arm_matches(clause: str, args: list[str], key: Key, before: Any) -> bool:
    """Evaluate one arm of `StateFilter.make_sql_index_range_arms` on a key,
    with `before(a, b)` the database's order of text."""
    typ, state_key = key
    values = iter(args)
    for term in clause.split(" AND "):
        if term == "type = ?":
            ok = typ == next(values)
        elif term == "state_key = ?":
            ok = state_key == next(values)
        elif term == "type < ?":
            ok = before(typ, next(values))
        elif term == "type > ?":
            ok = before(next(values), typ)
        elif term.startswith("type NOT IN ("):
            ok = typ not in [next(values) for _ in range(term.count("?"))]
        else:
            raise AssertionError(f"unexpected term {term!r}")
        if not ok:
            return False
    assert next(values, None) is None, (clause, args)
    return True


def test_range_arms_match_the_filter_in_any_text_order() -> None:
    """The arms match exactly the filter's keys, each key one arm in Python's
    order (SQLite's, PostgreSQL's C collation), and still exactly the filter's
    keys (some in two ranges) in another order (a PostgreSQL database with
    `allow_unsafe_locale`): here case-insensitive, and reversed."""
    keys = [*_base(), *(key for delta in DELTAS for key in delta)]
    keys += [("A.CUSTOM", "one"), ("M.Room.Member", "@u7:s7.example"), ("b.new_type", "y"), ("0.before.all", "x")]
    orders = {
        "python": lambda a, b: a < b,
        "casefold": lambda a, b: (a.casefold(), a) < (b.casefold(), b),
        "reversed": lambda a, b: a > b,
    }
    for state_filter in _several_types_filters() + [
        StateFilter.freeze({EventTypes.Member: {"@joiner:else.example", _member(7)[1]}}, include_others=True),
        StateFilter.freeze({EventTypes.Member: set()}, include_others=True),
        StateFilter.from_types([(EventTypes.JoinRules, ""), ("a.custom", None)]),  # type: ignore[list-item]
    ]:
        arms = state_filter.make_sql_index_range_arms()
        wanted = set(state_filter.filter_state({key: "" for key in keys}))
        for name, before in orders.items():
            matched = {key: sum(_arm_matches(c, a, key, before) for c, a in arms) for key in keys}
            assert {key for key, n in matched.items() if n} == wanted, (name, state_filter)
            if name == "python":
                assert set(matched.values()) <= {0, 1}, state_filter
