"""FinishGate (resync/finish_gate.py): runs checked against partial state
wait while the end of a resync is under way, and the end waits for the runs
already past the gate; every wait is bounded."""

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock

from synapse_fastjoin.resync.finish_gate import FinishGate

ROOM = "!room:example.org"
OTHER = "!other:example.org"


def _start(coro: Any) -> list[Any]:
    """Runs a coroutine; the list gets its result once it ends."""
    out: list[Any] = []
    defer.ensureDeferred(coro).addBoth(out.append)
    return out


async def _run(gate: FinishGate, room: str, release: "defer.Deferred[None]", log: list[str], name: str) -> None:
    opened = await gate.wait_open(room)
    log.append(f"{name} starts ({'open' if opened else 'waited'})")
    async with gate.partial_run(room):
        await release
    log.append(f"{name} ends")


def test_open_gate_lets_runs_through_and_forgets_the_room() -> None:
    gate = FinishGate(Clock())
    log: list[str] = []
    release: defer.Deferred[None] = defer.Deferred()
    _start(_run(gate, ROOM, release, log, "a"))
    assert log == ["a starts (open)"]
    assert gate.in_flight(ROOM) == 1
    release.callback(None)
    assert log == ["a starts (open)", "a ends"]
    assert gate.in_flight(ROOM) == 0
    assert gate._rooms == {}


def test_closed_gate_holds_runs_until_reopened() -> None:
    gate = FinishGate(Clock())
    gate.close(ROOM)
    log: list[str] = []
    release: defer.Deferred[None] = defer.Deferred()
    release.callback(None)
    _start(_run(gate, ROOM, release, log, "a"))
    _start(_run(gate, OTHER, release, log, "other"))
    assert log == ["other starts (open)", "other ends"]  # another room is not held
    gate.reopen(ROOM)
    assert log[2:] == ["a starts (waited)", "a ends"]
    assert gate.runs_waited == 1
    assert gate._rooms == {}


def test_a_run_waits_at_most_run_wait_s() -> None:
    clock = Clock()
    gate = FinishGate(clock, run_wait_s=10.0)
    gate.close(ROOM)
    log: list[str] = []
    release: defer.Deferred[None] = defer.Deferred()
    release.callback(None)
    _start(_run(gate, ROOM, release, log, "a"))
    clock.advance(9.9)
    assert log == []
    clock.advance(0.2)
    assert log == ["a starts (waited)", "a ends"]
    assert gate.is_closed(ROOM)  # the gate itself stays closed
    assert not clock.getDelayedCalls()


def test_finish_waits_for_runs_in_flight() -> None:
    clock = Clock()
    gate = FinishGate(clock)
    log: list[str] = []
    first: defer.Deferred[None] = defer.Deferred()
    second: defer.Deferred[None] = defer.Deferred()
    _start(_run(gate, ROOM, first, log, "a"))
    _start(_run(gate, ROOM, second, log, "b"))
    gate.close(ROOM)
    late: defer.Deferred[None] = defer.Deferred()
    _start(_run(gate, ROOM, late, log, "c"))  # after the close: waits
    finished = _start(gate.wait_for_runs(ROOM))
    assert finished == []
    first.callback(None)
    assert finished == []  # b still in flight
    second.callback(None)
    assert finished == [True]
    assert log == ["a starts (open)", "b starts (open)", "a ends", "b ends"]
    gate.reopen(ROOM)
    assert log[-1] == "c starts (waited)"
    late.callback(None)
    assert log[-1] == "c ends"
    assert gate._rooms == {}
    assert not clock.getDelayedCalls()


def test_finish_waits_at_most_finish_wait_s() -> None:
    clock = Clock()
    gate = FinishGate(clock, finish_wait_s=5.0)
    log: list[str] = []
    stuck: defer.Deferred[None] = defer.Deferred()
    _start(_run(gate, ROOM, stuck, log, "a"))
    gate.close(ROOM)
    finished = _start(gate.wait_for_runs(ROOM))
    clock.advance(5.1)
    assert finished == [False]
    assert gate.finish_waits_timed_out == 1
    # The stuck run ends later; nothing waits for it any more.
    stuck.callback(None)
    gate.reopen(ROOM)
    assert gate._rooms == {}


def test_no_run_in_flight_means_no_wait() -> None:
    gate = FinishGate(Clock())
    gate.close(ROOM)
    assert _start(gate.wait_for_runs(ROOM)) == [True]
    gate.reopen(ROOM)
    gate.reopen(ROOM)  # twice is harmless
    assert gate._rooms == {}


def test_a_failing_run_still_leaves_the_flight() -> None:
    gate = FinishGate(Clock())

    async def failing() -> None:
        async with gate.partial_run(ROOM):
            raise ValueError("persist failed")

    result = _start(failing())
    assert result[0].check(ValueError)
    assert gate.in_flight(ROOM) == 0
    assert gate._rooms == {}


def test_runs_in_flight_counts_every_room() -> None:
    """What the resync's share of SQLite's connection asks
    (storage/connection_share.py): runs in flight in any room."""
    gate = FinishGate(Clock())
    log: list[str] = []
    releases: list[defer.Deferred[None]] = [defer.Deferred() for _ in range(3)]
    assert gate.runs_in_flight() == 0
    _start(_run(gate, ROOM, releases[0], log, "a"))
    _start(_run(gate, ROOM, releases[1], log, "b"))
    _start(_run(gate, OTHER, releases[2], log, "c"))
    assert gate.runs_in_flight() == 3
    releases[0].callback(None)
    releases[2].callback(None)
    assert gate.runs_in_flight() == 1
    releases[1].callback(None)
    assert gate.runs_in_flight() == 0
