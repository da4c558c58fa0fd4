"""Turns at a room's events between Synapse's persistence queue and our writers.

Synapse's event persistence queue processes one task per room at a time: a
batch of events, or a recalculation of the room's current state. The chain
cover index, the duplicate checks and the current state need one writer per
room. synapse-fastjoin writes to a room's events itself in two places: the
bulk writer of the state at a join (outliers, `storage/bulk.py`) and the
current state at the end of a resync (`storage/current_state.py`).

Patch 0034 asks, before each task of Synapse's queue, for that task's turn
(`persistence_turn`); :class:`RoomTurns` gives it. Who may run beside whom:

- our *outlier* writes and Synapse's batches of *new non-state events*
  (none of them an outlier or a redaction, not backfilled) run side by side:
  such a batch writes rows that are the batch's own (its events, their
  edges, auth rows, push actions, the forward extremities) and reads no row
  the outlier writes write (those are state events, their chains, their
  memberships); the outlier writes read no row such a batch writes;
- every other task of Synapse's (state events, outliers, backfill, current
  state) and our *exclusive* writes (the current state) wait for everything
  else at the room, as before;
- our writers take turns among themselves.

Turns are handed over in the order they were asked for once the room frees
up (a waiting exclusive writer is not overtaken by later outlier writes), so
neither side waits for the other's whole backlog: under live traffic Synapse's
queue used to hold the room for as long as it had batches queued.

Where the patch's callback is not registered to this process's
:class:`RoomTurns` (a module built without it, or a unit test's bare
HomeServer), the writers fall back to holding the room in Synapse's queue
itself (:func:`synapse_holds_room`), which excludes everything.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Literal

from twisted.internet import defer

from synapse.logging.context import PreserveLoggingContext, make_deferred_yieldable
from synapse.util.duration import Duration

if TYPE_CHECKING:
    from synapse.server import HomeServer

#: What a holder may run beside: "shared" holders (our outlier writes,
#: Synapse's batches of new non-state events) run together unless both are
#: ours; "exclusive" holders run alone.
Kind = Literal["outliers", "plain", "exclusive"]


def task_kind(task: Any) -> Kind:
    """How Synapse's queue task `task` may run beside our outlier writes:
    "plain" for a batch of new non-state events (no outlier, no redaction,
    not backfilled), "exclusive" for anything else."""
    events_and_contexts = getattr(task, "events_and_contexts", None)
    if events_and_contexts is None or getattr(task, "backfilled", True):
        return "exclusive"  # a current-state recalculation, or backfill
    for event, _ in events_and_contexts:
        if event.internal_metadata.is_outlier() or event.is_state() or event.type == "m.room.redaction":
            return "exclusive"
    return "plain"


def _compatible(kind: Kind, holders: list[Kind]) -> bool:
    if not holders:
        return True
    if kind == "exclusive" or "exclusive" in holders:
        return False
    # Shared kinds: one outlier writer and one Synapse batch at most (each
    # side serialises its own).
    return kind not in holders


class _Room:
    __slots__ = ("holders", "waiting")

    def __init__(self) -> None:
        self.holders: list[Kind] = []
        self.waiting: deque[tuple[Kind, defer.Deferred[None]]] = deque()


class RoomTurns:
    """Per room: who holds it, and who waits, first come first served."""

    def __init__(self) -> None:
        self._rooms: dict[str, _Room] = {}

    def holders(self, room_id: str) -> list[Kind]:
        room = self._rooms.get(room_id)
        return list(room.holders) if room else []

    def waiting(self, room_id: str) -> int:
        room = self._rooms.get(room_id)
        return len(room.waiting) if room else 0

    async def acquire(self, room_id: str, kind: Kind) -> Callable[[], None]:
        """Wait for the room's turn for `kind`; return the release function
        (call it exactly once)."""
        room = self._rooms.setdefault(room_id, _Room())
        # First come first served: a newcomer waits behind anyone waiting.
        if not room.waiting and _compatible(kind, room.holders):
            room.holders.append(kind)
        else:
            d: defer.Deferred[None] = defer.Deferred()
            room.waiting.append((kind, d))
            try:
                await make_deferred_yieldable(d)
            except BaseException:
                # Cancelled while waiting (or after being handed the turn in
                # the same tick): give back what we were given, if anything.
                if (kind, d) in room.waiting:
                    room.waiting.remove((kind, d))
                elif d.called:
                    self._release(room_id, room, kind)
                self._wake(room_id, room)
                raise
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._release(room_id, room, kind)

        return release

    def _release(self, room_id: str, room: _Room, kind: Kind) -> None:
        room.holders.remove(kind)
        self._wake(room_id, room)

    def _wake(self, room_id: str, room: _Room) -> None:
        # Hand the room to waiters in order, as far as they fit together.
        woken: list[defer.Deferred[None]] = []
        while room.waiting and _compatible(room.waiting[0][0], room.holders):
            kind, d = room.waiting.popleft()
            room.holders.append(kind)
            woken.append(d)
        if not room.holders and not room.waiting:
            self._rooms.pop(room_id, None)
        with PreserveLoggingContext():
            for d in woken:
                d.callback(None)

    async def synapse_turn(self, room_id: str, task: Any) -> Callable[[], None]:
        """Patch 0034's `persistence_turn` callback."""
        return await self.acquire(room_id, task_kind(task))

    @contextlib.asynccontextmanager
    async def hold(
        self, room_id: str, kind: Kind, clock: Any, on_wait: Callable[[float], None] | None = None
    ) -> AsyncIterator[None]:
        started = clock.time()
        release = await self.acquire(room_id, kind)
        try:
            if on_wait is not None:
                on_wait(clock.time() - started)
            yield
        finally:
            release()


_TURNS: "weakref.WeakKeyDictionary[HomeServer, RoomTurns]" = weakref.WeakKeyDictionary()


def room_turns(hs: "HomeServer") -> RoomTurns:
    """This homeserver's turns (one per process)."""
    turns = _TURNS.get(hs)
    if turns is None:
        turns = _TURNS[hs] = RoomTurns()
    return turns


def _turns_in_force(hs: "HomeServer") -> RoomTurns | None:
    """The RoomTurns Synapse's queue asks, if patch 0034's callback is
    registered to this homeserver's; else None."""
    callbacks = getattr(hs.get_module_api_callbacks(), "fastjoin", None)
    registered = getattr(callbacks, "_persistence_turn", None)
    turns = _TURNS.get(hs)
    if turns is not None and registered is not None and getattr(registered, "__self__", None) is turns:
        return turns
    return None


@contextlib.asynccontextmanager
async def room_turn(
    hs: "HomeServer", room_id: str, kind: Literal["outliers", "exclusive"],
    on_wait: Callable[[float], None] | None = None,
) -> AsyncIterator[None]:
    """Hold the room against Synapse's persistence queue for one write of
    ours: beside new non-state batches for "outliers", alone for
    "exclusive". `on_wait` is told how long taking the turn took."""
    turns = _turns_in_force(hs)
    if turns is not None:
        async with turns.hold(room_id, kind, hs.get_clock(), on_wait):
            yield
    else:
        async with synapse_holds_room(hs, room_id, on_wait):
            yield


@contextlib.asynccontextmanager
async def synapse_holds_room(
    hs: "HomeServer", room_id: str, on_wait: Callable[[float], None] | None = None
) -> AsyncIterator[None]:
    """Without patch 0034's callback: hold the room's slot in Synapse's event
    persistence queue itself, which excludes every task of the queue. The
    queue lets go only once it has drained what was queued for the room, so
    this polls; when released, the queue's processing is started again if
    anything waits."""
    controller = hs.get_storage_controllers().persistence
    assert controller is not None
    queue = controller._event_persist_queue
    clock = hs.get_clock()
    started = clock.time()
    while room_id in queue._currently_persisting_rooms:
        await clock.sleep(Duration(milliseconds=5))
    queue._currently_persisting_rooms.add(room_id)
    if on_wait is not None:
        on_wait(clock.time() - started)
    try:
        yield
    finally:
        queue._currently_persisting_rooms.discard(room_id)
        if queue._event_persist_queues.get(room_id):
            queue._handle_queue(room_id)
