"""Leaving, forgetting, rejoining and deleting a room while its resync runs
(held by the fake resident), against real Synapse processes: the resync stops
or carries on as it should, a rejoin starts cleanly, nothing is left in the
partial-state tables, and no request hangs."""

import time

import pytest_twisted
from twisted.internet import defer

from tests.e2e.test_admin_control import (
    ERRCODE,
    history,
    join,
    members_path,
    no_partial_rows,
    outcomes,
    phase,
)
from tests.e2e.test_resync_bad_input import STATE, TIMEOUT, assert_complete, start_resident
from tests.harness.client import poll_until, quote, sleep

WAIT = 4  # client_wait_timeout_seconds in these tests


async def held(j, resident) -> None:
    await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT, description="/state held")
    assert (await phase(j)) == "fetching_state"


@pytest_twisted.ensureDeferred
async def test_leave_and_forget_during_the_resync_then_rejoin(
    synapse_factory, tls_files, tmp_path, db_backend
):
    """The resync carries on after the last local user left (as Synapse's
    does) and completes; a rejoin is a new partial join that completes too."""
    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.hold(STATE)
        j = await join(synapse_factory, resident, module={"client_wait_timeout_seconds": WAIT})
        await held(j, resident)
        waiting = defer.ensureDeferred(j.client.get(members_path(j), timeout=30))
        await j.client.leave(j.room_id, timeout=30)
        status, body = await j.client.post(
            f"/_matrix/client/v3/rooms/{quote(j.room_id)}/forget", {}, timeout=30
        )
        assert status == 200, body
        # The request that was waiting ends: bounded, not hanging.
        status, body = await waiting
        assert status == 403 and body["errcode"] == ERRCODE, body
        assert (await phase(j)) == "fetching_state", "the resync stopped at the leave"

        resident.release()
        await poll_until(lambda: no_partial_rows(j), timeout=TIMEOUT, description="the resync to end")
        assert await outcomes(j, 1) == ["complete"]

        await j.client.join(j.room_id, server_name=resident.server_name, timeout=TIMEOUT)
        await assert_complete(j)
        assert await outcomes(j, 2) == ["complete", "complete"]
    finally:
        await resident.stop()


@pytest_twisted.ensureDeferred
async def test_rejoin_during_the_resync_keeps_one_resync(
    synapse_factory, tls_files, tmp_path
):
    """Leave and join again while the first resync is held: the room ends
    with full state, the members of the resident, one resync at a time."""
    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.hold(STATE)
        j = await join(synapse_factory, resident, module={"client_wait_timeout_seconds": WAIT})
        await held(j, resident)
        await j.client.leave(j.room_id, timeout=30)
        await j.client.join(j.room_id, server_name=resident.server_name, timeout=TIMEOUT)
        resident.release()
        await assert_complete(j)
        log = j.joiner.read_log()
        # Synapse's wrapper ran the resync again for the new join (or the
        # first run covered it); never two at once.
        assert log.count("starts (synapse-fastjoin engine)") in (1, 2)
        assert "complete" in await outcomes(j, 1)
        assert no_partial_rows(j)
    finally:
        await resident.stop()


@pytest_twisted.ensureDeferred
async def test_synapse_room_deletion_during_the_resync(
    synapse_factory, tls_files, tmp_path, db_backend
):
    """Synapse's own admin room deletion (shutdown + purge) while the resync
    is held: it completes, waiting requests end, the resync stops and the
    history says the room was deleted, not that its resync completed."""
    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.hold(STATE)
        j = await join(synapse_factory, resident, module={"client_wait_timeout_seconds": WAIT})
        await held(j, resident)
        waiting = defer.ensureDeferred(j.client.get(members_path(j), timeout=30))
        started = time.monotonic()
        status, body = await j.client.delete(
            f"/_synapse/admin/v1/rooms/{quote(j.room_id)}", {"purge": True}, timeout=60
        )
        assert status == 200, body
        assert body["kicked_users"] == [j.user_id]
        status, body = await waiting
        assert status == 403 and body["errcode"] == ERRCODE, body
        assert time.monotonic() - started < 30
        for table in ("events", "rooms", "current_state_events"):
            assert j.q(f"SELECT count(*) FROM {table} WHERE room_id = ?", j.room_id) == [(0,)], table
        assert no_partial_rows(j)

        resident.release()
        await poll_until(
            lambda: history(j), timeout=TIMEOUT, description="the resync to end and be recorded"
        )
        await sleep(2)
        assert [o for o, _ in history(j)] == ["aborted"], history(j)
        assert "deleted" in history(j)[0][1]
        assert j.q("SELECT count(*) FROM fastjoin_rooms") == [(0,)]
        assert no_partial_rows(j)
        assert j.q("SELECT count(*) FROM events WHERE room_id = ?", j.room_id) == [(0,)]
    finally:
        await resident.stop()
