"""An admin's retry is never lost (engine `_RoomResync.wake` and
`_sleep_unless_woken`): the admin API shows `waiting_to_retry` as soon as a
failure is recorded, before the engine starts its sleep (it checkpoints
first); a retry asked in between used to find no sleep to wake, and the
resync slept out its whole backoff (seen in CI under load)."""

from typing import Any

from twisted.internet import defer

from synapse_fastjoin.resync.engine import _RoomResync


class Timer:
    def __init__(self) -> None:
        self.cancelled = False

    def active(self) -> bool:
        return not self.cancelled

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    def __init__(self) -> None:
        self.timers: list[Timer] = []

    def call_later(self, delay: Any, callback: Any) -> Timer:
        timer = Timer()
        self.timers.append(timer)
        return timer


class Progress:
    servers_known = 0
    phase = "waiting_to_retry"


def _run() -> Any:
    run = _RoomResync.__new__(_RoomResync)
    run._room_id = "!r:x"
    run._clock = Clock()
    run._progress = Progress()
    run._destinations = None
    run._backoff_level = 3
    run._wakeup = None
    run._woken = False
    run._aborted = False
    return run


def test_a_wake_before_the_sleep_starts_is_kept():
    run = _run()
    run._woken = False  # the wait is announced (phase waiting_to_retry) ...
    run.wake([])  # ... the admin retries while the engine checkpoints ...
    d = defer.ensureDeferred(run._sleep_unless_woken(600))
    assert d.called  # ... and the sleep does not happen
    assert run._clock.timers == []
    assert run._backoff_level == 0


def test_a_wake_during_the_sleep_ends_it():
    run = _run()
    d = defer.ensureDeferred(run._sleep_unless_woken(600))
    assert not d.called
    run.wake([])
    assert d.called
    assert run._clock.timers[0].cancelled


def test_a_wake_before_the_wait_was_announced_does_not_skip_the_next_backoff():
    run = _run()
    run.wake([])  # while an attempt runs: that attempt is the retry
    run._woken = False  # the attempt failed: the next wait is announced
    d = defer.ensureDeferred(run._sleep_unless_woken(600))
    assert not d.called
    run.wake([])
    assert d.called
