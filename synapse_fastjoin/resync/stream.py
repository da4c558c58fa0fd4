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

import codecs
import json
import logging
import re
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from synapse.util.json import json_decoder

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
        # One pass over the body (see `_ItemParser`).
        self._parser = _ItemParser(self._buffer, ("pdus", "auth_chain"))

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
            self._parser.send(data)
        except ValueError as e:
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
                self._parser.close()
            except ValueError as e:
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


_WHITESPACE = re.compile(r"[ \t\n\r]*")
# What the end of the data may hold of a token that is not finished yet (a
# literal, a number, a \\u escape): an error there may be only a cut.
_UNFINISHED_TOKEN = re.compile(r"[-+0-9.eEtrunlsfa-dA-F\\]*\Z")


class _ItemParser:
    """Reads a JSON object as it arrives and appends each item of its arrays
    under `keys` to `into`, in one pass over the bytes.

    The items are parsed by the standard library's C decoder with Synapse's
    own settings (`synapse.util.json.json_decoder`: what Synapse's `/send`
    and `/event` paths parse a PDU with), so numbers are exactly what Synapse
    makes of the same text there: integers of any size as ints, anything
    else as floats, NaN and Infinity refused. Only the structure around the
    items (a few characters per item) is walked in Python.

    An item that is not complete yet is parsed again when more data comes
    (the reader bounds how much may arrive without completing one). Raises
    ValueError for a body that cannot be JSON, or not UTF-8.
    """

    def __init__(self, into: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
        self._into = into
        self._keys = keys
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._text = ""
        self._pos = 0
        self._state = "start"
        self._key: str | None = None

    def send(self, data: bytes) -> None:
        try:
            text = self._decoder.decode(data)
        except UnicodeDecodeError as e:
            raise ValueError(f"not UTF-8: {e}") from None
        self._text = self._text[self._pos :] + text if self._pos else self._text + text
        self._pos = 0
        self._run(final=False)

    def close(self) -> None:
        try:
            self._text = self._text[self._pos :] + self._decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise ValueError(f"not UTF-8: {e}") from None
        self._pos = 0
        self._run(final=True)
        if self._state != "done":
            raise ValueError("the body ended before the JSON object did")

    def _value(self, final: bool) -> tuple[Any, bool]:
        """Parse the value at the current position: (value, True), or
        (None, False) if it is not complete yet."""
        text, pos = self._text, self._pos
        try:
            value, end = json_decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            if not final and (
                e.msg.startswith("Unterminated string")
                or (e.pos >= len(text) - 8 and _UNFINISHED_TOKEN.match(text, e.pos))
            ):
                return None, False
            raise ValueError(f"{e.msg} at byte {e.pos}") from None
        except ValueError as e:  # NaN or Infinity (Synapse's decoder refuses them)
            raise ValueError(str(e)) from None
        if end == len(text) and not final and not isinstance(value, (dict, list, str)):
            # A number may go on in the next piece of data.
            return None, False
        self._pos = end
        return value, True

    def _run(self, final: bool) -> None:
        text = self._text
        while True:
            self._pos = _WHITESPACE.match(text, self._pos).end()  # type: ignore[union-attr]
            if self._pos >= len(text):
                return
            c = text[self._pos]
            state = self._state
            if state == "start":
                if c != "{":
                    raise ValueError("the body is not a JSON object")
                self._pos += 1
                self._state = "key_or_end"
            elif state in ("key_or_end", "key"):
                if c == "}" and state == "key_or_end":
                    self._pos += 1
                    self._state = "done"
                    continue
                if c != '"':
                    raise ValueError(f"expected a key at {c!r}")
                key, complete = self._value(final)
                if not complete:
                    return
                self._key = key
                self._state = "colon"
            elif state == "colon":
                if c != ":":
                    raise ValueError(f"expected ':' at {c!r}")
                self._pos += 1
                self._state = "value"
            elif state == "value":
                if c == "[" and self._key in self._keys:
                    self._pos += 1
                    self._state = "item_or_end"
                    continue
                _, complete = self._value(final)  # anything else is skipped
                if not complete:
                    return
                self._state = "after_value"
            elif state in ("item_or_end", "item"):
                if c == "]" and state == "item_or_end":
                    self._pos += 1
                    self._state = "after_value"
                    continue
                item, complete = self._value(final)
                if not complete:
                    return
                # Not an event: counted all the same, so the reader's limits apply.
                self._into.append(item if isinstance(item, dict) else {"__not_an_object__": True})
                self._state = "after_item"
            elif state == "after_item":
                if c not in ",]":
                    raise ValueError(f"expected ',' or ']' at {c!r}")
                self._pos += 1
                self._state = "item" if c == "," else "after_value"
            elif state == "after_value":
                if c not in ",}":
                    raise ValueError(f"expected ',' or '}}' at {c!r}")
                self._pos += 1
                self._state = "key" if c == "," else "done"
            else:  # done: only whitespace may follow
                raise ValueError(f"data after the end of the object at {c!r}")
