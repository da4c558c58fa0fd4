# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Runs of staged events checked against a room's partial state keep out of
the end of the room's resync, and the end waits for those in flight.

A run of staged inbound events (handlers/staged_runs.py) in a partial-state
room is checked against the partial state and persisted as partial-state
events. If the resync un-partial-states the room between the run's checks
and its write, Synapse refuses the write (`PartialStateConflictError`), and
only after it has worked out the room's new current state from the run's
partial state group against the room's full current state: at 200,000
members that took a run begun 18 s before the end of a resync two minutes,
during which the room's inbound queue stood still (Synapse's processing lock
is held), and then the run was given back to be checked again. Synapse's own
one-event path pays the same for the event it holds at that moment.

So, per room:

- the resync *closes* the gate once the state at the join is stored (what is
  left is the catch-up of events that arrived while partial, the current
  state and the un-partial-stating: seconds), and reopens it whenever its
  pass ends, however it ends;
- a run that would be checked against partial state waits while the gate is
  closed (at most `run_wait_s`), then is checked against what the room has
  then, usually the full state;
- before it writes the new current state, the resync waits (at most
  `finish_wait_s`) for the runs already past the gate: their events are then
  persisted partial-state and caught up like any other.

The gate lives in the process that runs the resync. A run on another worker
(an event persister other than the main process) does not see it, and keeps
the old behaviour: given back on conflict, nothing lost.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from twisted.internet import defer

from synapse.logging.context import make_deferred_yieldable

# A run waits this long at most for a closed gate (the resync's end takes
# seconds; a resync that fails there reopens the gate at once).
RUN_WAIT_S = 120.0
# The end of a resync waits this long at most for runs already past the gate.
FINISH_WAIT_S = 30.0


class _Room:
    __slots__ = ("closed", "opened", "in_flight", "drained")

    def __init__(self) -> None:
        self.closed = False
        # Fired when the gate opens again (runs waiting for it).
        self.opened: list[defer.Deferred[None]] = []
        self.in_flight = 0
        # Fired when no run is in flight any more (the resync's end).
        self.drained: list[defer.Deferred[None]] = []

    def idle(self) -> bool:
        return not self.closed and not self.in_flight and not self.opened and not self.drained


def _fire(waiters: list["defer.Deferred[None]"]) -> None:
    while waiters:
        d = waiters.pop(0)
        if not d.called:
            d.callback(None)


class FinishGate:
    """Args:
        reactor: for the bounded waits (`callLater`).
        run_wait_s, finish_wait_s: the bounds (module docstring).
    """

    def __init__(self, reactor: Any, run_wait_s: float = RUN_WAIT_S, finish_wait_s: float = FINISH_WAIT_S) -> None:
        self._reactor = reactor
        self._run_wait_s = run_wait_s
        self._finish_wait_s = finish_wait_s
        self._rooms: dict[str, _Room] = {}
        # Counts for the log and the tests.
        self.runs_waited = 0
        self.finish_waits_timed_out = 0

    def _room(self, room_id: str) -> _Room:
        room = self._rooms.get(room_id)
        if room is None:
            room = self._rooms[room_id] = _Room()
        return room

    def _forget_if_idle(self, room_id: str) -> None:
        room = self._rooms.get(room_id)
        if room is not None and room.idle():
            del self._rooms[room_id]

    def is_closed(self, room_id: str) -> bool:
        room = self._rooms.get(room_id)
        return room is not None and room.closed

    def in_flight(self, room_id: str) -> int:
        room = self._rooms.get(room_id)
        return room.in_flight if room is not None else 0

    def runs_in_flight(self) -> int:
        """Runs checked against partial state in flight, in every room."""
        return sum(room.in_flight for room in self._rooms.values())

    async def _wait(self, waiters: list["defer.Deferred[None]"], seconds: float) -> bool:
        """Waits until one of `waiters`' owners fires it, or `seconds`.
        Returns False on the timeout."""
        d: defer.Deferred[None] = defer.Deferred()
        waiters.append(d)
        timed_out = []

        def on_timeout() -> None:
            if not d.called:
                timed_out.append(True)
                if d in waiters:
                    waiters.remove(d)
                d.callback(None)

        call = self._reactor.callLater(seconds, on_timeout)
        try:
            await make_deferred_yieldable(d)
        finally:
            if call.active():
                call.cancel()
            if d in waiters:
                waiters.remove(d)
        return not timed_out

    # The resync's side.

    def close(self, room_id: str) -> None:
        """No new partial-state run starts in the room until `reopen`."""
        self._room(room_id).closed = True

    def reopen(self, room_id: str) -> None:
        room = self._rooms.get(room_id)
        if room is None:
            return
        room.closed = False
        _fire(room.opened)
        self._forget_if_idle(room_id)

    async def wait_for_runs(self, room_id: str) -> bool:
        """Waits until no partial-state run of the room is in flight (at most
        `finish_wait_s`). Returns False if some still were at the timeout."""
        room = self._rooms.get(room_id)
        if room is None or not room.in_flight:
            return True
        done = await self._wait(room.drained, self._finish_wait_s)
        if not done:
            self.finish_waits_timed_out += 1
        self._forget_if_idle(room_id)
        return done

    # The runs' side.

    async def wait_open(self, room_id: str) -> bool:
        """Waits while the gate is closed (at most `run_wait_s`). Returns
        False if it waited (the room's state may have changed meanwhile)."""
        room = self._rooms.get(room_id)
        if room is None or not room.closed:
            return True
        self.runs_waited += 1
        await self._wait(room.opened, self._run_wait_s)
        self._forget_if_idle(room_id)
        return False

    @asynccontextmanager
    async def partial_run(self, room_id: str) -> AsyncIterator[None]:
        """Counts a run checked against the room's partial state, from its
        checks to its write, as in flight."""
        room = self._room(room_id)
        room.in_flight += 1
        try:
            yield
        finally:
            room.in_flight -= 1
            if not room.in_flight:
                _fire(room.drained)
            self._forget_if_idle(room_id)
