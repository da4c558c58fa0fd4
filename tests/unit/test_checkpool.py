"""Check processes (`resync.checkpool`): started on demand, answering in order,
and failing loudly (never silently) when one dies, after which the engine
checks in threads. The verdicts themselves are compared with Synapse's in
test_checks_parity.py."""

import os
import signal
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from synapse.api.room_versions import RoomVersions

from synapse_fastjoin.resync.checkpool import CheckPool, CheckProcessFailed
from tests.harness.fakehs.events import finalise_event
from tests.harness.fakehs.keys import KEY_ID, signing_key

ROOM = "!room:a.example"


def _sleep(seconds: float) -> "defer.Deferred[None]":
    d: "defer.Deferred[None]" = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def _ready(pool: CheckPool) -> None:
    for _ in range(600):
        if pool.ready():
            return
        await _sleep(0.05)
    raise AssertionError("the check process did not start")


def _events(n: int) -> list[dict[str, Any]]:
    events = []
    for i in range(n):
        event = {
            "room_id": ROOM,
            "type": "m.room.message",
            "sender": "@u:a.example",
            "content": {"body": f"message {i}"},
            "depth": 10 + i,
            "origin_server_ts": 1_700_000_000_000 + i,
            "prev_events": [],
            "auth_events": [],
        }
        finalise_event(RoomVersions.V10, event, "a.example")
        events.append(event)
    return events


def _keys() -> dict:
    return {("a.example", KEY_ID): (bytes(signing_key("a.example").verify_key), 2**62)}


def test_no_processes_when_configured_off() -> None:
    pool = CheckPool(reactor, 0)
    pool.warm_up()
    assert not pool.enabled and not pool.ready()


@pytest_twisted.ensureDeferred
async def test_answers_in_order_with_one_verdict_per_item() -> None:
    pool = CheckPool(reactor, 2)
    pool.warm_up()
    try:
        await _ready(pool)
        events = _events(30)
        events[5]["signatures"]["a.example"][KEY_ID] = "A" * 86  # forged
        answers = await defer.gatherResults(
            [pool.check(events[i : i + 10], "10", _keys(), None) for i in range(0, 30, 10)]
        )
        verdicts = [v for answer in answers for v in answer]
        assert [v[0] for v in verdicts] == ["ok"] * 5 + ["bad_signature"] + ["ok"] * 24
        assert pool.requests == 3
        # Garbage is a verdict, not a failure of the process.
        (garbage,) = await pool.check(["not an event"], "10", _keys(), None)
        assert garbage[0] == "malformed"
    finally:
        pool.stop()


@pytest_twisted.ensureDeferred
async def test_a_dying_process_fails_its_requests_and_the_pool_stays_off() -> None:
    pool = CheckPool(reactor, 1)
    pool.warm_up()
    await _ready(pool)
    (worker,) = pool._workers
    pending = pool.check(_events(1) * 20000, "10", _keys(), None)
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(CheckProcessFailed):
        await pending
    assert not pool.ready()
    pool.warm_up()  # refused: something is wrong with running them here
    assert not pool._workers and not pool.enabled


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not reaped yet) has exited too.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


async def _wait_exit(pid: int, seconds: float) -> bool:
    for _ in range(int(seconds / 0.05)):
        if not _alive(pid):
            return True
        await _sleep(0.05)
    return False


@pytest_twisted.ensureDeferred
async def test_processes_stop_soon_after_the_last_holder_lets_go() -> None:
    """A resync's fetch holds the pool; once the last holder is done the
    processes stop within seconds, not after the minute of idle, so that their
    memory is not held through the resync's end steps. While a holder remains
    they stay."""
    pool = CheckPool(reactor, 1)
    try:
        with pool.holding():
            pool.warm_up()
            await _ready(pool)
            (worker,) = pool._workers
            pid = worker.pid
            with pool.holding():
                await pool.check(_events(3), "10", _keys(), None)
            # One holder left: the processes stay.
            assert not await _wait_exit(pid, 3.0)
            assert pool.ready()
            await pool.check(_events(3), "10", _keys(), None)
        assert await _wait_exit(pid, 10.0), "the check process outlived its last holder"
        assert not pool.ready() and pool.enabled
        # A later fetch starts them again.
        pool.warm_up()
        await _ready(pool)
    finally:
        pool.stop()
