"""The catch-up's write of a run of events brought to full state
(`storage/partial_state.py`, `un_partial_state_events_txn`: a few statements
for the whole run) writes the rows Synapse's
`_update_state_for_partial_state_event_txn` writes event by event, on SQLite
and PostgreSQL.

Two fresh HomeServers ("synapse" and "ours"), each on its own database, hold
the same partial-state events (accepted and rejected ones); the same events
and contexts are handed to Synapse's function, one call per event, on one and
to the module's, one call for all, on the other, in one transaction each. The
four tables it writes must be identical (the rejections' check times aside),
and so must the caches it fills. Each of the four ways an event's verdict can
go (accepted or rejected, before and after) is covered, and a run that names
an event no longer partial fails whole on both sides.
"""

from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from synapse.api.errors import StoreError
from synapse.api.room_versions import RoomVersions
from synapse.app.homeserver import SynapseHomeServer
from synapse.events import make_event_from_dict
from synapse.storage.engines import Sqlite3Engine

from synapse_fastjoin.storage.partial_state import sqlite_update_state_groups_sql, un_partial_state_events_txn

# Two fresh HomeServers, "synapse" and "ours", each on its own database.
from tests.unit.test_catchup_state_groups import homeservers  # noqa: F401 (fixture)
from tests.unit.test_storage import database  # noqa: F401 (fixture)

ROOM = "!room:a.test"
TABLES = {
    "event_to_state_groups": "event_id, state_group",
    "partial_state_events": "room_id, event_id",
    "rejections": "event_id, reason",
    "un_partial_stated_event_stream": "stream_id, instance_name, event_id, rejection_status_changed",
    "events": "event_id, rejection_reason",
}
# (rejected before, rejected now) for event i, by i % 4.
VERDICTS = [(None, None), (None, "auth_error"), ("auth_error", None), ("auth_error", "auth_error")]
COUNT = 1203  # more than two of the module's batches of 500


def _items(count: int) -> list[tuple[Any, Any, int]]:
    """(event, context, stream ID): the event's context gives it group
    1000 + i, the group before it 500 + i."""
    items = []
    for i in range(count):
        event = make_event_from_dict(
            {
                "type": "m.room.message",
                "room_id": ROOM,
                "sender": f"@u{i}:a.test",
                "content": {"body": str(i)},
                "event_id": f"$e{i}",
                "depth": 10 + i,
                "prev_events": [],
                "auth_events": [],
                "origin_server_ts": 1_700_000_000_000 + i,
                "hashes": {"sha256": "x"},
                "signatures": {},
            },
            RoomVersions.V1,
            rejected_reason=VERDICTS[i % 4][0],
        )
        context = SimpleNamespace(
            rejected=VERDICTS[i % 4][1], state_group=1000 + i, state_group_before_event=500 + i
        )
        items.append((event, context, 100 + i))
    return items


async def _prepare(hs: SynapseHomeServer, count: int) -> None:
    """The rows the events have while partial: group 1 each, partial, and a
    rejection for those rejected then."""

    def txn(t: Any) -> None:
        t.execute("INSERT INTO rooms (room_id, is_public, room_version) VALUES (?, ?, '1')", (ROOM, False))
        t.execute(
            "INSERT INTO partial_state_rooms (room_id, device_lists_stream_id, joined_via) VALUES (?, 1, 'a.test')",
            (ROOM,),
        )
        t.execute_batch(
            "INSERT INTO events (stream_ordering, topological_ordering, event_id, type, room_id, processed,"
            " outlier, depth, sender, rejection_reason) VALUES (?, ?, ?, 'm.room.message', ?, ?, ?, ?, ?, ?)",
            [
                (10 + i, 10 + i, f"$e{i}", ROOM, True, False, 10 + i, f"@u{i}:a.test", VERDICTS[i % 4][0])
                for i in range(count)
            ],
        )
        t.execute_batch(
            "INSERT INTO event_to_state_groups (event_id, state_group) VALUES (?, 1)",
            [(f"$e{i}",) for i in range(count)],
        )
        t.execute_batch(
            "INSERT INTO partial_state_events (room_id, event_id) VALUES (?, ?)",
            [(ROOM, f"$e{i}") for i in range(count)],
        )
        t.execute_batch(
            "INSERT INTO rejections (event_id, reason, last_check) VALUES (?, ?, '1')",
            [(f"$e{i}", "auth_error") for i in range(count) if VERDICTS[i % 4][0]],
        )

    await hs.get_datastores().main.db_pool.runInteraction("test_prepare", txn)


async def _tables(hs: SynapseHomeServer) -> dict[str, list[tuple[Any, ...]]]:
    def read(txn: Any) -> dict[str, list[tuple[Any, ...]]]:
        out = {}
        for table, columns in TABLES.items():
            txn.execute(f"SELECT {columns} FROM {table}")
            out[table] = sorted((tuple(row) for row in txn), key=repr)
        return out

    return await hs.get_datastores().main.db_pool.runInteraction("test_tables", read)


async def _synapse_write(hs: SynapseHomeServer, items: list[Any]) -> None:
    store = hs.get_datastores().main

    def txn(t: Any) -> None:
        for event, context, stream_id in items:
            store._update_state_for_partial_state_event_txn(t, event, context, stream_id)

    await store.db_pool.runInteraction("test_synapse_write", txn)


async def _our_write(hs: SynapseHomeServer, items: list[Any]) -> None:
    store = hs.get_datastores().main
    await store.db_pool.runInteraction(
        "test_our_write", un_partial_state_events_txn, store, items
    )


@pytest_twisted.ensureDeferred
async def test_a_run_written_at_once_writes_synapses_rows(
    homeservers: dict[str, SynapseHomeServer],  # noqa: F811
) -> None:
    synapse, ours = homeservers["synapse"], homeservers["ours"]
    for hs in (synapse, ours):
        await _prepare(hs, COUNT + 1)
    # The same partial-state cache entries on both sides, to be invalidated.
    for hs in (synapse, ours):
        assert await hs.get_datastores().main.is_partial_state_event("$e0")

    await _synapse_write(synapse, _items(COUNT))
    await _our_write(ours, _items(COUNT))

    expected = await _tables(synapse)
    assert await _tables(ours) == expected
    # The run changed what it should: one partial event left, every verdict
    # change in the stream, the groups moved.
    assert expected["partial_state_events"] == [(ROOM, f"$e{COUNT}")]
    changed = [row for row in expected["un_partial_stated_event_stream"] if row[3]]
    assert len(changed) == COUNT // 2 + (1 if COUNT % 4 > 1 else 0)
    # The caches: the same entries on both sides (each event's new group,
    # under the key Synapse's reads use).
    caches = []
    for hs in (synapse, ours):
        store = hs.get_datastores().main
        assert not await store.is_partial_state_event("$e0")
        cache = store._get_state_group_for_event.cache
        caches.append(
            [cache.get_immediate(key, None) for i in range(COUNT) for key in ((f"$e{i}",), f"$e{i}")]
        )
    assert caches[0] == caches[1]
    assert caches[0][1] == 1000 and caches[0][3] == 501, caches[0][:4]


@pytest_twisted.ensureDeferred
async def test_a_run_naming_an_event_no_longer_partial_fails_whole(
    homeservers: dict[str, SynapseHomeServer],  # noqa: F811
) -> None:
    synapse, ours = homeservers["synapse"], homeservers["ours"]
    for hs in (synapse, ours):
        await _prepare(hs, 10)

        def drop(t: Any) -> None:
            t.execute("DELETE FROM partial_state_events WHERE event_id = '$e7'")

        await hs.get_datastores().main.db_pool.runInteraction("test_drop", drop)
    before = await _tables(synapse)
    assert await _tables(ours) == before

    with pytest.raises(StoreError):
        await _synapse_write(synapse, _items(10))
    with pytest.raises(StoreError):
        await _our_write(ours, _items(10))
    assert await _tables(synapse) == before
    assert await _tables(ours) == before


def test_sqlite_update_finds_each_row_by_the_event_id_index(database):  # noqa: F811
    """The batch's one UPDATE on SQLite looks each event up by the unique
    event_id index, driven from its VALUES list, and never scans the table
    (which holds every event of every room)."""
    if not isinstance(database.engine, Sqlite3Engine):
        pytest.skip("SQLite's statement")
    for i in range(200):
        database.execute("INSERT INTO event_to_state_groups (event_id, state_group) VALUES (?, ?)", f"$e{i}", i)
    database.execute("ANALYZE")
    plan = " / ".join(
        str(row[-1])
        for row in database.execute("EXPLAIN QUERY PLAN " + sqlite_update_state_groups_sql(2), "$e1", 7, "$e2", 8)
    )
    assert "SEARCH event_to_state_groups USING" in plan and "(event_id=?)" in plan, plan
    assert "SCAN event_to_state_groups" not in plan, plan
    database.execute(sqlite_update_state_groups_sql(2), "$e1", 7, "$e2", 8)
    rows = database.execute("SELECT event_id, state_group FROM event_to_state_groups WHERE state_group IN (7, 8, 1, 2)")
    assert sorted(tuple(r) for r in rows) == [("$e1", 7), ("$e2", 8), ("$e7", 7), ("$e8", 8)]
