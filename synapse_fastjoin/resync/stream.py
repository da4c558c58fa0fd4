"""Reading a `/state` response as a stream of events, with bounded memory.

Synapse reads the whole `/state` body (capped at 500 MiB) and builds every
event before doing anything with them. Here the body is parsed as it arrives:
complete items of `pdus` and `auth_chain` are handed on in chunks, and the
connection is paused while the consumer is behind, so at most a few chunks
are ever held. Nothing limits the total size of the response; instead a
response is cut off as hostile when it stops looking like the state we were
promised:

- a single item longer than `max_item_bytes` (events are at most 64 KiB),
- more items than `max_items` (the promised events, with some slack),
- more items that are not promised events than `max_unwanted`,
- no data for `idle_timeout` seconds.
"""

import logging
from typing import Any, Callable

import ijson
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

logger = logging.getLogger(__name__)


class StreamAborted(Exception):
    """The response was cut off, by us (hostile or stalled) or by the peer."""


class StateBodyReader(Protocol):
    """Receives a `/state` body and calls `on_chunk(list_of_event_dicts)`.

    `on_chunk` returns a Deferred that fires once the chunk has been taken in;
    while `max_pending` chunks are outstanding the transport is paused.
    `done` fires with the number of items once the body ended, or fails with
    StreamAborted.
    """

    def __init__(
        self,
        on_chunk: Callable[[list[dict[str, Any]]], "defer.Deferred[None]"],
        reactor: IReactorTime,
        chunk_size: int,
        max_items: int,
        max_item_bytes: int = 256 * 1024,
        max_pending: int = 3,
        idle_timeout: float = 120.0,
        on_data: Callable[[int, int], None] | None = None,
    ) -> None:
        self._on_chunk = on_chunk
        self._reactor = reactor
        self._chunk_size = chunk_size
        self._max_items = max_items
        self._max_item_bytes = max_item_bytes
        self._max_pending = max_pending
        self._idle_timeout = idle_timeout
        self._on_data = on_data
        """Told (items completed, bytes) as data arrives: progress that moves."""
        self.done: "defer.Deferred[int]" = defer.Deferred()
        self.items = 0
        self.bytes = 0
        self.unwanted = 0
        """Counted by the consumer: items that were not promised events."""
        self._bytes_since_item = 0
        self._buffer: list[dict[str, Any]] = []
        self._pending = 0
        self._paused = False
        self._finished = False
        self._idle: IDelayedCall | None = None
        # Two C-level item parsers over the same bytes: the state, then the
        # auth chain (ijson's items parser follows one prefix).
        #
        # Numbers: not `use_float=True` (what Synapse's own /state parser
        # uses): with it, yajl fails the whole body on one integer beyond 64
        # bits or one float beyond a double's range, so a single hostile event
        # would cost every other one. Without it integers come as ints of any
        # size and other numbers as Decimals, which `checks.check_chunk` judges
        # exactly as Synapse judges what its standard-library JSON parser made
        # of them on `/send` and `/event` (refused under strict canonical
        # JSON, floats otherwise).
        self._parsers = [
            ijson.items_coro(_Collector(self._buffer), prefix, use_float=False)
            for prefix in ("pdus.item", "auth_chain.item")
        ]

    # Protocol

    def connectionMade(self) -> None:  # noqa: N802
        self._arm_idle_timer()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._finished:
            return
        self._arm_idle_timer()
        self.bytes += len(data)
        before = len(self._buffer)
        try:
            for parser in self._parsers:
                parser.send(data)
        except Exception as e:
            self._abort(f"the body is not valid JSON: {e}")
            return
        completed = len(self._buffer) - before
        if self._on_data is not None:
            self._on_data(completed, len(data))
        if completed:
            self.items += completed
            self._bytes_since_item = 0
        else:
            self._bytes_since_item += len(data)
        if self._bytes_since_item > self._max_item_bytes:
            self._abort(
                f"no complete event in the last {self._bytes_since_item} bytes "
                f"(events are at most 64 KiB)"
            )
            return
        if self.items > self._max_items:
            self._abort(f"more than {self._max_items} events in the body")
            return
        while len(self._buffer) >= self._chunk_size:
            self._emit(self._buffer[: self._chunk_size])
            del self._buffer[: self._chunk_size]

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: N802,B008
        self._cancel_idle_timer()
        if self._finished:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            try:
                for parser in self._parsers:
                    parser.close()
            except Exception as e:
                # The events that arrived whole are as good as any: hand them
                # on before failing, so the next round need not fetch them.
                self._emit_rest()
                self._fail(StreamAborted(f"the body ended early or is not valid JSON: {e}"))
                return
            if self._buffer:
                self._emit(list(self._buffer))
                self._buffer.clear()
            self._finished = True
            self.done.callback(self.items)
        else:
            self._emit_rest()
            self._fail(
                StreamAborted(f"connection lost after {self.bytes} bytes: {reason.getErrorMessage()}")
            )

    def _emit_rest(self) -> None:
        """Hand on the complete items still buffered (the body broke off: the
        peer's fault or the network's, not a sign that they are hostile)."""
        if self._buffer:
            self._emit(list(self._buffer))
            self._buffer.clear()

    # Called by the consumer.

    def reject(self, why: str) -> None:
        """The consumer found the stream hostile: stop reading it."""
        self._abort(why)

    # Internals

    def _emit(self, chunk: list[dict[str, Any]]) -> None:
        self._pending += 1
        if self._pending >= self._max_pending:
            self._pause()
        d = self._on_chunk(chunk)
        d.addBoth(self._chunk_taken)

    def _chunk_taken(self, result: Any) -> Any:
        self._pending -= 1
        if isinstance(result, Failure):
            self._abort(f"processing failed: {result.getErrorMessage()}")
            return None
        if self._pending < self._max_pending:
            self._resume()
        return None

    def _pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self._cancel_idle_timer()
            self.transport.pauseProducing()

    def _resume(self) -> None:
        if self._paused and self.transport is not None and not self._finished:
            self._paused = False
            self._arm_idle_timer()
            self.transport.resumeProducing()

    def _abort(self, why: str) -> None:
        if self._finished:
            return
        self._fail(StreamAborted(why))
        if self.transport is not None:
            if self._paused:
                self.transport.resumeProducing()
            self.transport.stopProducing()

    def _fail(self, error: Exception) -> None:
        if self._finished:
            return
        self._finished = True
        self._cancel_idle_timer()
        self._buffer.clear()
        self.done.errback(Failure(error))

    def _arm_idle_timer(self) -> None:
        if self._paused or self._finished:
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idle_timeout)
        else:
            self._idle = self._reactor.callLater(self._idle_timeout, self._on_idle)

    def _cancel_idle_timer(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _on_idle(self) -> None:
        self._idle = None
        self._abort(f"no data for {self._idle_timeout:.0f} s")


class _Collector:
    """The target of an ijson coroutine: appends each complete item."""

    def __init__(self, into: list[dict[str, Any]]) -> None:
        self._into = into

    def send(self, item: Any) -> None:
        if isinstance(item, dict):
            self._into.append(item)
        else:
            # Not an event; keep the count honest so the caller's limits apply.
            self._into.append({"__not_an_object__": True})

    def close(self) -> None:
        pass
