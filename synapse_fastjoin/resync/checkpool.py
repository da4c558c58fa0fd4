"""Check processes: the signature, hash and event-building work of a big fetch
on other cores.

In threads, the checks share the reactor's GIL with everything else the
server does (ed25519 verification releases it; building events, canonical
JSON and hashing do not), so on a big room they compete with the database
writes and the HTTP parsing for one core. A check process
(`resync.checkworker`, started with the server's own Python) runs the same
`event_from_pdu_json` and `_check_sigs_and_hash` code on its own core and
hands back each verdict with the event's canonical JSON; the parent builds
the event from it (`checks.collect_worker_verdicts`).

The processes start when a fetch is big enough to gain from them
(`resync.check_process_min_events`), are used once ready (until then, and
whenever one is unavailable, the checks run in threads as before), and stop
after a minute without work, or a few seconds after the last fetch that holds
them (`CheckPool.holding`) has ended: each process holds about 100 MB that the
resync's end steps (the join's state group, the current state) have better
use for. A process that dies fails its pending requests;
their chunks are checked again in threads, and the pool is not used again
until the server restarts (logged as a warning).
"""

import logging
import pickle
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorProcess, IReactorTime

from synapse_fastjoin.resync.checkworker import _HEADER

logger = logging.getLogger(__name__)

_IDLE_SECONDS = 60.0
# After the last holder lets go: long enough for its last answers to arrive.
_RELEASED_SECONDS = 2.0
_STDERR_LINES = 20  # per process, to the log


class CheckProcessFailed(Exception):
    """A check process could not answer (it died, or raised)."""


class _Worker(protocol.ProcessProtocol):
    def __init__(self, pool: "CheckPool", index: int) -> None:
        self._pool = pool
        self.index = index
        self.ready = False
        self.dead = False
        self.closing = False
        """Stopped on purpose (idle, or the server shutting down)."""
        self.pid: int | None = None
        self._buffer = bytearray()
        self._pending: dict[int, "defer.Deferred[Any]"] = {}
        self._stderr_lines = 0

    @property
    def load(self) -> int:
        return len(self._pending)

    def send(self, request_id: int, payload: tuple[Any, ...]) -> "defer.Deferred[Any]":
        d: "defer.Deferred[Any]" = defer.Deferred()
        self._pending[request_id] = d
        data = pickle.dumps((request_id, *payload), protocol=pickle.HIGHEST_PROTOCOL)
        assert self.transport is not None
        self.transport.write(_HEADER.pack(len(data)) + data)
        return d

    def childDataReceived(self, fd: int, data: bytes) -> None:  # noqa: N802
        if fd == 2:
            if self._stderr_lines < _STDERR_LINES:
                for line in data.decode("utf-8", "replace").splitlines():
                    self._stderr_lines += 1
                    logger.warning("Check process %s: %s", self.pid, line)
            return
        self._buffer += data
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if len(self._buffer) < _HEADER.size + length:
                return
            frame = bytes(self._buffer[_HEADER.size : _HEADER.size + length])
            del self._buffer[: _HEADER.size + length]
            self._frame(pickle.loads(frame))

    def _frame(self, frame: tuple[Any, ...]) -> None:
        request_id, status, value = frame
        if status == "ready":
            self.ready = True
            self.pid = value
            logger.info("Check process %d ready (pid %s)", self.index, value)
            return
        d = self._pending.pop(request_id, None)
        if d is None:
            return
        if status == "ok":
            d.callback(value)
        else:
            d.errback(CheckProcessFailed(str(value)))

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        self.dead = True
        pending, self._pending = self._pending, {}
        if not self.closing:
            logger.warning(
                "Check process %d (pid %s) ended: %s; checks go on in threads",
                self.index, self.pid, reason.getErrorMessage(),
            )
        # The pool first, so that whoever a failure wakes sees it off.
        self._pool.ended(self)
        for d in pending.values():
            d.errback(CheckProcessFailed(f"the check process ended: {reason.getErrorMessage()}"))


class CheckPool:
    """Up to `processes` check processes, started on demand."""

    def __init__(self, reactor: Any, processes: int) -> None:
        self._reactor = reactor
        self._size = processes
        self._workers: list[_Worker] = []
        self._next_id = 1
        self._idle_call: Any = None
        self._broken = False
        self._holders = 0
        self.requests = 0
        """Chunks answered by a check process (for the tests and the logs)."""

    @property
    def enabled(self) -> bool:
        return self._size > 0 and not self._broken and IReactorProcess.providedBy(self._reactor)

    def ready(self) -> bool:
        """Whether a check process can take a chunk now."""
        return self.enabled and any(w.ready and not w.dead for w in self._workers)

    def warm_up(self) -> None:
        """Start the processes (if not running): they take a second or two to
        import Synapse, so a fetch asks for them as soon as it knows it is big."""
        if not self.enabled:
            return
        self._touch()
        while len(self._workers) < self._size:
            worker = _Worker(self, len(self._workers))
            try:
                self._reactor.spawnProcess(
                    worker,
                    sys.executable,
                    [sys.executable, "-m", "synapse_fastjoin.resync.checkworker"],
                    env=None,
                    childFDs={0: "w", 1: "r", 2: "r"},
                )
            except Exception as e:
                logger.warning("Could not start a check process (%s); checks run in threads", e)
                self._broken = True
                return
            self._workers.append(worker)

    @contextmanager
    def holding(self) -> Iterator[None]:
        """While a fetch that may use the processes runs: on leaving, if no
        other fetch holds the pool, the processes stop once idle for
        `_RELEASED_SECONDS` rather than a minute."""
        self._holders += 1
        try:
            yield
        finally:
            self._holders -= 1
            if self._holders == 0 and self._workers:
                self._touch(_RELEASED_SECONDS)

    def check(self, *payload: Any) -> "defer.Deferred[Any]":
        """Hand a chunk to the least busy ready process. Call only when
        `ready()`; fails with CheckProcessFailed if the process cannot answer."""
        self._touch()
        worker = min((w for w in self._workers if w.ready and not w.dead), key=lambda w: w.load)
        request_id = self._next_id
        self._next_id += 1

        def counted(value: Any) -> Any:
            self.requests += 1
            return value

        return worker.send(request_id, payload).addCallback(counted)

    def ended(self, worker: _Worker) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
        if not worker.closing:
            # Something is wrong with running them here: do not start more.
            self._broken = True

    def stop(self) -> None:
        """Close the processes' stdin: they exit once their current chunk is
        done (its answer is still delivered)."""
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        for worker in self._workers:
            worker.closing = True
            if worker.transport is not None and not worker.dead:
                worker.transport.closeStdin()
        self._workers = []

    def _touch(self, seconds: float = _IDLE_SECONDS) -> None:
        """(Re)schedule the idle stop `seconds` from now."""
        reactor: IReactorTime = self._reactor
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(seconds)
        else:
            self._idle_call = reactor.callLater(seconds, self._idle)

    def _idle(self) -> None:
        self._idle_call = None
        if any(w.load for w in self._workers):
            self._touch(_IDLE_SECONDS if self._holders else _RELEASED_SECONDS)
            return
        if self._workers:
            logger.info("Stopping %d idle check processes", len(self._workers))
        self.stop()
