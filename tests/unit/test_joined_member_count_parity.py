# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""The joined-member counts kept by the module's triggers
(`storage/member_counts.py`, patch 0022) equal Synapse's own `COUNT(*)`
(`get_number_joined_users_in_room` with no callback registered) after every
write, on SQLite and PostgreSQL (`--db`).

A real in-process HomeServer persists rooms (versions 10 and 12) through
Synapse's own event persistence: joins, profile changes, leaves, kicks, bans,
unbans, invites, knocks, joins again, rejected membership events; some rooms
before the module's tables exist (the schema step fills the counts), some
after (the triggers keep them). Then the membership column is rewritten (an
UPDATE, as Synapse's background update does), and one room is purged. After
each step every room's kept count must equal Synapse's count; and through the
patch's hook, with the module's callback registered, the cached
`get_number_joined_users_in_room` answers the same and is invalidated by the
next membership change. A dropped trigger makes the module leave the count
to Synapse, and the main process's next start restores the triggers and
counts anew.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from synapse.app.homeserver import SynapseHomeServer
from synapse.storage.engines import PostgresEngine

from synapse_fastjoin.storage.member_counts import joined_member_count_txn
from synapse_fastjoin.storage.schema import prepare_schema_txn
from synapse_fastjoin.storage.store import FastJoinStore
from tests.harness.inprocess import homeserver_on_fresh_database
from tests.harness.rooms import CREATOR, REMOTE, Room, rewrite_membership_txn
from tests.harness.rooms import persist as _persist

SERVER = "counts.test"


async def _assert_counts_equal(hs: SynapseHomeServer, room_ids: list[str]) -> dict[str, int]:
    store = hs.get_datastores().main
    counts = {}
    for room_id in room_ids:
        store.get_number_joined_users_in_room.invalidate((room_id,))
        theirs = await store.get_number_joined_users_in_room(room_id)
        ours = await store.db_pool.runInteraction("kept_count", joined_member_count_txn, room_id)
        assert ours == theirs, f"{room_id}: kept {ours}, Synapse counts {theirs}"
        counts[room_id] = theirs
    # Nothing kept for a room Synapse does not count (purged, or unknown).
    rows = await store.db_pool.execute(
        "all_kept", "SELECT room_id, joined FROM fastjoin_room_joined_counts WHERE joined <> 0"
    )
    for room_id, joined in rows:
        store.get_number_joined_users_in_room.invalidate((room_id,))
        assert joined == await store.get_number_joined_users_in_room(room_id), room_id
    return counts


def _churn(room: Room, base: int) -> None:
    """Every kind of membership change, around members base..base+40."""
    users = [f"@u{base + i}:{REMOTE if i % 2 else 'other.example'}" for i in range(40)]
    for i, user in enumerate(users):
        if i % 9 == 0:
            room.member(user, "invite")
        if i % 11 == 0:
            room.member(user, "knock")
        room.member(user, "join", displayname=f"User {i}")
    room.member(users[1], "join", displayname="Renamed")  # join -> join
    room.member(users[2], "leave")
    room.member(users[3], "leave", by=CREATOR)  # kick
    room.member(users[4], "ban", by=CREATOR)
    room.member(users[5], "ban", by=CREATOR)
    room.member(users[5], "leave", by=CREATOR)  # unban
    room.member(users[2], "join")  # back
    room.member(users[6], "leave", kind="rejected")  # rejected: still joined
    room.member(f"@never:{REMOTE}", "join", kind="rejected")  # rejected: never joined
    room.member(users[4], "join", kind="rejected")  # banned: stays banned
    room.member(f"@late:{REMOTE}", "invite")
    room.member(f"@late:{REMOTE}", "leave")  # invite rejected


@pytest.fixture
def homeserver(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[SynapseHomeServer]:
    with homeserver_on_fresh_database("joined_counts", SERVER, db_backend, tmp_path_factory, request) as hs:
        yield hs


@pytest_twisted.ensureDeferred
async def test_kept_counts_equal_synapse_count(homeserver: SynapseHomeServer) -> None:
    hs = homeserver
    store = hs.get_datastores().main
    rooms = {f"{v}-{tag}": Room(v, tag) for v in ("10", "12") for tag in ("before", "after", "purged")}

    # Rooms with members before the module's tables exist: the schema step
    # fills their counts.
    for key in ("10-before", "12-before"):
        _churn(rooms[key], 0)
        await _persist(hs, rooms[key])
    await store.db_pool.runInteraction("fastjoin_prepare_schema", prepare_schema_txn)
    ids = [r.room_id for r in rooms.values()]
    await _assert_counts_equal(hs, ids)

    # Every change after: the triggers keep the counts, event by event.
    for key, room in rooms.items():
        _churn(room, 100)
        for raw in list(room.pending):
            room.pending = [raw]
            await _persist(hs, room)
            await _assert_counts_equal(hs, [room.room_id])
    counts = await _assert_counts_equal(hs, ids)
    assert all(c > 30 for c in counts.values()), counts

    # The membership column rewritten in place (Synapse's background update
    # `current_state_events_membership` is such an UPDATE): set to NULL, then
    # filled again.
    target = rooms["12-after"].room_id
    await store.db_pool.runInteraction("null_membership", rewrite_membership_txn, target, False)
    assert (await _assert_counts_equal(hs, [target]))[target] == 0
    await store.db_pool.runInteraction("fill_membership", rewrite_membership_txn, target, True)
    assert (await _assert_counts_equal(hs, [target]))[target] == counts[target]

    # A purged room: no current state, no count.
    for key in ("10-purged", "12-purged"):
        await store.purge_room(rooms[key].room_id)
    await _assert_counts_equal(hs, ids)
    assert await store.db_pool.runInteraction(
        "kept_count", joined_member_count_txn, rooms["12-purged"].room_id
    ) == 0

    # Through the patch's hook: the module's answer, cached by Synapse and
    # invalidated by the next membership change.
    fastjoin = FastJoinStore(hs.get_module_api().run_db_interaction, may_migrate=True)
    hs.get_module_api().register_fastjoin_callbacks(joined_member_count=fastjoin.joined_member_count)  # type: ignore[attr-defined]
    room = rooms["10-after"]
    store.get_number_joined_users_in_room.invalidate((room.room_id,))
    before = await store.get_number_joined_users_in_room(room.room_id)
    assert before == counts[room.room_id]
    room.member(f"@hook:{REMOTE}", "join")
    await _persist(hs, room)
    assert await store.get_number_joined_users_in_room(room.room_id) == before + 1
    room.member(f"@hook:{REMOTE}", "leave")
    room.member(f"@u101:{REMOTE}", "ban", by=CREATOR)
    await _persist(hs, room)
    assert await store.get_number_joined_users_in_room(room.room_id) == before - 1
    rows = await store.db_pool.execute(
        "count", "SELECT COUNT(*) FROM current_state_events WHERE room_id = ? AND membership = 'join'", room.room_id
    )
    assert rows[0][0] == before - 1

    # A trigger dropped (by hand): the table goes stale, so the module must not
    # answer from it; the main process's next start restores it all.
    def drop_trigger(txn: Any) -> None:
        if isinstance(txn.database_engine, PostgresEngine):
            txn.execute("DROP TRIGGER fastjoin_joined_counts_delete ON current_state_events")
        else:
            txn.execute("DROP TRIGGER fastjoin_joined_counts_delete")

    await store.db_pool.runInteraction("drop_trigger", drop_trigger)
    room.member(f"@u107:{REMOTE}", "leave")
    await _persist(hs, room)
    store.get_number_joined_users_in_room.invalidate((room.room_id,))
    # A worker (which does not upgrade the tables) sees it and leaves the count to Synapse.
    worker = FastJoinStore(hs.get_module_api().run_db_interaction, may_migrate=False)
    assert await worker.joined_member_count(room.room_id) is None
    assert await store.db_pool.runInteraction(
        "kept_count", joined_member_count_txn, room.room_id
    ) == before - 1  # stale: the leave was not counted
    await store.db_pool.runInteraction("fastjoin_prepare_schema", prepare_schema_txn)
    again = FastJoinStore(hs.get_module_api().run_db_interaction, may_migrate=True)
    assert await again.joined_member_count(room.room_id) == before - 2
    await _assert_counts_equal(hs, ids)
