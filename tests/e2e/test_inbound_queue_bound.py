"""Bounded staging: a partial-state room's inbound queue stays on disk within
`resync.inbound_queue_limit`, and what is dropped past the bound is fetched
again later, never lost (handlers/inbound_queue.py); and the inbound bad input
of issue #10: a burst of 5,000 events at once, events whose prev events are
missing (gaps, forks), events from a banned user and from a server not in the
room, and a restart with a full queue.

A patched Synapse with the module joins a room served by the fake resident,
whose `/state_ids` is held so the room stays partial while the resident pushes
events to it over `/send` (50 per transaction, as fast as the joiner takes
them).
"""

import re
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest_twisted

from tests.e2e.test_resync_bad_input import (
    STATE_IDS,
    TIMEOUT,
    Joined,
    assert_complete,
    join,
    start_resident,
)
from tests.e2e.test_resync_live_traffic import EVENT_AUTH, _breakdown, _persisted, _staged
from tests.harness.client import poll_until, sleep
from tests.harness.fakehs.room import RoomSpec
from tests.harness.fakehs.server import FakeResident

SPEC = RoomSpec(members=200, servers=1, history=6)
STRANGER = "stranger.fake"
_DROPPED_LOG = re.compile(r"Inbound queue of \S+ passed its bound of (\d+) events: dropped (\d+)")
_REFETCHED_LOG = re.compile(
    r"Inbound queue of \S+: fetched (\d+) dropped events again .*; (\d+) dropped in all,"
    r" (\d+) fetched again, (\d+) still to fetch, (\d+) failed"
)


def burst(resident: FakeResident, count: int, start: int = 0) -> list[str]:
    """Create `count` messages from the room's members at once and push them
    all (the fake's sender sends them 50 per transaction)."""
    spec = resident.room.spec
    ids = []
    for n in range(start, start + count):
        event = resident.room.create_event(
            spec.member(n % spec.members), "m.room.message", {"msgtype": "m.text", "body": f"burst {n}"}
        )
        ids.append(event.event_id)
        resident.injected.append(event.event_id)
        resident.push(event)
    return ids


def dropped_rows(j: Joined) -> dict[str, int]:
    return dict(j.q("SELECT state, COUNT(*) FROM fastjoin_inbound_dropped GROUP BY state"))


async def wait_persisted(j: Joined, event_ids: list[str], timeout: float) -> float:
    """Wait until every one of `event_ids` is stored as an accepted timeline
    event; returns how long it took. Fails saying where the rest are."""
    t0 = time.monotonic()
    try:
        await poll_until(
            lambda: _persisted(j, event_ids) >= len(event_ids), timeout=timeout, interval=2
        )
    except TimeoutError:
        pass
    persisted = _persisted(j, event_ids)
    assert persisted == len(event_ids), (
        f"{persisted} of {len(event_ids)} events persisted, {_staged(j)} still queued,"
        f" dropped rows {dropped_rows(j)}; stored/outliers/rejected (first 500):"
        f" {_breakdown(j, event_ids[:500])}"
    )
    return time.monotonic() - t0


@asynccontextmanager
async def partial_join(
    synapse_factory, tls_files, tmp_path, **resync: Any
) -> AsyncIterator[tuple[FakeResident, Joined]]:
    """The joiner in a room of the fake resident, which holds `/state_ids`:
    the room stays partial until `resident.release()`. The resident stops on
    the way out."""
    resident = await start_resident(tls_files, tmp_path, spec=SPEC)
    try:
        resident.hold(STATE_IDS)
        j = await join(synapse_factory, resident, **resync)
        await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT)
        yield resident, j
    finally:
        await resident.stop()


async def release_and_wait_stored(
    resident: FakeResident, j: Joined, event_ids: list[str], timeout: float
) -> tuple[float, dict[str, int]]:
    """Release `/state_ids`; every one of `event_ids` ends up stored and
    accepted, the resync completes, the queue drains, and no dropped event is
    left to fetch again or given up. Returns how long the events took after
    the release, and the dropped rows by state."""
    resident.release()
    seconds = await wait_persisted(j, event_ids, timeout=timeout)
    await assert_complete(j)
    await poll_until(lambda: _staged(j) == 0, timeout=60)
    rows = dropped_rows(j)
    assert rows.get("pending", 0) == 0 and rows.get("failed", 0) == 0, rows
    return seconds, rows


@pytest_twisted.ensureDeferred
async def test_a_burst_stays_within_the_bound_and_nothing_is_lost(
    synapse_factory, tls_files, tmp_path, db_backend
):
    """5,000 events at once while the room is partial, with a bound of 500:
    the queue never holds much more than the bound, the rest is dropped by id
    and fetched again, and every one of the 5,000 ends up stored and accepted;
    the admin API and the log say how many were dropped and fetched again.

    On PostgreSQL the burst is 2,000 against a bound of 200: the same code,
    the same drops and refetches, in a third of the time (the 5,000 take 8 to
    15 minutes per database on the project's shared 2-core machines; the
    README gives both databases' figures for 5,000)."""
    limit, count = (500, 5000) if db_backend == "sqlite" else (200, 2000)
    async with partial_join(
        synapse_factory, tls_files, tmp_path, inbound_queue_limit=limit
    ) as (resident, j):
        # The room's processing stalls on its first run (its senders' auth
        # chains are asked of the resident, which holds the answers until the
        # release), so the burst passes the bound whatever the joiner's speed:
        # without the hold a joiner that keeps up never drops anything.
        resident.hold(EVENT_AUTH)
        t0 = time.monotonic()
        ids = burst(resident, count)
        t_generated = time.monotonic() - t0
        # Watch the queue while the burst arrives.
        peak = 0
        while resident._sender.sent < count and time.monotonic() - t0 < 300:
            peak = max(peak, _staged(j))
            await sleep(0.5)
        t_delivered = time.monotonic() - t0
        peak = max(peak, _staged(j))
        assert resident._sender.sent == count, f"only {resident._sender.sent} delivered"

        # While partial: the admin API counts what was dropped.
        status, body = await j.admin_room()
        assert status == 200, body
        queue = body["inbound_queue"]
        assert queue["limit"] == limit
        assert queue["dropped"] >= count - 2 * limit, queue
        assert queue["queued"] <= limit + 200, queue

        t_caught_up, rows = await release_and_wait_stored(resident, j, ids, timeout=1500)
        dropped = sum(rows.values())
        log = j.joiner.read_log()
        assert "from federation queue" not in log, "Synapse pruned the inbound queue"
        assert _DROPPED_LOG.search(log), "no log line says events were dropped"
        refetch_lines = list(_REFETCHED_LOG.finditer(log))
        assert refetch_lines, "no log line says dropped events were fetched again"
        # The last line's totals: all dropped, all fetched again, none left.
        last = tuple(int(x) for x in refetch_lines[-1].groups()[1:])
        assert last == (dropped, dropped, 0, 0), (last, rows)
        # Bounded: the queue held about the bound at most (events arrive in
        # transactions of 50 while one event is processed).
        assert peak <= limit + 200, f"the queue held {peak} events (bound {limit})"
        print(
            f"\nburst {count}, bound {limit}: generated in {t_generated:.1f} s, delivered in"
            f" {t_delivered:.1f} s, peak queue {peak}, dropped {dropped} ({rows}),"
            f" all persisted {t_caught_up:.1f} s after the release"
        )


async def assert_full_state(j: Joined) -> None:
    """The room left partial state with the resident's members and current
    state (`assert_complete` without its count of the generated members, for
    rooms where a test banned one)."""
    members = await j.client.members(j.room_id, timeout=TIMEOUT)
    joined = sorted(m["state_key"] for m in members if m["content"]["membership"] == "join")
    assert joined == sorted(j.room.joined_members())
    await poll_until(
        lambda: j.q("SELECT count(*) FROM partial_state_rooms") == [(0,)], timeout=TIMEOUT
    )
    current = {
        eid
        for (eid,) in j.q("SELECT event_id FROM current_state_events WHERE room_id = ?", j.room_id)
    }
    assert current == set(j.room.current_state.values())


def rejected(j: Joined, event_id: str) -> bool:
    return j.q("SELECT count(*) FROM rejections WHERE event_id = ?", event_id) == [(1,)]


def accepted(j: Joined, event_id: str) -> bool:
    return _persisted(j, [event_id]) == 1


@pytest_twisted.ensureDeferred
async def test_restart_with_a_full_queue_loses_nothing(
    synapse_factory, tls_files, tmp_path, db_backend
):
    """The joiner stops while a partial room's queue is full to its bound and
    more events wait to be fetched again: after the restart every event is
    stored and accepted (the queue is on disk, the dropped ids too)."""
    limit, count = 100, 400
    async with partial_join(
        synapse_factory, tls_files, tmp_path, inbound_queue_limit=limit
    ) as (resident, j):
        # The room's processing stalls on its first event (its sender's auth
        # chain is asked of the resident, which holds the answer), so the
        # queue is full when the joiner stops, whatever its speed.
        resident.hold(EVENT_AUTH)
        ids = burst(resident, count)
        await poll_until(lambda: resident._sender.sent >= count, timeout=300, interval=0.5)
        staged, pending = _staged(j), dropped_rows(j).get("pending", 0)
        assert staged >= limit // 2 and pending >= limit, (staged, dropped_rows(j))
        processed_before = _persisted(j, ids)

        j.joiner.restart()
        _, rows = await release_and_wait_stored(resident, j, ids, timeout=600)
        print(
            f"\nrestart with {staged} queued and {pending} dropped to fetch again"
            f" ({processed_before} of {count} processed before): all {count} stored, {rows}"
        )


@pytest_twisted.ensureDeferred
async def test_gaps_and_forks_while_partial_are_filled(
    synapse_factory, tls_files, tmp_path, db_backend
):
    """Events whose prev events never came: a gap of eight (only the last is
    sent), and a fork whose second branch is never sent, merged by an event
    that is. The joiner fetches what is missing (get_missing_events) while the
    room is partial; every event ends up stored and accepted, and the resync
    completes with the resident's state."""
    resident = await start_resident(tls_files, tmp_path, spec=SPEC)
    try:
        resident.hold(STATE_IDS)
        j = await join(synapse_factory, resident)
        await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT)
        room, spec = resident.room, resident.room.spec

        def message(n: int, prev: list[str] | None = None):
            return room.create_event(
                spec.member(n), "m.room.message", {"msgtype": "m.text", "body": f"m{n}"},
                prev_events=prev,
            )

        # A gap: eight events, only the last sent.
        gap = [message(n) for n in range(8)]
        resident.push(gap[-1])
        # A fork: two branches from the same event; only the first branch and
        # the event merging both are sent.
        base = room.forward_extremities()
        a1 = message(10, base)
        a2 = message(11, [a1.event_id])
        b1 = message(12, base)
        b2 = message(13, [b1.event_id])
        merge = message(14, [a2.event_id, b2.event_id])
        for event in (a1, a2, merge):
            resident.push(event)
        ids = [e.event_id for e in gap + [a1, a2, b1, b2, merge]]

        await wait_persisted(j, ids, timeout=TIMEOUT)
        assert j.q("SELECT count(*) FROM partial_state_rooms") == [(1,)], "no longer partial"
        resident.release()
        await assert_complete(j)
        assert _persisted(j, ids) == len(ids)
    finally:
        await resident.stop()


@pytest_twisted.ensureDeferred
async def test_banned_user_and_server_not_in_the_room_are_rejected_while_partial(
    synapse_factory, tls_files, tmp_path, db_backend
):
    """While partial: a member is banned, then sends a message; a user of a
    server that was never in the room sends one. Both are rejected, the
    messages around them accepted; after the resync they are still rejected."""
    resident = await start_resident(tls_files, tmp_path, spec=SPEC)
    resident.serve_keys_for(STRANGER)
    try:
        resident.hold(STATE_IDS)
        j = await join(synapse_factory, resident)
        await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT)
        room, spec = resident.room, resident.room.spec
        banned = spec.member(3)

        def message(sender: str, body: str):
            event = room.create_event(sender, "m.room.message", {"msgtype": "m.text", "body": body})
            resident.push(event)
            return event

        before = message(spec.member(1), "before")
        ban = resident.membership(banned, "ban", sender=spec.moderator(0))
        from_banned = message(banned, "from a banned user")
        from_stranger = message(f"@x:{STRANGER}", "from a server not in the room")
        after = message(spec.member(2), "after")

        await poll_until(
            lambda: accepted(j, after.event_id), timeout=TIMEOUT, description="the last message"
        )
        assert j.q("SELECT count(*) FROM partial_state_rooms") == [(1,)], "no longer partial"
        assert accepted(j, before.event_id) and accepted(j, ban.event_id)
        assert rejected(j, from_banned.event_id), "the banned user's message was not rejected"
        assert rejected(j, from_stranger.event_id), "the stranger's message was not rejected"

        resident.release()
        await assert_full_state(j)
        assert rejected(j, from_banned.event_id) and rejected(j, from_stranger.event_id)
        assert accepted(j, before.event_id) and accepted(j, after.event_id)
    finally:
        await resident.stop()


@pytest_twisted.ensureDeferred
async def test_event_the_partial_state_accepts_and_the_full_state_rejects_ends_up_rejected(
    synapse_factory, tls_files, tmp_path, db_backend
):
    """A member banned before we joined (the ban is a membership: not in the
    partial state) sends a message that claims their old join as its auth
    event. Against the partial state it is accepted; once the full state is
    there it is checked again, and ends up rejected."""
    resident = await start_resident(tls_files, tmp_path, spec=SPEC)
    try:
        room, spec = resident.room, resident.room.spec
        banned = spec.member(5)
        stale_auth = room.auth_events_for("m.room.message", banned, None, {})
        ban = resident.membership(banned, "ban", sender=spec.moderator(0))
        assert room.current_state[("m.room.member", banned)] == ban.event_id

        resident.hold(STATE_IDS)
        j = await join(synapse_factory, resident)
        await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT)
        assert j.q("SELECT count(*) FROM events WHERE event_id = ?", ban.event_id) == [(0,)], (
            "the ban is in the partial state: the test would prove nothing"
        )

        # The message claims the old join (as a server that missed the ban would).
        honest = room.auth_events_for
        room.auth_events_for = lambda *args: list(stale_auth)  # type: ignore[method-assign]
        try:
            forged = room.create_event(
                banned, "m.room.message", {"msgtype": "m.text", "body": "after my ban"}
            )
        finally:
            room.auth_events_for = honest  # type: ignore[method-assign]
        resident.push(forged)
        after = room.create_event(spec.member(6), "m.room.message", {"msgtype": "m.text", "body": "x"})
        resident.push(after)

        await poll_until(
            lambda: accepted(j, after.event_id), timeout=TIMEOUT, description="the later message"
        )
        assert accepted(j, forged.event_id), "rejected already against the partial state"

        resident.release()
        await assert_full_state(j)
        assert rejected(j, forged.event_id), "accepted by the full state, which has the ban"
        assert accepted(j, after.event_id)
    finally:
        await resident.stop()


GET_MISSING_EVENTS = r"^/_matrix/federation/v1/get_missing_events/"


@pytest_twisted.ensureDeferred
async def test_queue_stays_bounded_while_its_processing_is_stalled(
    synapse_factory, tls_files, tmp_path, db_backend
):
    """The room's queue stops moving (an event with a missing prev event waits
    for `/get_missing_events`, which the resident holds) while 400 events
    arrive, against a bound of 100: the bound holds as they arrive (patch
    0020; Synapse asks the module about the queue only between two events it
    processes), and once the fetch answers every event is stored."""
    limit, count = 100, 400
    async with partial_join(
        synapse_factory, tls_files, tmp_path, inbound_queue_limit=limit
    ) as (resident, j):
        room, spec = resident.room, resident.room.spec
        resident.hold(GET_MISSING_EVENTS)
        missing = room.create_event(spec.member(1), "m.room.message", {"msgtype": "m.text", "body": "gap"})
        stalled = room.create_event(spec.member(2), "m.room.message", {"msgtype": "m.text", "body": "stalled"})
        resident.push(stalled)
        await poll_until(
            lambda: resident.held_count() >= 2, timeout=TIMEOUT, description="get_missing_events held"
        )

        t0 = time.monotonic()
        ids = burst(resident, count)
        peak = 0
        while resident._sender.sent < count + 1 and time.monotonic() - t0 < 45:
            peak = max(peak, _staged(j))
            await sleep(0.3)
        peak = max(peak, _staged(j))
        assert resident._sender.sent == count + 1, f"only {resident._sender.sent} delivered"
        assert resident.held_count() >= 2, "the queue's processing was not stalled throughout"
        assert peak <= limit + 60, f"{peak} events queued while stalled (bound {limit})"
        assert dropped_rows(j).get("pending", 0) >= count - limit - 60, dropped_rows(j)

        _, rows = await release_and_wait_stored(
            resident, j, [missing.event_id, stalled.event_id] + ids, timeout=600
        )
        print(f"\nstalled queue: peak {peak} queued (bound {limit}), {rows}")
