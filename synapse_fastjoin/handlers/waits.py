"""Bounded waits for full state (patch 0007 hands Synapse's waits here).

Synapse makes a request that needs a partial-state room's full state (`/members`,
`/joined_members`, a remote member's state event, ...) wait until the resync
ends, however long that is (upstream #13000, #14587). Here a client request
that is still waiting after `client_wait_timeout_seconds` gets an error instead:

    HTTP 403
    {"errcode": "ORG.MATRIX.MSC3895_UNABLE_DUE_TO_PARTIAL_STATE",
     "error": "...", "room_id": "!...", "resync_phase": "fetching_state",
     "retry_after_ms": 5000}

Waits that are not part of a client request (background work, federation) are
left unbounded, as Synapse needs them to complete. When an admin aborts a
resync, every wait on the room ends at once with the same errcode and
`resync_phase: "aborted"`.
"""

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Collection

from twisted.internet import defer

from synapse.api.errors import SynapseError
from synapse.logging.context import (
    PreserveLoggingContext,
    current_context,
    make_deferred_yieldable,
)
from synapse.util.duration import Duration

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

ERRCODE = "ORG.MATRIX.MSC3895_UNABLE_DUE_TO_PARTIAL_STATE"
PHASE_ABORTED = "aborted"

# Requests under these paths are bounded: the client-server API, and Synapse's
# own (admin and client) APIs.
_BOUNDED_PREFIXES = ("/_matrix/client/", "/_synapse/")

# Suggested delay before asking again when the resync is not waiting to retry.
DEFAULT_RETRY_AFTER_MS = 5000

LiveProgress = Callable[[str], "dict[str, Any] | None"]


def partial_state_error(
    room_id: str, phase: str, retry_after_ms: int | None, message: str
) -> SynapseError:
    fields: dict[str, Any] = {"room_id": room_id, "resync_phase": phase}
    if retry_after_ms is not None:
        fields["retry_after_ms"] = retry_after_ms
    return SynapseError(403, message, ERRCODE, additional_fields=fields)


def retry_after_ms(progress: "dict[str, Any] | None", now_ms: int) -> int:
    """When to ask again: at the engine's next attempt if it waits to retry."""
    next_ts = (progress or {}).get("next_retry_ts")
    if isinstance(next_ts, int) and next_ts > now_ms:
        return next_ts - now_ms + 1000
    return DEFAULT_RETRY_AFTER_MS


def _in_bounded_request() -> bool:
    request = getattr(current_context(), "request", None)
    url = getattr(request, "url", None) or ""
    return url.startswith(_BOUNDED_PREFIXES)


class FullStateWaits:
    """The module's `await_full_state` callback, and the abort of waits.

    Args:
        hs: the homeserver.
        timeout_seconds: bound of a client request's wait; 0: no bound.
        live_progress: the engine's live progress of a room, if it runs here.
    """

    def __init__(
        self, hs: "HomeServer", timeout_seconds: int, live_progress: LiveProgress
    ) -> None:
        self._clock = hs.get_clock()
        self._main = hs.get_datastores().main
        self._timeout = timeout_seconds
        self._live_progress = live_progress
        self._waiting: dict[str, set["defer.Deferred[None]"]] = {}
        self._aborting: set[str] = set()

    async def await_full_state(
        self,
        waiter: "defer.Deferred[None]",
        room_id: str | None,
        event_ids: Collection[str],
    ) -> None:
        """Wait for `waiter` (which fires in the sentinel context) unless the
        wait is bounded and runs out, or the room's resync is aborted."""
        bounded = self._timeout > 0 and _in_bounded_request()
        if room_id is None:
            room_id = await self._room_of(event_ids)
        if room_id is None:
            # The events are no longer partial (they were done meanwhile).
            await make_deferred_yieldable(waiter)
            return
        if room_id in self._aborting:
            raise self._aborted_error(room_id)
        result: "defer.Deferred[None]" = defer.Deferred()

        def ready(outcome: Any) -> Any:
            if not result.called:
                result.callback(None)
            return outcome

        def expire() -> None:
            if not result.called:
                result.errback(self._timeout_error(room_id))

        waiter.addBoth(ready)
        waiting = self._waiting.setdefault(room_id, set())
        waiting.add(result)
        timer = None
        if bounded:
            timer = self._clock.call_later(Duration(seconds=self._timeout), expire)
        try:
            await make_deferred_yieldable(result)
        finally:
            if timer is not None and timer.active():
                timer.cancel()
            waiting.discard(result)
            if not waiting and self._waiting.get(room_id) is waiting:
                del self._waiting[room_id]

    def waiting(self, room_id: str) -> int:
        """How many waits on `room_id` are under way."""
        return len(self._waiting.get(room_id, ()))

    def abort(self, room_id: str) -> int:
        """End every wait on `room_id` with an error now, and any that starts
        until `aborted` is called. Returns how many waits were ended."""
        self._aborting.add(room_id)
        waiting = list(self._waiting.pop(room_id, ()))
        with PreserveLoggingContext():
            for result in waiting:
                if not result.called:
                    result.errback(self._aborted_error(room_id))
        if waiting:
            logger.info("Abort of %s: %d waiting requests answered", room_id, len(waiting))
        return len(waiting)

    def aborted(self, room_id: str) -> None:
        """The abort of `room_id` is over: the room is no longer partial."""
        self._aborting.discard(room_id)

    async def _room_of(self, event_ids: Collection[str]) -> str | None:
        rows = await self._main.db_pool.simple_select_many_batch(
            table="partial_state_events",
            column="event_id",
            iterable=list(event_ids)[:50],
            retcols=("room_id",),
            desc="fastjoin_partial_state_event_rooms",
        )
        return rows[0][0] if rows else None

    def _phase(self, room_id: str) -> tuple[str, "dict[str, Any] | None"]:
        progress = self._live_progress(room_id)
        return (progress or {}).get("phase") or "not_running", progress

    def _timeout_error(self, room_id: str) -> SynapseError:
        phase, progress = self._phase(room_id)
        logger.info(
            "A request waited %d s for the full state of %s (resync phase %s): answered 403",
            self._timeout,
            room_id,
            phase,
        )
        return partial_state_error(
            room_id,
            phase,
            retry_after_ms(progress, int(time.time() * 1000)),
            f"The server is still fetching the full state of {room_id} (it joined "
            f"in partial state); resync phase: {phase}. Try again later.",
        )

    def _aborted_error(self, room_id: str) -> SynapseError:
        return partial_state_error(
            room_id,
            PHASE_ABORTED,
            None,
            f"A server admin aborted the resync of {room_id}: the server left the "
            "room without its full state.",
        )
