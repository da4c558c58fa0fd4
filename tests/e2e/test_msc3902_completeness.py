"""The parts of MSC3902 beyond the resync, against real Synapse processes.

A patched Synapse with the module joins a room of the fake resident, which
holds `/state` so the room stays partial for as long as a test needs, and which
plays several servers of the room (personas): the one we join through, one
that joins after us (and may leave again), one the resident leaves out of
`/send_join`'s `servers_in_room`. The tests check what those servers receive
(`received_by`), what the joiner answers them on its federation API (signed
requests as those servers, tests/harness/fedclient.py), what sliding sync
shows while partial, and what an incoming device-list update costs.
"""

import re
import time
import uuid
from typing import Any

import pytest_twisted
import treq

from tests.e2e.test_resync_bad_input import STATE, TIMEOUT, Joined, module_config
from tests.harness.client import poll_until, quote, sleep
from tests.harness.fakehs.room import RoomSpec, load_or_generate
from tests.harness.fakehs.server import FakeResident
from tests.harness.fedclient import federation_request
from tests.harness.synapse import free_port, merge_config

SPEC = RoomSpec(members=60, servers=1, history=4)
MSC3895 = "ORG.MATRIX.MSC3895_UNABLE_DUE_TO_PARTIAL_STATE"
STRANGER = "stranger.fake"
SLIDING_SYNC = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"


async def start_resident(tls_files, tmp_path) -> FakeResident:
    room = load_or_generate(SPEC, tmp_path / "rooms")
    resident = FakeResident(room, tls_files, personas=1)
    resident.start()
    resident.serve_keys_for(STRANGER)
    return resident


async def join(synapse_factory, resident: FakeResident, extra: dict[str, Any] | None = None) -> Joined:
    joiner = synapse_factory(variant="patched", name="joiner", start=False)
    joiner.update_config(merge_config(module_config(resident), extra(joiner) if callable(extra) else extra))
    joiner.start()
    user_id, token = joiner.register_user("joiner", admin=True)
    client = joiner.client(token)
    await client.join(resident.room.room_id, server_name=resident.server_name, timeout=TIMEOUT)
    return Joined(joiner, user_id, client, resident.room)


def membership(j: Joined, user_id: str) -> str | None:
    rows = j.q(
        "SELECT membership FROM current_state_events WHERE room_id = ? AND type = ? AND state_key = ?",
        j.room_id,
        "m.room.member",
        user_id,
    )
    return rows[0][0] if rows else None


def is_partial(j: Joined) -> bool:
    return j.q("SELECT count(*) FROM partial_state_rooms WHERE room_id = ?", j.room_id) == [(1,)]


def got(resident: FakeResident, server: str, event_id: str) -> bool:
    """Whether `server` (one the fake plays) received `event_id`."""
    from tests.harness.fakehs.events import event_id as compute_event_id

    return any(
        compute_event_id(resident.room.version, pdu) == event_id
        for pdu in resident.received_by.get(server, [])
    )


def destinations(j: Joined) -> set[str]:
    """Servers the joiner sent one of the room's events to (Synapse's own record)."""
    return {d for (d,) in j.q("SELECT destination FROM destination_rooms WHERE room_id = ?", j.room_id)}


async def end_resync(j: Joined, resident: FakeResident) -> None:
    resident.release()
    await poll_until(lambda: not is_partial(j), timeout=TIMEOUT, description="the resync to end")


# 1. Outgoing events reach the whole room.


@pytest_twisted.ensureDeferred
async def test_own_events_reach_servers_that_join_while_partial_and_stop_when_they_leave(
    synapse_factory, tls_files, tmp_path, db_backend
):
    """A server that joins after us gets our events while the room is partial
    and stops getting them once it left; a membership event from a server never
    in the room (a banned user's join, rejected) adds nobody; a server the
    resident left out of `servers_in_room` gets our newest event as soon as
    the resync shows it in the room."""
    resident = await start_resident(tls_files, tmp_path)
    try:
        a = resident.server_name
        hidden = resident.add_persona()  # in the room before us ...
        resident.hidden_servers.add(hidden)  # ... but not in servers_in_room
        resident.hold(STATE)
        j = await join(synapse_factory, resident)
        assert is_partial(j)

        # A server joins after us; its join reaches the joiner.
        b = resident.add_persona()
        b_user = f"@resident:{b}"
        await poll_until(
            lambda: membership(j, b_user) == "join", timeout=30, description="b's join stored"
        )
        # A server that was never in the room: banned, then a join (rejected).
        stranger_user = f"@x:{STRANGER}"
        resident.membership(stranger_user, "ban", sender=resident.room.spec.moderator(0))
        stranger_join = resident.membership(stranger_user, "join")
        await poll_until(
            lambda: j.q("SELECT count(*) FROM rejections WHERE event_id = ?", stranger_join.event_id)
            == [(1,)],
            timeout=30,
            description="the stranger's join to be rejected",
        )
        assert membership(j, stranger_user) == "ban"

        m1 = await j.client.send_message(j.room_id, "one", timeout=30)
        await poll_until(
            lambda: got(resident, a, m1) and got(resident, b, m1),
            timeout=30,
            description="m1 at the resident we joined through and at the server that joined after us",
        )
        assert b in destinations(j)
        assert STRANGER not in destinations(j)
        assert not got(resident, hidden, m1)
        assert is_partial(j), "the room must still be partial for this test to mean anything"

        # b leaves again, within the resync.
        resident.membership(b_user, "leave")
        await poll_until(
            lambda: membership(j, b_user) == "leave", timeout=30, description="b's leave stored"
        )
        m2 = await j.client.send_message(j.room_id, "two", timeout=30)
        await poll_until(lambda: got(resident, a, m2), timeout=30, description="m2 at a")
        await sleep(3)
        assert not got(resident, b, m2), "a server that left still gets our events"
        assert not got(resident, hidden, m2)
        assert is_partial(j)

        # The resync ends: the server the resident did not tell us about is in
        # the full state, and gets our newest event (from which it can fetch
        # the rest with /get_missing_events).
        await end_resync(j, resident)
        await poll_until(
            lambda: got(resident, hidden, m2), timeout=30, description="m2 at the hidden server"
        )
        assert "sending our newest event" in j.joiner.read_log()
        # From now on Synapse's own full-state destinations.
        m3 = await j.client.send_message(j.room_id, "three", timeout=30)
        await poll_until(
            lambda: got(resident, a, m3) and got(resident, hidden, m3),
            timeout=30,
            description="m3 at a and the hidden server",
        )
        await sleep(2)
        assert not got(resident, b, m3)
        assert STRANGER not in destinations(j)
    finally:
        await resident.stop()


# 2. Our own events are answerable.


@pytest_twisted.ensureDeferred
async def test_state_ids_for_own_events_while_partial_and_msc3895_for_others(
    synapse_factory, tls_files, tmp_path, db_backend
):
    """While partial, `/state_ids` at an event we created is answered with the
    state we computed for it; at another server's event it is still MSC3895's
    403; a server not in the room is refused; `/get_missing_events` serves our
    events whole."""
    resident = await start_resident(tls_files, tmp_path)
    try:
        a = resident.server_name
        resident.hold(STATE)
        j = await join(synapse_factory, resident)
        fed = j.joiner.federation_url
        dest = j.joiner.server_name
        path = f"/_matrix/federation/v1/state_ids/{quote(j.room_id)}"
        [(join_id,)] = j.q(
            "SELECT event_id FROM current_state_events WHERE room_id = ? AND state_key = ?",
            j.room_id,
            j.user_id,
        )
        # Another server's event, received while partial.
        theirs_event = resident.room.create_event(
            resident.room.spec.member(0), "m.room.message", {"msgtype": "m.text", "body": "theirs"}
        )
        resident.push(theirs_event)
        theirs = theirs_event.event_id
        await poll_until(
            lambda: j.q("SELECT count(*) FROM events WHERE event_id = ?", theirs) == [(1,)],
            timeout=30,
            description="their event stored",
        )

        m1 = await j.client.send_message(j.room_id, "one", timeout=30)
        m2 = await j.client.send_message(j.room_id, "two", timeout=30)
        assert is_partial(j)

        status, body = await federation_request(fed, dest, a, "GET", path, {"event_id": m2})
        assert status == 200, body
        ids = set(body["pdu_ids"])
        # The state before m2: every non-member state event of the room (we
        # have them all while partial), our own join, nothing else's join
        # that we do not know of.
        non_member = {
            eid for (etype, _), eid in resident.room.state_before(join_id).items() if etype != "m.room.member"
        }
        assert non_member <= ids, f"missing {sorted(non_member - ids)[:5]}"
        assert join_id in ids
        assert m1 not in ids and m2 not in ids  # messages are not state
        stored = {eid for (eid,) in j.q("SELECT event_id FROM events WHERE room_id = ?", j.room_id)}
        assert ids <= stored
        assert set(body["auth_chain_ids"]) <= stored

        # Another server's event: MSC3895's error, as before.
        status, body = await federation_request(fed, dest, a, "GET", path, {"event_id": theirs})
        assert status == 403 and body["errcode"] == MSC3895, body
        # A server not in the room, even for our own event.
        status, body = await federation_request(fed, dest, STRANGER, "GET", path, {"event_id": m2})
        assert status == 403 and body["errcode"] != MSC3895, body

        # /get_missing_events: our events, not redacted.
        status, body = await federation_request(
            fed, dest, a, "POST", f"/_matrix/federation/v1/get_missing_events/{quote(j.room_id)}",
            content={"earliest_events": [join_id], "latest_events": [m2], "limit": 10},
        )
        assert status == 200, body
        bodies = [e.get("content", {}).get("body") for e in body["events"]]
        assert "one" in bodies, body

        # After the resync, another server's event is answered too.
        await end_resync(j, resident)
        status, body = await federation_request(fed, dest, a, "GET", path, {"event_id": theirs})
        assert status == 200, body
        assert "Answering /state_ids for our event" in j.joiner.read_log()
    finally:
        await resident.stop()


# 3. Sliding sync never passes partial state off as complete.


async def sliding(j: Joined, required_state: list[list[str]], timeout: float = 30) -> dict[str, Any]:
    status, body = await j.client.post(
        SLIDING_SYNC,
        {
            "lists": {
                "all": {"ranges": [[0, 10]], "required_state": required_state, "timeline_limit": 1}
            }
        },
        timeout=timeout,
    )
    assert status == 200, body
    return body


def member_keys(body: dict[str, Any], room_id: str) -> set[str]:
    room = body.get("rooms", {}).get(room_id, {})
    return {e["state_key"] for e in room.get("required_state", []) if e["type"] == "m.room.member"}


@pytest_twisted.ensureDeferred
async def test_sliding_sync_every_member_waits_for_full_state_lazy_members_do_not(
    synapse_factory, tls_files, tmp_path
):
    """`required_state` `["m.room.member", "*"]` leaves a partial room out
    (it never shows a member list missing the remote members); `$LAZY`
    shows it at once; after the resync "*" shows every member."""
    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.hold(STATE)
        j = await join(synapse_factory, resident)
        await j.client.send_message(j.room_id, "hello", timeout=30)
        assert is_partial(j)

        every = await sliding(j, [["m.room.member", "*"]])
        assert j.room_id not in every.get("rooms", {}), member_keys(every, j.room_id)
        lazy = await sliding(j, [["m.room.member", "$LAZY"], ["m.room.name", ""]])
        assert j.room_id in lazy.get("rooms", {}), lazy
        assert j.user_id in member_keys(lazy, j.room_id)
        assert is_partial(j)

        await end_resync(j, resident)
        every = await sliding(j, [["m.room.member", "*"]])
        expected = set(resident.room.joined_members())
        assert member_keys(every, j.room_id) >= expected, (
            f"{len(member_keys(every, j.room_id))} members instead of {len(expected)}"
        )
    finally:
        await resident.stop()


# 4. Device lists without scanning the partial-state tables.


_TXN = 'synapse_storage_transaction_time_count(?:_total)?\\{{[^}}]*desc="{desc}"[^}}]*\\}} (\\S+)'


async def txn_count(port: int, desc: str) -> float:
    response = await treq.get(f"http://127.0.0.1:{port}/_synapse/metrics")
    text = (await response.content()).decode()
    return sum(float(v) for v in re.findall(_TXN.format(desc=re.escape(desc)), text))


@pytest_twisted.ensureDeferred
async def test_device_list_updates_while_partial_do_not_read_the_partial_state_tables(
    synapse_factory, tls_files, tmp_path
):
    """Incoming device-list EDUs while a room is partial are still kept for
    the replay at the end of the resync, without reading
    `partial_state_rooms` and `partial_state_rooms_servers` for each."""
    resident = await start_resident(tls_files, tmp_path)
    port = free_port()
    try:
        a = resident.server_name
        resident.hold(STATE)

        def metrics(joiner: Any) -> dict[str, Any]:
            return {
                "enable_metrics": True,
                "listeners": joiner.base_config()["listeners"]
                + [{"type": "metrics", "port": port, "bind_addresses": ["127.0.0.1"]}],
            }

        j = await join(synapse_factory, resident, metrics)
        assert is_partial(j)
        descs = ("get_server_which_served_partial_join", "get_partial_state_rooms")

        async def startup_reads_done() -> bool:
            # Both run once at start-up, in Synapse's resume of interrupted
            # resyncs; on a loaded machine they can finish after the join, so
            # wait for them before counting.
            return all([await txn_count(port, d) >= 1 for d in descs])

        await poll_until(startup_reads_done, timeout=30, description="the start-up reads")
        before = {d: await txn_count(port, d) for d in descs}
        user = f"@resident:{a}"
        updates = 10
        for n in range(updates):
            status, body = await federation_request(
                j.joiner.federation_url, j.joiner.server_name, a, "PUT",
                f"/_matrix/federation/v1/send/{uuid.uuid4().hex}",
                content={
                    "origin": a,
                    "origin_server_ts": int(time.time() * 1000),
                    "pdus": [],
                    "edus": [
                        {
                            "edu_type": "m.device_list_update",
                            "content": {
                                "user_id": user,
                                "device_id": f"DEV{n}",
                                "stream_id": n + 1,
                                "prev_id": [n] if n else [],
                                "deleted": False,
                            },
                        }
                    ],
                },
            )
            assert status == 200, body
        await poll_until(
            lambda: j.q("SELECT count(*) FROM device_lists_remote_pending WHERE user_id = ?", user)
            == [(updates,)],
            timeout=30,
            description="every update kept for the replay",
        )
        assert is_partial(j)
        for desc, count in before.items():
            assert await txn_count(port, desc) == count, f"{desc} ran per device-list update"
        # What answers instead (once, then from its cache); also proves the
        # counters are read at all.
        assert 1 <= await txn_count(port, "get_partial_rooms_for_user") < updates
        await end_resync(j, resident)
    finally:
        await resident.stop()


def device_updates(resident: FakeResident, server: str, user_id: str, device_id: str) -> int:
    """How many device-list updates of the device `server` received."""
    return sum(
        1
        for edu in resident.received_edus_by.get(server, [])
        if edu.get("edu_type") == "m.device_list_update"
        and edu.get("content", {}).get("user_id") == user_id
        and edu.get("content", {}).get("device_id") == device_id
    )


@pytest_twisted.ensureDeferred
async def test_local_device_list_update_reaches_each_server_once_across_the_resync(
    synapse_factory, tls_files, tmp_path, db_backend
):
    """A device renamed while partial: the server we joined through and one
    that joined after us get the update at once, and not again when the
    resync ends; a server the resident did not tell us about gets it when
    the resync ends."""
    resident = await start_resident(tls_files, tmp_path)
    try:
        a = resident.server_name
        hidden = resident.add_persona()
        resident.hidden_servers.add(hidden)
        resident.hold(STATE)
        j = await join(synapse_factory, resident)
        b = resident.add_persona()
        await poll_until(
            lambda: membership(j, f"@resident:{b}") == "join", timeout=30, description="b's join stored"
        )
        status, body = await j.client.get("/_matrix/client/v3/devices", timeout=30)
        assert status == 200, body
        [device_id] = [d["device_id"] for d in body["devices"]]
        status, body = await j.client.put(
            f"/_matrix/client/v3/devices/{quote(device_id)}", {"display_name": "renamed"}, timeout=30
        )
        assert status == 200, body
        await poll_until(
            lambda: device_updates(resident, a, j.user_id, device_id) >= 1
            and device_updates(resident, b, j.user_id, device_id) >= 1,
            timeout=30,
            description="the update at a and b",
        )
        assert device_updates(resident, hidden, j.user_id, device_id) == 0
        assert is_partial(j)

        await end_resync(j, resident)
        await poll_until(
            lambda: device_updates(resident, hidden, j.user_id, device_id) >= 1,
            timeout=30,
            description="the update at the server we did not know of",
        )
        await sleep(3)
        assert device_updates(resident, a, j.user_id, device_id) == 1
        assert device_updates(resident, b, j.user_id, device_id) == 1, "sent twice to b"
        assert device_updates(resident, hidden, j.user_id, device_id) == 1
    finally:
        await resident.stop()
