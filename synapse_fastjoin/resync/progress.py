"""What a running resync is doing, for the admin API and the logs."""

import time
from typing import Any

import attr

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
    bytes_received: int = 0
    # Catch-up of events that arrived while partial.
    catchup_done: int = 0
    catchup_remaining: int | None = None
    catchup_seconds: float = 0.0
    """Time spent in batched catch-up (events that arrived while partial)."""
    # Failures.
    retries: int = 0
    last_error: str | None = None
    next_retry_ts: int | None = None

    def set_phase(self, phase: str) -> None:
        if phase != self.phase:
            self.phase = phase
            self.phase_ts = _now_ms()

    def as_json(self) -> dict[str, Any]:
        return attr.asdict(self)

    def summary(self) -> str:
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
        if self.retries:
            parts.append(f"retries={self.retries} last_error={self.last_error!r}")
        return ", ".join(parts)
