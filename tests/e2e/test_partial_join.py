"""A patched Synapse with the module joins a room on a stock Synapse over
federation; the room stays partial for as long as the test holds the
resident's `/state_ids` and `/state`, and everything the admin sees comes from
the real joining server."""

import time
from typing import Any

import pytest_twisted
from twisted.internet import defer

from tests.harness.client import ClientAPI, poll_until, quote, sleep
from tests.harness.fedproxy import FederationProxy

MODULE = {"modules": [{"module": "synapse_fastjoin.FastJoinModule", "config": {}}]}
STATE_PATHS = r"^/_matrix/federation/v1/state(_ids)?/"
ADMIN_ROOMS = "/_synapse/admin/v1/fastjoin/rooms"
MEMBERS = 30


class Setup:
    """A stock resident behind a holding proxy, with a room of MEMBERS local
    members plus its creator, and a patched joining server."""

    resident: Any
    joiner: Any
    proxy: FederationProxy
    room_id: str
    creator: ClientAPI
    member_ids: set[str]


async def _build(synapse_factory, db_backend, tmp_path, joiner_config) -> Setup:
    s = Setup()
    s.proxy = FederationProxy(_proxy_tls(tmp_path))
    public_port = s.proxy.start()
    s.resident = synapse_factory(
        variant="stock",
        db=db_backend,
        name="resident",
        federation_tls=False,
        public_port=public_port,
    )
    s.proxy.backend_port = s.resident.fed_port
    s.joiner = synapse_factory(
        variant="patched", db=db_backend, name="joiner", config=joiner_config
    )

    creator_id, token = s.resident.register_user("creator")
    s.creator = s.resident.client(token)
    s.room_id = await s.creator.create_room(preset="public_chat", name="Big room")
    s.member_ids = {creator_id}
    for i in range(MEMBERS):
        user_id, token = s.resident.register_user(f"member{i}")
        await s.resident.client(token).join(s.room_id)
        s.member_ids.add(user_id)
    return s


def _proxy_tls(tmp_path):
    from tests.harness.certs import generate_self_signed

    return generate_self_signed(tmp_path / "proxy-tls")


async def _still_pending(d: defer.Deferred, seconds: float) -> bool:
    await sleep(seconds)
    return not d.called


@pytest_twisted.ensureDeferred
async def test_partial_join_is_shown_by_admin_api_and_completes(
    synapse_factory, db_backend, tmp_path
):
    s = await _build(synapse_factory, db_backend, tmp_path, MODULE)
    try:
        await _partial_join_scenario(s)
    finally:
        await s.proxy.stop()


async def _partial_join_scenario(s: Setup) -> None:
    admin_id, admin_token = s.joiner.register_user("admin", admin=True)
    admin = s.joiner.client(admin_token)
    _, user_token = s.joiner.register_user("carol")
    carol = s.joiner.client(user_token)

    s.proxy.hold(STATE_PATHS)
    before_join_ms = int(time.time() * 1000)
    await admin.join(s.room_id, server_name=s.resident.server_name)
    await s.proxy.wait_until_held(STATE_PATHS, timeout=30)

    # While partial: the admin API shows the room, from the real server.
    status, listing = await admin.get(ADMIN_ROOMS)
    assert status == 200, listing
    assert listing["total"] == 1
    [room] = listing["rooms"]
    assert room["room_id"] == s.room_id
    assert room["joined_via"] == s.resident.server_name
    assert room["join_event_id"].startswith("$")
    assert room["joined_ts"] >= before_join_ms
    assert room["known_servers"] >= 1
    assert room["partial_state_events_remaining"] >= 1
    assert room["resync"]["status"] == "resyncing"
    assert room["resync"]["attempts"] == 1

    status, one = await admin.get(f"{ADMIN_ROOMS}/{quote(s.room_id)}")
    assert (status, one) == (200, room)

    # ... and refuses those who may not see it.
    status, body = await ClientAPI(s.joiner.client_url).get(ADMIN_ROOMS)
    assert status == 401, body
    assert body["errcode"] == "M_MISSING_TOKEN"
    status, body = await carol.get(ADMIN_ROOMS)
    assert status == 403, body
    assert body["errcode"] == "M_FORBIDDEN"
    status, body = await admin.get(f"{ADMIN_ROOMS}/{quote('!nope:example.org')}")
    assert status == 404, body
    assert body["errcode"] == "M_NOT_FOUND"

    # /members needs the full state: it blocks while the room is partial.
    members_d = defer.ensureDeferred(admin.members(s.room_id, timeout=60))
    assert await _still_pending(members_d, 2.0), "/members answered on partial state"

    s.proxy.release()
    members = await members_d
    joined = {m["state_key"] for m in members if m["content"]["membership"] == "join"}
    assert joined == s.member_ids | {admin_id}

    # The room has left partial state: the admin API forgets it and keeps history.
    await poll_until(
        lambda: _admin_total(admin), timeout=30, description="room to leave the list"
    )
    status, body = await admin.get(f"{ADMIN_ROOMS}/{quote(s.room_id)}")
    assert status == 404, body

    # The history row is written once the engine's run has wound up, which
    # may be a moment after Synapse cleared the room's partial flag.
    async def resyncs() -> list | None:
        status, history = await admin.get(
            "/_synapse/admin/v1/fastjoin/history", params={"room_id": s.room_id}
        )
        assert status == 200, history
        return history["resyncs"] or None

    [entry] = await poll_until(resyncs, timeout=30, description="the resync's history row")
    assert entry["outcome"] == "complete"
    assert entry["joined_ts"] == room["joined_ts"]
    assert entry["duration_ms"] >= 2000  # we held the resync for 2 s at least
    assert entry["resync_attempts"] == 1

    # Messages flow both ways.
    await admin.send_message(s.room_id, "hello from the joiner")
    await s.creator.send_message(s.room_id, "hello from the resident")
    await _wait_for_message(s.creator, s.room_id, "hello from the joiner")
    await _wait_for_message(admin, s.room_id, "hello from the resident")

    # The history row is in the joining server's real database.
    rows = s.joiner.database.query(
        "SELECT outcome FROM fastjoin_resync_history WHERE room_id = "
        + s.joiner.database.placeholder,
        (s.room_id,),
    )
    assert rows == [("complete",)]


async def _admin_total(admin: ClientAPI) -> bool:
    status, listing = await admin.get(ADMIN_ROOMS)
    return status == 200 and listing["total"] == 0


async def _wait_for_message(client: ClientAPI, room_id: str, text: str) -> None:
    async def seen() -> bool:
        status, body = await client.get(
            f"/_matrix/client/v3/rooms/{quote(room_id)}/messages",
            params={"dir": "b", "limit": "20"},
        )
        return status == 200 and any(
            e.get("content", {}).get("body") == text for e in body.get("chunk", [])
        )

    await poll_until(seen, timeout=30, description=f"message {text!r}")


@pytest_twisted.ensureDeferred
async def test_patched_synapse_without_the_module_behaves_as_stock(
    synapse_factory, db_backend, tmp_path
):
    """The series is applied but the module is not enabled: the join and resync
    work as in stock Synapse, and nothing of the module appears."""
    s = await _build(synapse_factory, db_backend, tmp_path, joiner_config=None)
    try:
        admin_id, token = s.joiner.register_user("admin", admin=True)
        admin = s.joiner.client(token)
        s.proxy.hold(STATE_PATHS)
        await admin.join(s.room_id, server_name=s.resident.server_name)
        await s.proxy.wait_until_held(STATE_PATHS, timeout=30)
        members_d = defer.ensureDeferred(admin.members(s.room_id, timeout=60))
        assert await _still_pending(members_d, 1.0)
        s.proxy.release()
        members = await members_d
        assert {m["state_key"] for m in members} == s.member_ids | {admin_id}

        status, body = await admin.get(ADMIN_ROOMS)
        assert status == 404 and body["errcode"] == "M_UNRECOGNIZED", body
        tables = s.joiner.database.query(_TABLES_SQL[s.joiner.database.backend])
        assert not [t for (t,) in tables if t.startswith("fastjoin_")]
    finally:
        await s.proxy.stop()


_TABLES_SQL = {
    "sqlite": "SELECT name FROM sqlite_master WHERE type = 'table'",
    "postgres": "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
}
