"""An admin in control of a partial-state join: retry now (through given
servers), abort (with or without purge), and client requests that no longer
wait for ever.

A patched Synapse with the module joins a room served by the fake resident,
whose hold and fail rules keep the resync where each test needs it.
"""

import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from tests.e2e.test_fake_resident import trusting
from tests.e2e.test_resync_bad_input import (
    ADMIN_ROOMS,
    STATE,
    STATE_IDS,
    STREAM_THRESHOLD,
    TIMEOUT,
    Joined,
    PickyResident,
    assert_complete,
    start_resident,
)
from tests.harness.client import poll_until, quote, sleep
from tests.harness.fakehs.server import FakeResident, Rule
from tests.harness.synapse import merge_config

ERRCODE = "ORG.MATRIX.MSC3895_UNABLE_DUE_TO_PARTIAL_STATE"
MODULE = "synapse_fastjoin.FastJoinModule"


def config(resident: FakeResident | None, module: dict[str, Any] | None = None, **resync: Any) -> dict[str, Any]:
    resync_config = {
        "backoff_initial_seconds": 1,
        "backoff_max_seconds": 2,
        "event_fetch_threshold": STREAM_THRESHOLD,
        "log_interval_seconds": 1,
        **resync,
    }
    base = trusting(resident) if resident is not None else {}
    return merge_config(
        base,
        {"modules": [{"module": MODULE, "config": {"resync": resync_config, **(module or {})}}]},
    )


async def join(synapse_factory, resident: FakeResident, module: dict[str, Any] | None = None, **resync: Any) -> Joined:
    joiner = synapse_factory(variant="patched", name="joiner", config=config(resident, module, **resync))
    user_id, token = joiner.register_user("joiner", admin=True)
    client = joiner.client(token)
    await client.join(resident.room.room_id, server_name=resident.server_name, timeout=TIMEOUT)
    return Joined(joiner, user_id, client, resident.room)


def room_path(j: Joined, action: str) -> str:
    return f"{ADMIN_ROOMS}/{quote(j.room_id)}/{action}"


def members_path(j: Joined) -> str:
    return f"/_matrix/client/v3/rooms/{quote(j.room_id)}/members"


def no_partial_rows(j: Joined) -> bool:
    return all(
        j.q(f"SELECT count(*) FROM {table} WHERE room_id = ?", j.room_id) == [(0,)]
        for table in ("partial_state_rooms", "partial_state_rooms_servers", "partial_state_events")
    )


def history(j: Joined) -> list[tuple[str, str | None]]:
    return j.q(
        "SELECT outcome, error FROM fastjoin_resync_history WHERE room_id = ? ORDER BY finished_ts",
        j.room_id,
    )


async def outcomes(j: Joined, count: int) -> list[str]:
    """The history's outcomes once it has `count` rows (the row is written a
    moment after the room leaves partial state)."""
    await poll_until(
        lambda: len(history(j)) >= count, timeout=TIMEOUT, description=f"{count} history rows"
    )
    return [o for o, _ in history(j)]


async def phase(j: Joined) -> str | None:
    progress = await j.progress()
    return None if progress is None else progress.get("phase")


# Authentication and unknown rooms.


@pytest_twisted.ensureDeferred
async def test_retry_and_abort_need_an_admin_and_a_partial_room(synapse_factory):
    server = synapse_factory(variant="patched", config=config(None))
    _, admin_token = server.register_user("admin", admin=True)
    _, user_token = server.register_user("user", admin=False)
    admin, user, anonymous = server.client(admin_token), server.client(user_token), server.client()
    own_room = await admin.create_room(preset="public_chat")
    for action in ("retry", "abort"):
        for room_id in ("!nosuchroom:example.org", own_room):
            path = f"{ADMIN_ROOMS}/{quote(room_id)}/{action}"
            status, body = await anonymous.post(path, {})
            assert (status, body["errcode"]) == (401, "M_MISSING_TOKEN"), body
            status, body = await user.post(path, {})
            assert (status, body["errcode"]) == (403, "M_FORBIDDEN"), body
            # Twice: the answer does not change.
            for _ in range(2):
                status, body = await admin.post(path, {})
                assert (status, body["errcode"]) == (404, "M_NOT_FOUND"), body
    # A room that is not partial is left alone by abort.
    assert await admin.joined_members(own_room, timeout=10)


# Retry.


@pytest_twisted.ensureDeferred
async def test_retry_skips_the_backoff_and_asks_via_first(synapse_factory, tls_files, tmp_path):
    resident = await start_resident(tls_files, tmp_path, personas=2, cls=PickyResident)
    try:
        first, second = (p.server_name for p in resident.personas)
        # Every server fails: the engine backs off for ten minutes.
        failing = resident.add_rule(Rule("fail", STATE_IDS, status=500))
        j = await join(
            synapse_factory, resident, backoff_initial_seconds=600, backoff_max_seconds=600
        )
        progress = await poll_until(
            lambda: _waiting(j), timeout=TIMEOUT, description="the resync to wait to retry"
        )
        # (The delay has a jitter of 0.8 to 1.2 times the backoff.)
        assert progress["next_retry_ts"] > time.time() * 1000 + 0.8 * 600_000 - 30_000

        # Malformed via: refused, and nothing changes.
        for bad in (["not a server name!"], "localhost", [42], [""]):
            status, body = await j.client.post(room_path(j, "retry"), {"via": bad})
            assert (status, body["errcode"]) == (400, "M_INVALID_PARAM"), (bad, body)
        assert (await phase(j)) == "waiting_to_retry"

        # Retried at once, twice in a row: each retry is an attempt (which
        # fails again), not a wait for the ten-minute backoff.
        for _ in range(2):
            retries = progress["retries"]
            status, body = await j.client.post(room_path(j, "retry"), {})
            assert status == 200, body
            assert (body["woken"], body["started"], body["via"]) == (True, False, [])
            progress = await poll_until(
                lambda: _waiting(j, more_retries_than=retries),
                timeout=30,
                description="the retry to be attempted and fail",
            )

        resident.rules.remove(failing)
        asked_before = dict(resident.state_requests)
        started = time.monotonic()
        status, body = await j.client.post(
            room_path(j, "retry"),
            {"via": [j.joiner.server_name, second, "unknown.example.org:8448"]},
        )
        assert status == 200, body
        # Our own name is ignored; an unknown server is accepted (and fails).
        assert body["via"] == [second, "unknown.example.org:8448"]
        assert body["woken"] is True and body["started"] is False
        await assert_complete(j)
        assert time.monotonic() - started < 120, "the retry did not skip the 10-minute backoff"
        # The first server asked after the retry was the one named first.
        assert resident.state_requests.get(second, 0) > asked_before.get(second, 0)
        assert await outcomes(j, 1) == ["complete"]
        # Retrying a room that is no longer partial: 404.
        status, body = await j.client.post(room_path(j, "retry"), {})
        assert (status, body["errcode"]) == (404, "M_NOT_FOUND")
    finally:
        await resident.stop()


async def _waiting(j: Joined, more_retries_than: int = -1) -> dict[str, Any] | None:
    progress = await j.progress()
    if (
        progress
        and progress.get("phase") == "waiting_to_retry"
        and progress.get("next_retry_ts")
        and progress.get("retries", 0) > more_retries_than
    ):
        return progress
    return None


# Abort.


@pytest.mark.parametrize("held", [STATE_IDS, STATE], ids=["fetching_state_ids", "fetching_state"])
@pytest_twisted.ensureDeferred
async def test_abort_stops_the_resync_for_good_and_answers_waiting_requests(
    synapse_factory, tls_files, tmp_path, db_backend, held
):
    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.hold(held)
        # Waits are not bounded here: only the abort can end them.
        j = await join(synapse_factory, resident, module={"client_wait_timeout_seconds": 0})
        await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT, description=f"{held} held")
        expected_phase = "fetching_state_ids" if held == STATE_IDS else "fetching_state"
        assert (await phase(j)) == expected_phase

        waiting = defer.ensureDeferred(j.client.get(members_path(j), timeout=60))
        await sleep(1)
        assert not waiting.called, "/members answered while the room is partial"

        started = time.monotonic()
        first = defer.ensureDeferred(j.client.post(room_path(j, "abort"), {}))
        second = defer.ensureDeferred(j.client.post(room_path(j, "abort"), {}))
        (s1, b1), (s2, b2) = await first, await second
        assert s1 == 200, b1
        # A second abort while the first runs gets the same answer.
        assert (s2, b2) == (s1, b1)
        assert b1["left"] == [j.user_id] and b1["failed_to_leave"] == []
        assert b1["resync_was_running"] is True and b1["purged"] is False
        assert b1["requests_answered"] >= 1

        status, body = await waiting
        assert time.monotonic() - started < 30
        assert (status, body["errcode"], body["resync_phase"]) == (403, ERRCODE, "aborted"), body

        assert no_partial_rows(j)
        assert [o for o, _ in history(j)] == ["aborted"]
        assert history(j)[0][1] == f"aborted by {j.user_id}"
        assert j.q("SELECT count(*) FROM fastjoin_rooms") == [(0,)]
        assert j.q(
            "SELECT membership FROM local_current_membership WHERE room_id = ? AND user_id = ?",
            j.room_id,
            j.user_id,
        ) == [("leave",)]
        # The leave went to the resident.
        await poll_until(
            lambda: any(
                pdu.get("type") == "m.room.member"
                and pdu.get("state_key") == j.user_id
                and pdu.get("content", {}).get("membership") == "leave"
                for pdu in resident.received_pdus
            ),
            timeout=TIMEOUT,
            description="the leave to reach the resident",
        )
        # Done: 404 from now on, for the room and both actions.
        assert (await j.admin_room())[0] == 404
        for action in ("abort", "retry"):
            status, body = await j.client.post(room_path(j, action), {})
            assert (status, body["errcode"]) == (404, "M_NOT_FOUND"), (action, body)

        # The held request, let go, does not bring the resync back.
        log_before = j.joiner.read_log().count("starts (synapse-fastjoin engine)")
        resident.release()
        await sleep(3)
        assert j.joiner.read_log().count("starts (synapse-fastjoin engine)") == log_before
        assert no_partial_rows(j)
        assert [o for o, _ in history(j)] == ["aborted"]
        assert "Resync of %s aborted by a server admin" % j.room_id in j.joiner.read_log()

        # A rejoin starts cleanly: a new partial join and a resync that completes.
        await j.client.join(j.room_id, server_name=resident.server_name, timeout=TIMEOUT)
        await assert_complete(j)
        assert await outcomes(j, 2) == ["aborted", "complete"]
    finally:
        await resident.stop()


@pytest_twisted.ensureDeferred
async def test_abort_while_waiting_to_retry(synapse_factory, tls_files, tmp_path):
    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.add_rule(Rule("fail", STATE_IDS, status=500))
        j = await join(synapse_factory, resident, backoff_initial_seconds=600, backoff_max_seconds=600)
        await poll_until(lambda: _waiting(j), timeout=TIMEOUT, description="the resync to wait")
        started = time.monotonic()
        status, body = await j.client.post(room_path(j, "abort"), {"purge": False})
        assert status == 200, body
        assert time.monotonic() - started < 30, "the abort waited for the backoff"
        assert body["resync_was_running"] is True
        assert no_partial_rows(j)
        assert [o for o, _ in history(j)] == ["aborted"]
    finally:
        await resident.stop()


@pytest_twisted.ensureDeferred
async def test_abort_with_purge_deletes_the_room(synapse_factory, tls_files, tmp_path, db_backend):
    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.hold(STATE)
        j = await join(synapse_factory, resident)
        await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT, description="/state held")
        assert j.q("SELECT count(*) FROM events WHERE room_id = ?", j.room_id)[0][0] > 0

        status, body = await j.client.post(room_path(j, "abort"), {"purge": "yes"})
        assert (status, body["errcode"]) == (400, "M_INVALID_PARAM"), body
        assert (await j.admin_room())[0] == 200

        status, body = await j.client.post(room_path(j, "abort"), {"purge": True})
        assert status == 200, body
        assert body["purged"] is True and body["left"] == [j.user_id]
        for table in ("events", "rooms", "current_state_events", "room_memberships"):
            assert j.q(f"SELECT count(*) FROM {table} WHERE room_id = ?", j.room_id) == [(0,)], table
        assert no_partial_rows(j)
        # The module's history keeps the abort.
        assert [o for o, _ in history(j)] == ["aborted"]
        resident.release()
    finally:
        await resident.stop()


@pytest_twisted.ensureDeferred
async def test_abort_racing_the_resyncs_own_end(synapse_factory, tls_files, tmp_path):
    """Abort right as the resync finishes: whichever wins, the room ends in
    one consistent state, with one history row that says which."""
    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.hold(STATE)
        j = await join(synapse_factory, resident)
        await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT, description="/state held")
        resident.release()
        statuses = []
        for _ in range(200):
            status, body = await j.client.post(room_path(j, "abort"), {})
            statuses.append(status)
            if status != 200 or body.get("aborted"):
                break
        assert statuses[-1] in (200, 404), statuses
        await poll_until(lambda: no_partial_rows(j), timeout=TIMEOUT, description="partial rows gone")
        rows = await outcomes(j, 1)
        assert rows == (["aborted"] if statuses[-1] == 200 else ["complete"]), (statuses, rows)
        # Aborted: our user left; complete: still in the room. Either way
        # nothing waits any more.
        membership = j.q(
            "SELECT membership FROM local_current_membership WHERE room_id = ? AND user_id = ?",
            j.room_id,
            j.user_id,
        )
        assert membership == [("leave" if statuses[-1] == 200 else "join",)]
        status, _ = await j.client.get(members_path(j), timeout=30)
        assert status == 200
    finally:
        await resident.stop()


# Bounded waits.


@pytest_twisted.ensureDeferred
async def test_a_client_waiting_too_long_gets_an_error_then_the_answer(
    synapse_factory, tls_files, tmp_path, db_backend
):
    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.hold(STATE)
        j = await join(synapse_factory, resident, module={"client_wait_timeout_seconds": 2})
        await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT, description="/state held")
        for path in (members_path(j), f"/_matrix/client/v3/rooms/{quote(j.room_id)}/joined_members"):
            started = time.monotonic()
            status, body = await j.client.get(path, timeout=30)
            took = time.monotonic() - started
            assert status == 403, body
            assert body["errcode"] == ERRCODE
            assert body["resync_phase"] == "fetching_state"
            assert body["room_id"] == j.room_id
            assert isinstance(body["retry_after_ms"], int) and body["retry_after_ms"] > 0
            assert 1.5 <= took < 10, took
        # What does not need the full state still answers at once.
        status, _ = await j.client.get(
            f"/_matrix/client/v3/rooms/{quote(j.room_id)}/state/m.room.create/", timeout=5
        )
        assert status == 200
        resident.release()
        await assert_complete(j)
        status, body = await j.client.get(members_path(j), timeout=30)
        assert status == 200
    finally:
        await resident.stop()


@pytest.mark.parametrize("value", [-1, "30s", True, 1.5])
def test_bad_client_wait_timeout_stops_startup_naming_the_key(synapse_factory, value):
    server = synapse_factory(
        variant="patched",
        config={"modules": [{"module": MODULE, "config": {"client_wait_timeout_seconds": value}}]},
        start=False,
    )
    result = server.start(expect_failure=True)
    assert result.returncode != 0
    assert "client_wait_timeout_seconds" in result.output
    assert "Error in configuration" in result.output


@pytest_twisted.ensureDeferred
async def test_hierarchy_answers_from_partial_state_without_waiting(
    synapse_factory, tls_files, tmp_path
):
    """/hierarchy needs the rooms' space children, not their members (patch
    0008): it answers while the resync is held, with waits unbounded."""
    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.hold(STATE)
        j = await join(synapse_factory, resident, module={"client_wait_timeout_seconds": 0})
        await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT, description="/state held")
        started = time.monotonic()
        status, body = await j.client.get(
            f"/_matrix/client/v1/rooms/{quote(j.room_id)}/hierarchy", timeout=20
        )
        assert status == 200, body
        assert time.monotonic() - started < 10
        assert [r["room_id"] for r in body["rooms"]] == [j.room_id]
        assert (await phase(j)) == "fetching_state"
        resident.release()
        await assert_complete(j)
    finally:
        await resident.stop()


@pytest_twisted.ensureDeferred
async def test_an_abort_cut_by_a_restart_is_finished_by_the_next_start(
    synapse_factory, tls_files, tmp_path, db_backend
):
    """Synapse dies right after an abort was recorded (the abort's first
    step) and before anything else was done: the next start finishes it, so
    the room ends aborted, not half (left, no partial rows, history says so)."""
    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.hold(STATE)
        j = await join(synapse_factory, resident)
        await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT, description="/state held")
        j.joiner.pause()
        j.joiner.kill()
        # What the abort writes first, as the crash left it.
        conn = j.joiner.database.connect()
        try:
            cur = conn.cursor()
            p = j.joiner.database.placeholder
            cur.execute(
                f"UPDATE fastjoin_rooms SET resync_status = {p} WHERE room_id = {p}",
                ("aborting", j.room_id),
            )
            assert cur.rowcount == 1
            conn.commit()
        finally:
            conn.close()
        assert not no_partial_rows(j)

        j.joiner.start()
        await poll_until(lambda: no_partial_rows(j), timeout=TIMEOUT, description="the abort to finish")
        assert await outcomes(j, 1) == ["aborted"]
        assert history(j)[0][1] == "aborted by a server admin"
        assert j.q(
            "SELECT membership FROM local_current_membership WHERE room_id = ? AND user_id = ?",
            j.room_id,
            j.user_id,
        ) == [("leave",)]
        assert j.q("SELECT count(*) FROM fastjoin_rooms") == [(0,)]
        log = j.joiner.read_log()
        assert "was under way when Synapse stopped: finishing it" in log
        # The resumed resync did not run: the abort took its place.
        assert log.count("starts (synapse-fastjoin engine)") == 1
        status, _ = await j.admin_room()
        assert status == 404
        resident.release()
    finally:
        await resident.stop()


@pytest_twisted.ensureDeferred
async def test_synapse_killed_during_an_abort_ends_aborted_or_untouched(
    synapse_factory, tls_files, tmp_path
):
    """The joiner is frozen and killed as soon as it logs the start of an
    abort, then started again: the room ends either aborted (user gone, no
    partial rows, history `aborted`) or, if the kill came before the abort was
    recorded, with a completed resync; never half of each."""
    from tests.e2e.test_resync_bad_input import LogFollower

    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.hold(STATE)
        j = await join(synapse_factory, resident)
        await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT, description="/state held")
        log = LogFollower(j.joiner.log_path)
        request = defer.ensureDeferred(j.client.post(room_path(j, "abort"), {}, timeout=20))
        request.addErrback(lambda _: None)  # the server dies under it
        await poll_until(
            lambda: log.seen("Abort of the resync of"),
            timeout=TIMEOUT,
            interval=0.005,
            description="the abort to start",
        )
        j.joiner.pause()
        j.joiner.kill()
        await request
        j.joiner.start()
        resident.release()
        await poll_until(lambda: no_partial_rows(j), timeout=TIMEOUT, description="the room to leave partial state")
        rows = await outcomes(j, 1)
        membership = j.q(
            "SELECT membership FROM local_current_membership WHERE room_id = ? AND user_id = ?",
            j.room_id,
            j.user_id,
        )
        assert (rows, membership) in (
            (["aborted"], [("leave",)]),
            (["complete"], [("join",)]),
        ), (rows, membership)
        assert j.q("SELECT count(*) FROM fastjoin_rooms") == [(0,)]
    finally:
        await resident.stop()


@pytest.mark.parametrize("action", ["retry", "abort"])
@pytest_twisted.ensureDeferred
async def test_retry_and_abort_while_catching_up(synapse_factory, tls_files, tmp_path, action):
    """Events arrive while the room is partial; once the state at the join is
    in, the engine brings them to full state one by one (catchup_batch_size 1,
    so that this takes seconds). A retry then changes nothing (the resync
    completes); an abort stops it between two events."""
    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.hold(STATE)
        j = await join(synapse_factory, resident, catchup_batch_size=1)
        await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT, description="/state held")
        count = 120
        resident.inject(rate=20, count=count)
        await poll_until(
            lambda: j.q("SELECT count(*) FROM partial_state_events")[0][0] >= count + 1,
            timeout=TIMEOUT,
            description="the live events to be stored as partial-state events",
        )
        resident.release()
        await poll_until(
            lambda: _in_phase(j, "catching_up"), timeout=TIMEOUT, interval=0.02,
            description="the catch-up",
        )
        status, body = await j.client.post(room_path(j, action), {})
        assert status == 200, body
        if action == "retry":
            assert (body["running"], body["woken"], body["started"]) == (True, False, False)
            await assert_complete(j)
            assert await outcomes(j, 1) == ["complete"]
            return
        assert body["resync_was_running"] is True
        assert no_partial_rows(j)
        assert [o for o, _ in history(j)] == ["aborted"]
        # It stopped between two events, by itself, not cancelled half-way.
        log = j.joiner.read_log()
        assert "aborted by a server admin" in log
        assert "Re-starting finished log context" not in log
    finally:
        await resident.stop()


async def _in_phase(j: Joined, wanted: str) -> bool:
    return (await phase(j)) == wanted
