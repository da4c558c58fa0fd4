# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""The presence handler's fan-out of a join (patch 0030) and
`get_current_hosts_in_room` (patch 0031) get from the module exactly what
Synapse computes from the room's member list, on SQLite and PostgreSQL
(`--db`).

A real in-process HomeServer persists rooms (versions 10 and 12) through
Synapse's own event persistence, with local members (the homeserver's own
server name), members of several remote servers (one with a single member),
and every kind of membership change (leaves, kicks, bans, rejected events);
some rooms before the module's tables exist (the schema step fills the
per-server counts), some after (the triggers keep them), then the membership
column rewritten in place and a room purged. After each step:

- the per-server counts (`fastjoin_room_server_joined_counts`) equal
  Synapse's `get_users_in_room` counted by `get_domain_from_id`, and the
  module's servers of the room equal Synapse's `get_current_hosts_in_room`
  (its own PostgreSQL query, or the member list on SQLite);
- for many sets of "newly joined" users (none; one of a server with others;
  the only member of a server; every member of a server; a local user; a user
  who joined and has left since; a user never in the room; mixtures), the
  module's `JoinFanout.prev_members` equals what Synapse's
  `_handle_state_delta` computes from `get_users_in_room`: the same local
  users and the same remote servers.

Then through the patch's hook: a real join's state deltas handed to
Synapse's `PresenceHandler._handle_state_delta`, once with no callback
registered and once with the module's, make the same presence sends (same
destinations, same users' states); and `get_current_hosts_in_room`, asked of
the module, follows the next membership changes. A dropped trigger makes the
module leave both answers to Synapse until the main process restores the
triggers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from synapse.app.homeserver import SynapseHomeServer
from synapse.storage.engines import PostgresEngine
from synapse.types import get_domain_from_id

from synapse_fastjoin.handlers.presence import JoinFanout
from synapse_fastjoin.storage.member_counts import joined_servers_txn
from synapse_fastjoin.storage.schema import prepare_schema_txn
from synapse_fastjoin.storage.store import FastJoinStore
from tests.harness.inprocess import homeserver_on_fresh_database
from tests.harness.rooms import CREATOR, REMOTE, Room, rewrite_membership_txn
from tests.harness.rooms import persist as _persist

SERVER = "fanout.test"
OTHER = "other.example"
SINGLE = "single.example:8448"  # a server name with a port: after the first colon


def _local(i: int) -> str:
    return f"@local{i}:{SERVER}"


def _build(room: Room, base: int) -> dict[str, list[str]]:
    """Members of three remote servers and local ones, with churn; returns the
    users by role for the test's choices of newly joined sets."""
    remote = [f"@r{base + i}:{REMOTE}" for i in range(12)]
    other = [f"@o{base + i}:{OTHER}" for i in range(4)]
    single = f"@s{base}:{SINGLE}"
    local = [_local(base + i) for i in range(3)]
    for user in remote + other + [single] + local:
        room.member(user, "join")
    room.member(remote[1], "join", displayname="Renamed")  # join -> join
    room.member(remote[2], "leave")
    room.member(remote[3], "leave", by=CREATOR)  # kick
    room.member(remote[4], "ban", by=CREATOR)
    room.member(local[2], "leave")
    room.member(remote[5], "leave", kind="rejected")  # rejected: still joined
    room.member(f"@never{base}:{OTHER}", "join", kind="rejected")
    return {
        "remote": remote,
        "other": other,
        "single": [single],
        "local": local,
        "gone": [remote[2], remote[3], remote[4], local[2]],
    }


def _newly_joined_sets(users: dict[str, list[str]]) -> list[set[str]]:
    return [
        set(),
        {users["remote"][0]},
        set(users["single"]),
        set(users["other"]),
        {users["local"][0]},
        set(users["local"][:2]),
        {users["gone"][0]},  # joined, then left
        {users["gone"][3]},  # a local user who left
        {f"@nobody:{REMOTE}"},
        {"@nobody:elsewhere.example"},
        set(users["other"]) | set(users["single"]) | {users["local"][1], users["gone"][1]},
        set(users["remote"]) | set(users["other"]) | set(users["single"]) | set(users["local"]),
    ]


def _stock(users: list[str], newly_joined: set[str]) -> tuple[set[str], set[str]]:
    """Synapse's computation in `_handle_state_delta` (1.163.2)."""
    prev_local, prev_remote = set(), set()
    for user_id in set(users) - newly_joined:
        if user_id.split(":", 1)[1] == SERVER:
            prev_local.add(user_id)
        else:
            prev_remote.add(get_domain_from_id(user_id))
    return prev_local, prev_remote


async def _assert_fanout_equal(
    hs: SynapseHomeServer, fastjoin: FastJoinStore, room_id: str, newly_sets: list[set[str]]
) -> None:
    fanout = JoinFanout(hs, fastjoin)
    store = hs.get_datastores().main
    store.get_users_in_room.invalidate((room_id,))
    users = list(await store.get_users_in_room(room_id))
    kept = await store.db_pool.runInteraction("kept_servers", joined_servers_txn, room_id)
    assert kept == dict(Counter(get_domain_from_id(u) for u in users)), room_id
    # Synapse's own `get_current_hosts_in_room` (its PostgreSQL query, or the
    # member list on SQLite; no callback registered yet, or it answers None)
    # and the module's answer for it (patch 0031).
    store.get_current_hosts_in_room.invalidate((room_id,))
    store.get_users_in_room.invalidate((room_id,))
    synapse_hosts = await store.get_current_hosts_in_room(room_id)
    assert await fastjoin.current_hosts_in_room(room_id) == set(synapse_hosts), room_id
    for newly in newly_sets:
        answer = await fanout.prev_members(room_id, newly)
        assert answer is not None
        local, remote = answer
        assert len(local) == len(set(local))
        assert (set(local), remote) == _stock(users, newly), (room_id, sorted(newly))


@pytest.fixture
def homeserver(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[SynapseHomeServer]:
    with homeserver_on_fresh_database("join_fanout", SERVER, db_backend, tmp_path_factory, request) as hs:
        yield hs


@pytest_twisted.ensureDeferred
async def test_fanout_equals_synapse_member_list(homeserver: SynapseHomeServer) -> None:
    hs = homeserver
    store = hs.get_datastores().main
    presence = hs.get_presence_handler()
    # Synapse's own presence processing stays out of the way: the test calls
    # the handler itself.
    presence._event_processing = True  # type: ignore[attr-defined]
    rooms = {f"{v}-{tag}": Room(v, tag) for v in ("10", "12") for tag in ("before", "after", "purged")}
    roles: dict[str, dict[str, list[str]]] = {}

    for key in ("10-before", "12-before"):
        roles[key] = _build(rooms[key], 0)
        await _persist(hs, rooms[key])
    await store.db_pool.runInteraction("fastjoin_prepare_schema", prepare_schema_txn)
    fastjoin = FastJoinStore(hs.get_module_api().run_db_interaction, may_migrate=True)
    fanout = JoinFanout(hs, fastjoin)
    for key in ("10-before", "12-before"):
        await _assert_fanout_equal(hs, fastjoin, rooms[key].room_id, _newly_joined_sets(roles[key]))

    # Event by event after the schema step: the triggers keep the counts.
    for key, room in rooms.items():
        later = _build(room, 100)
        roles[key] = {role: roles.get(key, {}).get(role, []) + later[role] for role in later}
        for raw in list(room.pending):
            room.pending = [raw]
            await _persist(hs, room)
        await _assert_fanout_equal(hs, fastjoin, room.room_id, _newly_joined_sets(roles[key]))

    # A batch too big for the module: left to Synapse.
    target = rooms["12-after"].room_id
    too_many = {f"@n{i}:{REMOTE}" for i in range(JoinFanout.MAX_NEWLY_JOINED + 1)}
    assert await fanout.prev_members(target, too_many) is None

    # The membership column rewritten in place (an UPDATE, as Synapse's
    # background update does): to NULL, then filled again.
    await store.db_pool.runInteraction("null_membership", rewrite_membership_txn, target, False)
    assert await store.db_pool.runInteraction("kept_servers", joined_servers_txn, target) == {}
    await store.db_pool.runInteraction("fill_membership", rewrite_membership_txn, target, True)
    await _assert_fanout_equal(hs, fastjoin, target, _newly_joined_sets(roles["12-after"]))

    for key in ("10-purged", "12-purged"):
        await store.purge_room(rooms[key].room_id)
        assert await store.db_pool.runInteraction(
            "kept_servers", joined_servers_txn, rooms[key].room_id
        ) == {}

    # Through the patch's hook: each join's deltas handed to Synapse's
    # handler twice, the callback answering None (Synapse reads the member
    # list) and then the module's answer, make the same sends.
    sends: list[tuple[frozenset[str], tuple[str, ...]]] = []

    async def record(destinations: Any, states: Any) -> None:
        sends.append((frozenset(destinations), tuple(sorted(s.user_id for s in states))))

    presence._federation_queue.send_presence_to_destinations = record  # type: ignore[attr-defined]
    answering = [False]
    answered: list[frozenset[str]] = []

    async def callback(room_id: str, newly: Any) -> Any:
        if not answering[0]:
            return None
        answer = await fanout.prev_members(room_id, newly)
        assert answer is not None
        answered.append(frozenset(newly))
        return answer

    hs.get_module_api().register_fastjoin_callbacks(presence_join_fanout=callback)  # type: ignore[attr-defined]
    # A local member active now, so that its state is among those sent.
    room = rooms["10-after"]
    local_member = roles["10-after"]["local"][0]
    state = await presence.current_state_for_user(local_member)
    await presence._update_states(
        [state.copy_and_replace(state="online", last_active_ts=hs.get_clock().time_msec())]
    )

    async def fan_out(deltas: list[Any], module: bool) -> list[tuple[frozenset[str], tuple[str, ...]]]:
        sends.clear()
        answering[0] = module
        await presence._handle_state_delta(room.room_id, deltas)
        return sorted(sends, key=lambda send: (sorted(send[0]), send[1]))

    # Each join, and whether Synapse sends anything for it.
    joins = [
        (["@first:late.example"], True),  # a new server: the local states to it
        (["@second:late.example", f"@r900:{REMOTE}"], False),  # servers already in
        ([_local(900)], True),  # a local user: its state to every server
        (["@third:new.example", _local(901), "@fourth:new.example"], True),
    ]
    seen_new_server = False
    for users, sent in joins:
        before = store.get_room_max_stream_ordering()
        for user in users:
            room.member(user, "join")
        await _persist(hs, room)
        _, deltas = await hs.get_storage_controllers().state.get_current_state_deltas(
            before, store.get_room_max_stream_ordering()
        )
        deltas = [d for d in deltas if d.room_id == room.room_id]
        synapse_sends = await fan_out(deltas, module=False)
        module_sends = await fan_out(deltas, module=True)
        assert answered and answered[-1] == frozenset(users), answered
        assert bool(synapse_sends) == sent, (users, synapse_sends)
        assert module_sends == synapse_sends, (users, synapse_sends, module_sends)
        seen_new_server |= any(
            "late.example" in dests and local_member in who for dests, who in synapse_sends
        )
    assert seen_new_server, "a new server was never sent the local member's presence"

    # Synapse's `get_current_hosts_in_room` through the hook (patch 0031):
    # the module answers, and a membership change invalidates the answer.
    asked: list[str] = []

    async def hosts(room_id: str) -> Any:
        asked.append(room_id)
        return await fastjoin.current_hosts_in_room(room_id)

    hs.get_module_api().register_fastjoin_callbacks(current_hosts_in_room=hosts)  # type: ignore[attr-defined]
    store.get_current_hosts_in_room.invalidate((room.room_id,))
    before_hosts = await store.get_current_hosts_in_room(room.room_id)
    assert asked == [room.room_id] and "late.example" in before_hosts
    for user in ("@first:late.example", "@second:late.example"):
        room.member(user, "leave")
    room.member("@fifth:newest.example", "join")
    await _persist(hs, room)
    after_hosts = await store.get_current_hosts_in_room(room.room_id)
    assert len(asked) == 2
    assert set(after_hosts) == (set(before_hosts) - {"late.example"}) | {"newest.example"}

    # A trigger dropped: the module leaves the answer to Synapse.
    def drop_trigger(txn: Any) -> None:
        if isinstance(txn.database_engine, PostgresEngine):
            txn.execute("DROP TRIGGER fastjoin_server_counts_delete ON current_state_events")
        else:
            txn.execute("DROP TRIGGER fastjoin_server_counts_delete")

    await store.db_pool.runInteraction("drop_trigger", drop_trigger)
    worker_store = FastJoinStore(hs.get_module_api().run_db_interaction, may_migrate=False)
    assert await JoinFanout(hs, worker_store).prev_members(target, {f"@x:{REMOTE}"}) is None
    assert await worker_store.current_hosts_in_room(target) is None
    await store.db_pool.runInteraction("fastjoin_prepare_schema", prepare_schema_txn)
    again = FastJoinStore(hs.get_module_api().run_db_interaction, may_migrate=True)
    await _assert_fanout_equal(hs, again, target, _newly_joined_sets(roles["12-after"]))

