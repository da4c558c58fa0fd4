"""An `m.room.guest_access` event that arrives while a room is partial does not
hold up the room's inbound events until the resync ends.

When guest access is turned off, Synapse kicks the room's local guests, and to
find them it read the room's whole current state, which for a partial-state
room waits for the resync: every later inbound event of the room queued
behind it (upstream #12989-style stall). Patch 0015 reads only the local
users' memberships, which partial state always holds.
"""

import pytest_twisted

from tests.e2e.test_resync_bad_input import (
    STATE_IDS,
    TIMEOUT,
    assert_complete,
    join,
    start_resident,
)
from tests.harness.client import poll_until, sleep
from tests.harness.fakehs.room import RoomSpec

SPEC = RoomSpec(members=60, servers=1, history=4)
AFTER = 5
# The events must be processed while the room is still partial, well before
# anything would end the resync (it is held until the test releases it).
PROMPT = 30.0


def _accepted(j, event_ids):
    """Which of `event_ids` the joiner stored as accepted timeline events."""
    marks = ",".join(j.joiner.database.placeholder for _ in event_ids)
    rows = j.joiner.database.query(
        "SELECT e.event_id FROM events e LEFT JOIN rejections r USING (event_id)"
        f" WHERE e.event_id IN ({marks}) AND NOT e.outlier AND r.event_id IS NULL",
        tuple(event_ids),
    )
    return {r[0] for r in rows}


def _partial(j):
    return bool(j.q("SELECT COUNT(*) FROM partial_state_rooms WHERE room_id = ?", j.room_id)[0][0])


@pytest_twisted.ensureDeferred
async def test_guest_access_while_partial_does_not_hold_the_inbound_queue(
    synapse_factory, tls_files, tmp_path, db_backend
):
    resident = await start_resident(tls_files, tmp_path, spec=SPEC)
    try:
        resident.hold(STATE_IDS)
        j = await join(synapse_factory, resident)
        await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT)
        assert _partial(j)

        # Guests forbidden (anything but can_join makes Synapse look for local
        # guests to kick), then ordinary messages queued behind it.
        room = resident.room
        guest = room.create_event(
            room.spec.creator, "m.room.guest_access", {"guest_access": "forbidden"}, ""
        )
        resident.push(guest)
        after = []
        for n in range(AFTER):
            event = room.create_event(
                room.spec.member(n), "m.room.message", {"msgtype": "m.text", "body": f"after {n}"}
            )
            resident.push(event)
            after.append(event.event_id)
        wanted = [guest.event_id, *after]

        try:
            await poll_until(lambda: len(_accepted(j, wanted)) == len(wanted), timeout=PROMPT)
        except TimeoutError:
            pass
        accepted = _accepted(j, wanted)
        still_partial = _partial(j)
        assert still_partial, "the room left partial state although its resync was held"
        assert accepted == set(wanted), (
            f"guest_access accepted: {guest.event_id in accepted}; "
            f"{len(accepted & set(after))} of {AFTER} later events accepted while partial"
        )
        # The current state already says so (the event went all the way through).
        (row,) = j.q(
            "SELECT event_id FROM current_state_events WHERE room_id = ? AND type = ?",
            j.room_id,
            "m.room.guest_access",
        )
        assert row[0] == guest.event_id

        resident.release()
        await assert_complete(j)
        await sleep(0)
    finally:
        await resident.stop()
