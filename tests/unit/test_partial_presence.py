"""Presence from the servers of partial-state rooms (handlers/presence.py,
asked by patch 0018): who a local user may be shown while a room is partial."""

import sqlite3
from typing import Any

from synapse_fastjoin.handlers.presence import PartialStatePresence
from tests.harness.sync_run import run

ME = "hs1.test"
ALICE = f"@alice:{ME}"
PARTIAL = "!partial:resident.test"
FULL = "!full:hs1.test"



class FakeDbPool:
    def __init__(self, presence_rows: list[tuple[int, str]]) -> None:
        self.conn = sqlite3.connect(":memory:")
        self.conn.execute("CREATE TABLE presence_stream (stream_id BIGINT, user_id TEXT)")
        self.conn.executemany("INSERT INTO presence_stream VALUES (?, ?)", presence_rows)
        self.queries = 0

    async def runInteraction(self, desc: str, func: Any, *args: Any) -> Any:
        self.queries += 1
        return func(self.conn.cursor(), *args)


class FakeStore:
    def __init__(self, presence_rows: list[tuple[int, str]]) -> None:
        self.partial_rooms = {PARTIAL}
        self.rooms_for_user = {ALICE: {PARTIAL, FULL}}
        self.servers_at_join = {PARTIAL: {"resident.test", ME}}
        self.hosts_in_room = {PARTIAL: {ME, "joined-since.test"}, FULL: {ME, "full-room.test"}}
        self.db_pool = FakeDbPool(presence_rows)

    async def get_partial_rooms(self) -> set[str]:
        return set(self.partial_rooms)

    async def get_rooms_for_user(self, user_id: str) -> frozenset[str]:
        return frozenset(self.rooms_for_user.get(user_id, ()))

    async def get_partial_state_servers_at_join(self, room_id: str) -> set[str] | None:
        if room_id not in self.partial_rooms:
            return None
        return self.servers_at_join.get(room_id, set())

    async def get_current_hosts_in_room(self, room_id: str) -> set[str]:
        return self.hosts_in_room.get(room_id, set())


class FakeHs:
    hostname = ME

    def __init__(self, store: FakeStore) -> None:
        self._store = store

    def get_datastores(self) -> Any:
        store = self._store

        class Datastores:
            main = store

        return Datastores()


ROWS = [
    (5, "@derek:resident.test"),  # server named by the resident at the join
    (6, "@elsie:joined-since.test"),  # server with a member joined since
    (7, "@mallory:elsewhere.test"),  # server that cannot be in the room
    (8, "@bob:full-room.test"),  # shares only a full-state room (Synapse decides)
    (9, f"@carol:{ME}"),  # local
    (10, "@late:resident.test"),
]


def _presence(rows=ROWS) -> tuple[PartialStatePresence, FakeStore]:
    store = FakeStore(rows)
    return PartialStatePresence(FakeHs(store)), store  # type: ignore[arg-type]


def test_users_of_the_partial_rooms_servers_only():
    presence, _ = _presence()
    users = run(presence.users_in_partial_rooms(ALICE, None))
    assert set(users) == {
        "@derek:resident.test",
        "@elsie:joined-since.test",
        "@late:resident.test",
    }


def test_from_key_limits_to_newer_updates():
    presence, _ = _presence()
    users = run(presence.users_in_partial_rooms(ALICE, 6))
    assert set(users) == {"@late:resident.test"}


def test_nothing_without_a_partial_room_and_no_query():
    presence, store = _presence()
    store.partial_rooms = set()
    assert set(run(presence.users_in_partial_rooms(ALICE, None))) == set()
    assert store.db_pool.queries == 0


def test_user_not_in_the_partial_room_gets_nothing():
    presence, store = _presence()
    store.rooms_for_user["@bob:hs1.test"] = {FULL}
    assert set(run(presence.users_in_partial_rooms("@bob:hs1.test", None))) == set()
    assert store.db_pool.queries == 0


def test_resync_done_meanwhile_falls_back_to_synapse():
    # The room is still in the cached partial set but its join-time servers
    # are gone: the resync ended, full state decides.
    presence, store = _presence()
    store.servers_at_join = {}
    store.get_partial_state_servers_at_join = _none  # type: ignore[method-assign]
    assert set(run(presence.users_in_partial_rooms(ALICE, None))) == set()


async def _none(room_id: str) -> None:
    return None


def test_servers_never_include_ourselves():
    presence, _ = _presence()
    servers = run(presence.servers_in_partial_rooms(ALICE))
    assert servers == {"resident.test", "joined-since.test"}
