"""Remote device lists cached on a wrong belief about a partial-state room
(handlers/device_lists.py, called by the engine when a resync ends)."""

from typing import Any

from synapse_fastjoin.handlers.device_lists import RemoteDeviceListCheck
from tests.harness.sync_run import run

ROOM = "!room:resident.test"
ME = "hs1.test"
ELSIE = "@elsie:resident.test"
DEREK = "@derek:resident.test"
FRED = "@fred:resident.test"
ALICE = f"@alice:{ME}"



class FakeStore:
    def __init__(self) -> None:
        self.users_in_room: set[str] = {ALICE}
        self.cached: dict[str, dict[str, dict]] = {}
        self.shared: set[str] = set()
        self.unsubscribed: list[str] = []

    async def get_users_in_room(self, room_id: str) -> list[str]:
        return sorted(self.users_in_room)

    @property
    def db_pool(self) -> Any:
        store = self

        class DbPool:
            # What joined_among_txn answers (its SQL is checked against a
            # real database in test_device_list_queries.py).
            async def runInteraction(self, desc: str, func: Any, room_id: str, users: set[str]) -> set[str]:  # noqa: N802
                assert desc == "fastjoin_joined_among"
                return {u for u in users if u in store.users_in_room}

        return DbPool()

    async def get_users_whose_devices_are_cached(self, user_ids) -> set[str]:
        return {u for u in user_ids if u in self.cached}

    async def get_users_server_still_shares_room_with(self, user_ids) -> set[str]:
        return {u for u in user_ids if u in self.shared}

    async def get_cached_devices_for_user(self, user_id: str) -> dict:
        return self.cached.get(user_id, {})

    async def mark_remote_user_device_list_as_unsubscribed(self, user_id: str) -> None:
        self.unsubscribed.append(user_id)
        self.cached.pop(user_id, None)


class FakeDeviceHandler:
    def __init__(self) -> None:
        self.notified: list[tuple[str, list[str]]] = []

    async def notify_device_update(self, user_id: str, device_ids: list[str]) -> None:
        self.notified.append((user_id, sorted(device_ids)))


class FakeHs:
    def __init__(self) -> None:
        self.store = FakeStore()
        self.device_handler = FakeDeviceHandler()

    def get_datastores(self) -> Any:
        store = self.store

        class Datastores:
            main = store

        return Datastores()

    def get_device_handler(self) -> FakeDeviceHandler:
        return self.device_handler

    def is_mine_id(self, user_id: str) -> bool:
        return user_id.endswith(f":{ME}")


def _check() -> tuple[RemoteDeviceListCheck, FakeHs]:
    hs = FakeHs()
    return RemoteDeviceListCheck(hs), hs  # type: ignore[arg-type]


def test_remote_joined_users_leave_out_local_ones():
    check, hs = _check()
    hs.store.users_in_room = {ALICE, ELSIE}
    assert run(check.remote_joined_users(ROOM)) == {ELSIE}


def test_believed_joined_but_not_in_full_state_and_no_other_room():
    check, hs = _check()
    hs.store.users_in_room = {ALICE, DEREK}  # the full state
    hs.store.cached = {ELSIE: {"DEV": {}}, DEREK: {"D2": {}}}
    dropped = run(check.correct(ROOM, {ELSIE, DEREK}, set()))
    assert dropped == {ELSIE}
    assert hs.store.unsubscribed == [ELSIE]
    # No room is shared any more: nobody is told of a change.
    assert hs.device_handler.notified == []


def test_believed_joined_still_sharing_another_room_is_refetched_and_announced():
    check, hs = _check()
    hs.store.cached = {ELSIE: {"DEV": {}, "DEV2": {}}}
    hs.store.shared = {ELSIE}
    assert run(check.correct(ROOM, {ELSIE}, set())) == {ELSIE}
    assert hs.store.unsubscribed == [ELSIE]
    assert hs.device_handler.notified == [(ELSIE, ["DEV", "DEV2"])]


def test_membership_flipped_is_suspect_even_when_joined_in_both():
    # Kicked (the kick wrongly rejected while partial), then rejoined.
    check, hs = _check()
    hs.store.users_in_room = {ALICE, ELSIE}
    hs.store.cached = {ELSIE: {"DEV": {}}}
    hs.store.shared = {ELSIE}
    assert run(check.correct(ROOM, {ELSIE}, {ELSIE})) == {ELSIE}
    assert hs.device_handler.notified == [(ELSIE, ["DEV"])]


def test_consistent_memberships_and_uncached_users_are_left_alone():
    check, hs = _check()
    hs.store.users_in_room = {ALICE, ELSIE}
    hs.store.cached = {ELSIE: {"DEV": {}}}
    # Elsie joined in both; Fred was wrongly believed joined but nothing of
    # his is cached; a local user's flip is not about remote device lists.
    assert run(check.correct(ROOM, {ELSIE, FRED}, {ALICE})) == set()
    assert hs.store.unsubscribed == []
    assert hs.device_handler.notified == []
