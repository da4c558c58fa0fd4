"""Live events that arrive while a room is partial are all kept, and end up
accepted once the resync is done.

Synapse prunes a room's queue of inbound events down to its newest ones once
100 wait; during a long resync that drops most live traffic for good. With the
module (patch 0006, `resync.keep_inbound_queue`) the queue is kept whole while
the room is partial.
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

EVENT_AUTH = r"^/_matrix/federation/v1/event_auth/[^/]+/[^/]+$"

SPEC = RoomSpec(members=200, servers=1, history=6)
LIVE = 300


def _persisted(j, event_ids):
    """How many of `event_ids` the joiner stored as accepted timeline events."""
    found = 0
    for start in range(0, len(event_ids), 100):
        batch = event_ids[start : start + 100]
        marks = ",".join(j.joiner.database.placeholder for _ in batch)
        rows = j.joiner.database.query(
            "SELECT COUNT(*) FROM events e LEFT JOIN rejections r USING (event_id)"
            f" WHERE e.event_id IN ({marks}) AND NOT e.outlier AND r.event_id IS NULL",
            tuple(batch),
        )
        found += rows[0][0]
    return found


def _breakdown(j, event_ids):
    """How the live events were stored: (in events, outliers, rejected)."""
    marks = ",".join(j.joiner.database.placeholder for _ in event_ids)
    (row,) = j.joiner.database.query(
        "SELECT COUNT(*), SUM(CASE WHEN e.outlier THEN 1 ELSE 0 END),"
        " SUM(CASE WHEN r.event_id IS NULL THEN 0 ELSE 1 END)"
        f" FROM events e LEFT JOIN rejections r USING (event_id) WHERE e.event_id IN ({marks})",
        tuple(event_ids),
    )
    return row


def _missing(j, event_ids):
    marks = ",".join(j.joiner.database.placeholder for _ in event_ids)
    rows = j.joiner.database.query(
        f"SELECT event_id FROM events WHERE event_id IN ({marks})", tuple(event_ids)
    )
    found = {r[0] for r in rows}
    return [e for e in event_ids if e not in found]


def _staged(j):
    return j.q("SELECT COUNT(*) FROM federation_inbound_events_staging")[0][0]


async def _wait_until_stored(j, event_ids, count):
    """Waits (bounded) until `count` of `event_ids` are stored as accepted and
    nothing is staged (a run deletes its events' staging rows after persisting
    them: both); returns (stored, staged, the joiner's log) as they are then."""
    try:
        await poll_until(
            lambda: _persisted(j, event_ids) >= count and _staged(j) == 0,
            timeout=TIMEOUT,
            interval=1,
        )
    except TimeoutError:
        pass
    return _persisted(j, event_ids), _staged(j), j.joiner.log_path.read_text()


@pytest_twisted.ensureDeferred
async def test_every_live_event_sent_while_partial_is_kept_and_accepted(
    synapse_factory, tls_files, tmp_path, db_backend
):
    resident = await start_resident(tls_files, tmp_path, spec=SPEC)
    try:
        # Keep the room partial while a burst of live events arrives: far more
        # than the 100 at which Synapse would prune the queue. The resident
        # also holds its answers to /event_auth, so the room's processing
        # stalls on its first event (whose sender's auth chain it asks for)
        # and the burst piles up whatever the processing's speed.
        resident.hold(STATE_IDS)
        resident.hold(EVENT_AUTH)
        j = await join(synapse_factory, resident)
        await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT)
        resident.inject(rate=100, count=LIVE)
        await poll_until(lambda: len(resident.injected) >= LIVE, timeout=TIMEOUT)
        await sleep(2)
        peak = _staged(j)
        resident.release()

        await assert_complete(j)
        persisted, staged, log = await _wait_until_stored(j, resident.injected, LIVE)
        assert "from federation queue" not in log, "the inbound queue was pruned"
        assert (persisted, staged) == (LIVE, 0), (
            f"{persisted} of {LIVE} live events persisted, {staged} still queued"
            f" (at most {peak} were queued at once); stored/outliers/rejected:"
            f" {_breakdown(j, resident.injected)}; refused in /send:"
            f" {list(resident._sender.pdu_errors.items())[:3]}; sent {resident._sender.sent},"
            f" queued to send {[len(q) for q in resident._sender.queues.values()]},"
            f" joined servers {resident.joined_servers}; missing e.g. {_missing(j, resident.injected)[:3]}"
        )
        # The burst really did pile up behind the partial state (otherwise this
        # test would prove nothing about pruning).
        assert peak >= 100, f"only {peak} events were queued at once"
    finally:
        await resident.stop()


SHARED_SPEC = RoomSpec(members=2000, servers=1, history=6)
SHARED_LIVE = 600


@pytest_twisted.ensureDeferred
async def test_live_events_kept_with_the_connection_shared(
    synapse_factory, tls_files, tmp_path, db_backend
):
    """With `sqlite_yield_ratio` (storage/connection_share.py), the resync's
    writes wait while runs of live events are in flight, at most as long as
    each write held the connection: the live events that arrive meanwhile
    are all stored and accepted, the resync ends with the resident's state,
    and nothing waits without bound. Small batches make many writes, so that
    they overlap the runs (on PostgreSQL the share is off: the same outcome)."""
    resident = await start_resident(tls_files, tmp_path, spec=SHARED_SPEC)
    try:
        j = await join(synapse_factory, resident, sqlite_yield_ratio=1.0, persist_batch_size=50)
        resident.inject(rate=100, count=SHARED_LIVE)
        await assert_complete(j)
        await poll_until(lambda: len(resident.injected) >= SHARED_LIVE, timeout=TIMEOUT)
        persisted, staged, log = await _wait_until_stored(j, resident.injected, SHARED_LIVE)
        shared = [line for line in log.splitlines() if "gave the database connection" in line]
        assert "from federation queue" not in log, "the inbound queue was pruned"
        assert (persisted, staged) == (SHARED_LIVE, 0), (
            f"{persisted} of {SHARED_LIVE} live events persisted, {staged} still queued;"
            f" stored/outliers/rejected: {_breakdown(j, resident.injected)};"
            f" the resync's give-backs: {shared[-1:] or 'none logged'}"
        )
    finally:
        await resident.stop()
