"""The user directory's batches (`handlers/user_directory.py`, patch 0021) write
exactly the rows Synapse's per-delta code writes.

Two real in-process HomeServers store the same rooms (a public one and a
private one, room versions 10 and 12, members with every kind of profile:
display names and avatars of the wrong type or with a NUL, no profile,
profile changes, invites, leaves, bans). Each server's user directory handler
then takes the current-state deltas, exactly as its background loop would:
one through Synapse's code alone, one with the module's callback registered.
Every table the user directory writes must end up the same on both, and the
module must have written the public room's joins in batches, reading the
profiles from `room_memberships` except for a join redacted since it was
stored.
"""

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from synapse.api.room_versions import KNOWN_ROOM_VERSIONS, RoomVersion
from synapse.app.homeserver import SynapseHomeServer
from synapse.events import make_event_from_dict

from synapse_fastjoin.handlers import user_directory
from synapse_fastjoin.handlers.user_directory import UserDirectoryBatcher
from tests.harness.fakehs.events import finalise_event
from tests.harness.inprocess import make_homeserver, shut_down

REMOTE = "remote.example"
OTHER = "other.example"
CREATOR = f"@creator:{REMOTE}"
TS = 1_700_000_000_000


class Room:
    def __init__(self, version: str, join_rule: str, tag: str) -> None:
        self.version: RoomVersion = KNOWN_ROOM_VERSIONS[version]
        self.events: list[dict[str, Any]] = []
        self.state: dict[tuple[str, str], str] = {}
        self.tip: str | None = None
        create_content: dict[str, Any] = {"room_version": version, "tag": tag}
        if not self.version.msc4291_room_ids_as_hashes:
            create_content["creator"] = CREATOR
            self.room_id = f"!{tag}-{version}:{REMOTE}"
        else:
            self.room_id = ""
        self.add(CREATOR, "m.room.create", create_content, "")
        if self.version.msc4291_room_ids_as_hashes:
            self.room_id = "!" + self.state[("m.room.create", "")][1:]
            self.events[0].pop("room_id", None)
        self.member(CREATOR, "join")
        self.add(CREATOR, "m.room.power_levels", {"users": {CREATOR: 100}}, "")
        self.add(CREATOR, "m.room.join_rules", {"join_rule": join_rule}, "")
        self.add(CREATOR, "m.room.history_visibility", {"history_visibility": "shared"}, "")

    def add(
        self, sender: str, event_type: str, content: dict[str, Any], state_key: str | None, redacts: str | None = None
    ) -> str:
        auth = [
            self.state[k]
            for k in (("m.room.create", ""), ("m.room.power_levels", ""), ("m.room.member", sender))
            if k in self.state
            and not (k[0] == "m.room.create" and self.version.msc4291_room_ids_as_hashes)
        ]
        event: dict[str, Any] = {
            "room_id": self.room_id,
            "type": event_type,
            "sender": sender,
            "content": content,
            "depth": len(self.events) + 1,
            "origin_server_ts": TS + len(self.events),
            "prev_events": [self.tip] if self.tip else [],
            "auth_events": auth,
        }
        if state_key is not None:
            event["state_key"] = state_key
        if redacts is not None:
            if self.version.updated_redaction_rules:
                event["content"] = {**content, "redacts": redacts}
            else:
                event["redacts"] = redacts
        if not self.room_id:
            event.pop("room_id")
        event_id = finalise_event(self.version, event, sender.split(":", 1)[1])
        self.events.append(event)
        self.tip = event_id
        if state_key is not None:
            self.state[(event_type, state_key)] = event_id
        return event_id

    def member(self, user: str, membership: str, **profile: Any) -> str:
        return self.add(user if membership == "join" else CREATOR, "m.room.member", {"membership": membership, **profile}, user)


def _room(version: str, join_rule: str, tag: str = "") -> Room:
    room = Room(version, join_rule, f"userdir-{join_rule}{tag}")
    for i in range(120):
        server = REMOTE if i % 3 else OTHER
        profile: dict[str, Any] = {}
        if i % 5 == 0:
            profile["displayname"] = f"User {i} \u00e9"
        if i % 7 == 0:
            profile["avatar_url"] = f"mxc://{server}/a{i}"
        if i % 11 == 0:
            profile["displayname"] = 1234  # not a string
        if i % 13 == 0:
            profile["displayname"] = "nul\u0000inside"
        if i % 17 == 0:
            profile["avatar_url"] = ["not", "a", "string"]
        room.member(f"@u{i}:{server}", "invite" if i % 19 == 0 else "join", **profile)
        if i == 60:
            # A join redacted before the directory reads it: Synapse reads the
            # redacted event (no profile left); its `room_memberships` row
            # still holds the profile, so the module must read the event too.
            redacted = room.member(
                f"@redacted-{join_rule}{tag}:{REMOTE}", "join", displayname="Redacted", avatar_url=f"mxc://{REMOTE}/r"
            )
            room.add(CREATOR, "m.room.redaction", {}, None, redacts=redacted)
    # After the first run: changes, leaves, bans, invites, joins again.
    room.member(f"@u1:{REMOTE}", "join", displayname="Renamed")
    room.member(f"@u2:{REMOTE}", "leave")
    room.member(f"@u4:{REMOTE}", "ban")
    room.member(f"@late:{REMOTE}", "invite")
    for i in range(120, 140):
        room.member(f"@u{i}:{REMOTE}", "join", displayname=f"Late {i}")
    room.member(f"@u2:{REMOTE}", "join", displayname="Back")
    return room


async def _store(hs: SynapseHomeServer, room: Room) -> None:
    store = hs.get_datastores().main
    await store.store_room(room.room_id, CREATOR, True, room.version)
    for raw in room.events:
        event = make_event_from_dict(copy.deepcopy(raw), room.version)
        context = await hs.get_state_handler().compute_event_context(event)
        await hs.get_storage_controllers().persistence.persist_event(event, context)


async def _process_deltas(hs: SynapseHomeServer) -> None:
    """What the user directory's background loop does, to the end of the stream."""
    handler = hs.get_user_directory_handler()
    storage = hs.get_storage_controllers()
    pos, end = 0, hs.get_datastores().main.get_room_max_stream_ordering()
    while pos < end:
        pos, deltas = await storage.state.get_current_state_deltas(pos, end)
        if not deltas:
            break
        await handler._handle_deltas(deltas)


TABLES = {
    "user_directory": "user_id, room_id, display_name, avatar_url",
    "user_directory_search": "*",
    "users_in_public_rooms": "user_id, room_id",
    "users_who_share_private_rooms": "user_id, other_user_id, room_id",
    # next_try_at_ts is a time: when each server happened to write it.
    "user_directory_stale_remote_users": "user_id, user_server_name, retry_counter",
}


async def _tables(hs: SynapseHomeServer) -> dict[str, list[tuple]]:
    db = hs.get_datastores().main.db_pool
    out = {}
    for table, columns in TABLES.items():
        rows = await db.execute(f"dump_{table}", f"SELECT {columns} FROM {table}")
        out[table] = sorted(tuple(r) for r in rows)
    return out


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SynapseHomeServer, SynapseHomeServer, UserDirectoryBatcher]]:
    # The background loop is off (another worker would run it): the test
    # drives both handlers itself.
    extra = {"update_user_directory_from_worker": "elsewhere", "user_directory": {"enabled": True}}
    theirs = make_homeserver(str(tmp_path_factory.mktemp("userdir-synapse")), "test.local", extra_config=extra)
    ours = make_homeserver(str(tmp_path_factory.mktemp("userdir-module")), "test.local", extra_config=extra)
    batcher = UserDirectoryBatcher()
    ours.get_module_api().register_fastjoin_callbacks(user_directory_deltas=batcher.handle_deltas)
    yield theirs, ours, batcher
    shut_down(theirs)
    shut_down(ours)


@pytest.mark.parametrize("chunk", [1000, 7])
@pytest.mark.parametrize("version", ["10", "12"])
@pytest_twisted.ensureDeferred
async def test_user_directory_rows_equal_synapse_s(
    servers, version: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also with a run cut into chunks of 7 (a big room's run is cut into
    chunks of 1,000: its events are never all held at once)."""
    monkeypatch.setattr(user_directory, "_CHUNK", chunk)
    theirs, ours, batcher = servers
    for join_rule in ("public", "invite"):
        room = _room(version, join_rule, f"-{chunk}")
        for hs in (theirs, ours):
            await _store(hs, room)
    store = ours.get_datastores().main
    asked: list[int] = []
    get_events = store.get_events

    async def counting_get_events(event_ids: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(len(list(event_ids)))
        return await get_events(event_ids, *args, **kwargs)

    monkeypatch.setattr(store, "get_events", counting_get_events)
    before, from_rows_before = batcher.batched, batcher.from_rows
    for hs in (theirs, ours):
        await _process_deltas(hs)
    monkeypatch.setattr(store, "get_events", get_events)
    assert batcher.batched > before + 50, "the public room's joins were not batched"
    assert batcher.from_rows > from_rows_before + 50, "the profiles were not read from room_memberships"
    # The redacted join, and only events such as it, read as events.
    assert asked and max(asked) <= 2, asked
    expected, got = await _tables(theirs), await _tables(ours)
    assert expected["users_in_public_rooms"] and expected["user_directory_stale_remote_users"], expected
    for table in TABLES:
        assert got[table] == expected[table], table
