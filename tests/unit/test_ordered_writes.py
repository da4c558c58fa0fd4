"""OrderedWrites (resync/writes.py): batches written one at a time in queue
order while later ones are checked, and what a failed write takes with it."""

from typing import Any

from twisted.internet import defer

from synapse.logging.context import make_deferred_yieldable

from synapse_fastjoin.resync.writes import EarlierWriteFailed, OrderedWrites


class _Writes:
    """Writes that finish when the test says so, recording what ran."""

    def __init__(self, writes: OrderedWrites) -> None:
        self.writes = writes
        self.started: list[str] = []
        self.cleaned: list[str] = []
        self.gates: dict[str, defer.Deferred[None]] = {}
        self.results: dict[str, Any] = {}

    def queue(self, name: str, token: int) -> None:
        gate: defer.Deferred[None] = defer.Deferred()
        self.gates[name] = gate

        async def write() -> None:
            self.started.append(name)
            await make_deferred_yieldable(gate)

        d = self.writes.queue(token, write, lambda: self.cleaned.append(name))
        d.addBoth(lambda r: self.results.__setitem__(name, r))


def _failure_of(result: Any) -> type:
    assert hasattr(result, "type"), result
    result.trap(Exception)
    return result.type


def test_one_at_a_time_in_order() -> None:
    w = _Writes(OrderedWrites())
    for name in ("a", "b", "c"):
        w.queue(name, w.writes.token())
    assert w.started == ["a"]
    w.gates["a"].callback(None)
    assert w.started == ["a", "b"]
    assert w.results == {"a": None}
    w.gates["b"].callback(None)
    w.gates["c"].callback(None)
    assert w.started == ["a", "b", "c"]
    assert w.results == {"a": None, "b": None, "c": None}
    assert w.cleaned == []


def test_failure_abandons_writes_checked_before_it() -> None:
    w = _Writes(OrderedWrites())
    old = w.writes.token()
    w.queue("a", old)
    w.queue("b", old)  # checked while a was unwritten: may rest on it
    w.gates["a"].errback(RuntimeError("database gone"))
    assert _failure_of(w.results["a"]) is RuntimeError
    assert _failure_of(w.results["b"]) is EarlierWriteFailed
    assert w.started == ["a"]  # b never written
    assert w.cleaned == ["a", "b"]


def test_writes_checked_after_a_failure_go_on() -> None:
    w = _Writes(OrderedWrites())
    w.queue("a", w.writes.token())
    w.gates["a"].errback(RuntimeError("database gone"))
    _failure_of(w.results["a"])
    # Checked after the failure was seen: nothing of a counted on.
    w.queue("b", w.writes.token())
    w.gates["b"].callback(None)
    assert w.started == ["a", "b"]
    assert w.results["b"] is None
    assert w.cleaned == ["a"]


def test_a_stale_token_queued_late_is_abandoned() -> None:
    # Checks that began before the failure and are queued after it.
    w = _Writes(OrderedWrites())
    stale = w.writes.token()
    w.queue("a", stale)
    w.gates["a"].errback(RuntimeError("boom"))
    _failure_of(w.results["a"])
    w.queue("b", stale)
    assert _failure_of(w.results["b"]) is EarlierWriteFailed
    assert w.started == ["a"]


def test_wait_all_waits_for_the_last_and_ignores_errors() -> None:
    w = _Writes(OrderedWrites())
    w.queue("a", w.writes.token())
    w.queue("b", w.writes.token())
    waited = defer.ensureDeferred(w.writes.wait_all())
    assert not waited.called
    w.gates["a"].errback(RuntimeError("boom"))
    _failure_of(w.results["a"])
    assert waited.called  # b was abandoned at once
    assert waited.result is None


def test_wait_all_can_be_cancelled() -> None:
    w = _Writes(OrderedWrites())
    w.queue("a", w.writes.token())
    waited = defer.ensureDeferred(w.writes.wait_all())
    waited.cancel()
    failures: list[type] = []
    waited.addErrback(lambda f: failures.append(f.type))
    assert failures == [defer.CancelledError]
    # The write itself goes on.
    w.gates["a"].callback(None)
    assert w.results["a"] is None
