"""The inbound queue's bound checks answered without the database while the
queue is known to have room (handlers/inbound_queue.py `_Headroom`).

The module is checked against a model of the staging table: every answer it
gives without asking must be one the database would have given, so the queue
never passes its bound unseen, and a check that found dropped events waiting
is never skipped after.
"""

from typing import Any

from twisted.internet import defer

from synapse_fastjoin.handlers import inbound_queue as iq
from synapse_fastjoin.handlers.inbound_queue import InboundQueue
from tests.harness.sync_run import run

ROOM = "!room:resident"


class Model:
    """The staging table of one room, and the module's bound over it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.staged = 0
        self.pending = 0
        self.queries = 0
        self.partial = True
        # When set, each query waits for its Deferred, which gives the count.
        self.gates: list[defer.Deferred] = []

    # The module's storage (FastJoinStore.bound_inbound_queue).
    async def bound_inbound_queue(
        self, room_id: str, limit: int, now_ms: int, quick: bool = False
    ) -> tuple[int, int, int]:
        assert quick
        self.queries += 1
        if self.gates:
            gate: defer.Deferred = defer.Deferred()
            self.gates.append(gate)
            return 0, await gate, 0
        dropped = 0
        if self.pending:
            # Everything behind a waiting dropped event goes behind it.
            dropped = self.staged - 1
        elif limit and self.staged > limit:
            dropped = self.staged - limit
        self.staged -= dropped
        self.pending += dropped
        return dropped, self.staged, self.pending

    # The module's resync history (FastJoinStore.last_complete_resync_ts).
    finished_ms: int | None = None
    history_reads = 0

    async def last_complete_resync_ts(self, room_id: str) -> int | None:
        self.history_reads += 1
        return self.finished_ms

    # Synapse's main store.
    async def is_partial_state_room(self, room_id: str) -> bool:
        return self.partial


class FakeHs:
    hostname = "joiner"

    def __init__(self, model: Model) -> None:
        self._model = model

    def get_datastores(self) -> Any:
        model = self._model

        class Stores:
            main = model

        return Stores()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _queue(limit: int) -> tuple[InboundQueue, Model, Clock]:
    model = Model(limit)
    queue = InboundQueue(FakeHs(model), model, limit, run_in_background=lambda *a: None)
    clock = Clock()
    queue._monotonic = clock
    return queue, model, clock


def _stage(queue: InboundQueue, model: Model, n: int = 1) -> None:
    for _ in range(n):
        model.staged += 1
        run(queue.on_staged(ROOM))
        # Whatever the module answered without asking, the bound holds.
        assert not model.limit or model.staged <= model.limit or model.pending


def test_arrivals_far_below_the_bound_are_not_checked_one_by_one():
    queue, model, _ = _queue(limit=1000)
    _stage(queue, model, 400)
    # One check, then half the headroom (499) without asking.
    assert model.queries == 1
    assert queue.checks_skipped == 399


def test_the_database_is_asked_again_once_half_the_headroom_is_used():
    queue, model, _ = _queue(limit=1000)
    _stage(queue, model, 1)  # check: 1 staged, headroom 999
    _stage(queue, model, 499)  # counted: 1 + 499 < 1000
    assert model.queries == 1
    _stage(queue, model, 1)
    assert model.queries == 2


def test_a_burst_never_passes_the_bound_unseen():
    queue, model, _ = _queue(limit=100)
    # Nothing is processed: the queue only grows.
    for _ in range(500):
        _stage(queue, model)
    assert model.staged <= 100
    assert model.staged + model.pending == 500
    # The checks grow with the burst only logarithmically until the bound.
    assert model.queries < 500


def test_waiting_dropped_events_turn_skipping_off():
    queue, model, _ = _queue(limit=1000)
    _stage(queue, model)
    model.pending = 3  # dropped by another worker's check
    # Until the time limit, this worker does not know; then it asks again,
    # and asks for every event while dropped events wait.
    _stage(queue, model, 5)
    assert model.queries == 1
    queue._monotonic.now += iq._RECHECK_S + 0.1
    before = model.queries
    _stage(queue, model, 5)
    assert model.queries == before + 5


def test_processing_while_partial_needs_no_check():
    queue, model, _ = _queue(limit=1000)
    _stage(queue, model)
    before = model.queries
    for _ in range(10):
        assert run(queue.may_prune(ROOM)) is False
    assert model.queries == before


def test_after_the_resync_every_processed_event_is_checked_until_synapse_takes_over():
    queue, model, _ = _queue(limit=1000)
    _stage(queue, model, 150)
    model.partial = False
    before = model.queries
    assert run(queue.may_prune(ROOM)) is False  # 150 queued: the module keeps it
    assert model.queries == before + 1
    model.staged = 10
    assert run(queue.may_prune(ROOM)) is True  # drained: Synapse's pruning again
    assert ROOM not in queue._protected
    assert ROOM not in queue._headroom


def test_without_a_bound_only_time_asks_again():
    queue, model, clock = _queue(limit=0)
    _stage(queue, model, 300)
    assert model.queries == 1
    clock.now += iq._RECHECK_S + 0.1
    _stage(queue, model)
    assert model.queries == 2


def test_a_check_that_finished_after_a_newer_one_is_not_kept():
    queue, model, _ = _queue(limit=1000)
    model.gates = [defer.Deferred()]  # (a marker: queries wait)
    # Two checks in flight; the older one's answer (fewer events) comes last.
    older = defer.ensureDeferred(queue._check_bound(ROOM))
    newer = defer.ensureDeferred(queue._check_bound(ROOM))
    _, older_gate, newer_gate = model.gates
    newer_gate.callback(7)
    assert newer.called and queue._headroom[ROOM].staged == 7
    older_gate.callback(3)
    assert older.called and queue._headroom[ROOM].staged == 7


def test_a_partial_join_keeps_the_queue_past_the_resync_even_if_it_stayed_short():
    """The live traffic of a resync's last seconds arrives while the join's
    after-work slows the room's processing: a queue that stayed short while
    partial can pass Synapse's prune threshold just after (a benchmark run
    lost 90 live events that way: Synapse pruned 101 and fetched back ten)."""
    queue, model, clock = _queue(limit=1000)
    queue.partial_join(ROOM)
    model.partial = False
    queue.resync_complete(ROOM)
    model.staged = iq.PRUNE_THRESHOLD + 50
    assert run(queue.may_prune(ROOM)) is False
    # Drained, but still within the time kept after the resync.
    model.staged = 10
    assert run(queue.may_prune(ROOM)) is False
    model.staged = iq.PRUNE_THRESHOLD + 50
    assert run(queue.may_prune(ROOM)) is False
    # Past it, and drained: Synapse's own handling again.
    clock.now += iq._KEEP_AFTER_RESYNC_S + 1
    assert run(queue.may_prune(ROOM)) is False  # (still 150 queued)
    model.staged = 10
    assert run(queue.may_prune(ROOM)) is True
    assert ROOM not in queue._protected
    assert run(queue.may_prune(ROOM)) is True


def test_the_bound_still_holds_while_kept_after_the_resync():
    queue, model, _ = _queue(limit=200)
    queue.partial_join(ROOM)
    model.partial = False
    queue.resync_complete(ROOM)
    for _ in range(500):
        _stage(queue, model)
    assert model.staged <= 200
    assert model.staged + model.pending == 500


def test_a_worker_that_did_not_run_the_resync_keeps_the_queue_by_the_history():
    # Another process ran the resync and recorded its end 100 s ago: this one
    # never saw the room partial, and keeps its queue for the 200 s left.
    queue, model, clock = _queue(limit=1000)
    model.partial = False
    model.finished_ms = iq._now_ms() - 100_000
    model.staged = 150
    assert run(queue.may_prune(ROOM)) is False
    assert model.history_reads == 1
    clock.now += 150
    assert run(queue.may_prune(ROOM)) is False
    # Past the 5 minutes, once drained below Synapse's threshold: Synapse's again.
    clock.now += 60
    model.staged = 50
    assert run(queue.may_prune(ROOM)) is True


def test_a_room_with_no_recent_resync_is_pruned_and_the_history_read_once_a_minute():
    queue, model, clock = _queue(limit=1000)
    model.partial = False
    model.finished_ms = iq._now_ms() - 400_000  # ended before the 5 minutes
    model.staged = 150
    assert run(queue.may_prune(ROOM)) is True
    assert run(queue.may_prune(ROOM)) is True
    assert model.history_reads == 1
    clock.now += iq._HISTORY_RECHECK_S
    assert run(queue.may_prune(ROOM)) is True
    assert model.history_reads == 2
    model.finished_ms = None  # never resynced by the module
    clock.now += iq._HISTORY_RECHECK_S
    assert run(queue.may_prune(ROOM)) is True
