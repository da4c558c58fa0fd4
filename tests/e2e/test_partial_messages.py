"""Paginating back in a room that is still partial does not wait for the resync
(upstream #13504).

`/messages` backfills from the room's servers when it reaches the start of
what we hold; Synapse picked those servers from the room's full current state,
which for a partial-state room waits until the resync ends. Patch 0017 asks the
servers of a partial-state room from what is known while partial (the servers
at the join and in the partial current state) instead.
"""

import pytest_twisted

from tests.e2e.test_resync_bad_input import TIMEOUT, assert_complete, join, start_resident
from tests.harness.client import poll_until
from tests.harness.fakehs.room import RoomSpec

SPEC = RoomSpec(members=40, servers=1, history=4)
# Only /state: the engine waits for it, backfill never asks for it.
STATE = r"^/_matrix/federation/v1/state/[^/]+$"
PROMPT = 20.0


@pytest_twisted.ensureDeferred
async def test_messages_while_partial_backfills_without_waiting_for_the_resync(
    synapse_factory, tls_files, tmp_path, db_backend
):
    resident = await start_resident(tls_files, tmp_path, spec=SPEC)
    try:
        resident.hold(STATE)
        j = await join(synapse_factory, resident)
        await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT)

        status, body = await j.client.get(
            f"/_matrix/client/v3/rooms/{j.room_id}/messages",
            params={"dir": "b", "limit": "30"},
            timeout=PROMPT,
        )
        partial = j.q("SELECT COUNT(*) FROM partial_state_rooms WHERE room_id = ?", j.room_id)[0][0]
        assert partial, "the room left partial state although its resync was held"
        assert status == 200, (status, body)
        ids = [e["event_id"] for e in body["chunk"]]
        # Events of the room from before our join: only backfill brings them
        # into the timeline (the join's state and auth events are outliers).
        join_index = max(
            resident.room.index_of(e) for e in ids if e in resident.room.by_id
        )
        before_join = [
            e for e in ids if e in resident.room.by_id and resident.room.index_of(e) < join_index
        ]
        assert len(before_join) >= 10, f"{len(before_join)} of {len(ids)} events are from before the join"

        resident.release()
        await assert_complete(j)
    finally:
        await resident.stop()
