"""What a running resync is doing, for the admin API and the logs."""

import time
from typing import Any

import attr

from synapse_fastjoin.util import format_duration

# Phases, in the order a resync normally goes through them.
PHASE_STARTING = "starting"
PHASE_STATE_IDS = "fetching_state_ids"
PHASE_STATE = "fetching_state"
PHASE_EVENTS = "fetching_events"
PHASE_RESOLVING = "resolving_join_state"
PHASE_CATCHUP = "catching_up"
PHASE_FINISHING = "finishing"
PHASE_WAITING = "waiting_to_retry"
PHASE_DONE = "done"


def _now_ms() -> int:
    return int(time.time() * 1000)


# Fields kept for the logs and the metrics only: not in `as_json` (the admin
# API and the checkpoint).
_INTERNAL = {"internal": True}


class RateTracker:
    """Events per second between two progress lines, smoothed, for the rate
    and ETA of the progress line."""

    def __init__(self) -> None:
        self._last: tuple[float, int] | None = None
        self._key: tuple[str, int] | None = None
        self._base = 0
        self.rate: float | None = None
        """Smoothed events per second (None until two samples of a stage)."""
        self.stalled = False
        """Nothing was done between the last two samples."""

    def update(self, key: tuple[str, int], done: int, now: float | None = None) -> int:
        """Record that `done` events are done in the stage `key`; returns how
        many of them were done since the stage began (a new `/state_ids`
        round, or catch-up, starts a new stage and resets the rate)."""
        now = time.monotonic() if now is None else now
        if key != self._key:
            # A new stage: what was done before it does not count towards it.
            self._base = done if self._key is not None else 0
            self._key = key
            self._last = None
            self.rate = None
            self.stalled = False
        if self._last is not None and now > self._last[0]:
            current = (done - self._last[1]) / (now - self._last[0])
            self.stalled = current <= 0
            # Smooth over about three intervals, so one slow batch does not
            # swing the ETA.
            self.rate = current if self.rate is None else 0.5 * self.rate + 0.5 * current
        self._last = (now, done)
        return done - self._base


@attr.s(slots=True, auto_attribs=True)
class ResyncProgress:
    """Counters of one room's resync. Mutated by the engine on the reactor
    thread; read by the admin API and the progress logger."""

    room_id: str
    started_ts: int = attr.Factory(_now_ms)
    phase: str = PHASE_STARTING
    phase_ts: int = attr.Factory(_now_ms)
    destination: str | None = None
    servers_known: int = 0
    # The state at the join.
    expected: int = 0
    """Events /state_ids promised that were not stored yet when it was asked."""
    already_stored: int = 0
    fetched: int = 0
    """Events received (raw, before any check)."""
    checked: int = 0
    """Events that passed the signature, hash and identity checks."""
    persisted: int = 0
    rejected: int = 0
    """Persisted but rejected by the auth rules."""
    redacted: int = 0
    unwanted: int = 0
    bad_signatures: int = 0
    unavailable: int = 0
    """Promised events no server would serve; left out as Synapse does."""
    park_dropped: int = 0
    """Events dropped because more than `resync.park_limit` waited for their
    auth events (fetched again in a later round)."""
    bytes_received: int = 0
    # Catch-up of events that arrived while partial.
    catchup_done: int = 0
    catchup_remaining: int | None = None
    catchup_seconds: float = 0.0
    """Time spent in batched catch-up (events that arrived while partial)."""
    yielded_seconds: float = 0.0
    """Time the resync's writes waited for the rest of the server's
    transactions on a single database connection (SQLite;
    storage/connection_share.py)."""
    slot_wait_seconds: float = 0.0
    """Time the resync's writes (with the bulk writer) waited for the room's
    slot in Synapse's event persistence queue, held meanwhile by Synapse's
    persistence of other events of the room (live events, auth chains)."""
    # Failures.
    retries: int = 0
    last_error: str | None = None
    next_retry_ts: int | None = None
    # For the metrics and logs only (see _INTERNAL).
    retries_before: int = attr.ib(default=0, metadata=_INTERNAL)
    """Retries counted before this process took the resync over (checkpoint)."""
    failures: dict[str, int] = attr.ib(factory=dict, metadata=_INTERNAL)
    """Failed attempts of this run, by reason (the error's type)."""
    last_failure_reason: str | None = attr.ib(default=None, metadata=_INTERNAL)
    rate: RateTracker = attr.ib(factory=RateTracker, metadata=_INTERNAL, eq=False, repr=False)

    def set_phase(self, phase: str) -> None:
        if phase != self.phase:
            self.phase = phase
            self.phase_ts = _now_ms()

    def count_failure(self, error: BaseException) -> str:
        """Count a failed attempt by its reason: the error's type, or for an
        error that wraps another (every server failed), the wrapped one's.
        Returns the reason."""
        cause = error.__cause__
        reason = type(cause if cause is not None else error).__name__
        self.failures[reason] = self.failures.get(reason, 0) + 1
        self.last_failure_reason = reason
        return reason

    def as_json(self) -> dict[str, Any]:
        return attr.asdict(self, filter=lambda a, _: not a.metadata.get("internal"))

    def summary(self) -> str:
        """The progress line: what is done, how fast, and how long is left.
        Call it once per progress line (it measures the rate between calls)."""
        parts = [f"phase={self.phase}"]
        if self.destination:
            parts.append(f"via={self.destination}")
        if self.expected:
            parts.append(
                f"state {self.persisted}/{self.expected} persisted"
                f" (fetched {self.fetched}, checked {self.checked},"
                f" rejected {self.rejected}, redacted {self.redacted})"
            )
        if self.catchup_remaining is not None:
            parts.append(f"catch-up {self.catchup_done} done, {self.catchup_remaining} left")
        parts.extend(self._rate_and_eta())
        if self.yielded_seconds >= 0.1:
            parts.append(f"gave the database connection to other work for {self.yielded_seconds:.1f} s")
        if self.slot_wait_seconds >= 0.1:
            parts.append(f"waited {self.slot_wait_seconds:.1f} s for the room's persistence queue")
        if self.bad_signatures:
            parts.append(f"bad_signatures={self.bad_signatures}")
        if self.retries:
            parts.append(f"retries={self.retries} last_error={self.last_error!r}")
        return ", ".join(parts)

    def _rate_and_eta(self) -> list[str]:
        if self.phase in (PHASE_CATCHUP, PHASE_FINISHING) and self.catchup_remaining is not None:
            self.rate.update(("catchup", 0), self.catchup_done)
            left = self.catchup_remaining
        elif self.expected:
            # `expected` is set anew by each /state_ids round: a new stage.
            in_round = self.rate.update(("state", self.expected), self.persisted)
            left = max(0, self.expected - in_round)
        else:
            return []
        rate = self.rate.rate
        if rate is None or self.phase in (PHASE_WAITING, PHASE_DONE):
            return []
        if not left and (rate <= 0 or self.rate.stalled):
            return []  # nothing left, nothing moving: no rate to give
        if rate <= 0 or (self.rate.stalled and left):
            return ["rate 0 events/s" + (", stalled" if left else "")]
        out = [f"rate {rate:.0f} events/s"]
        if left:
            out.append(f"ETA {format_duration(left / rate)}")
        return out
