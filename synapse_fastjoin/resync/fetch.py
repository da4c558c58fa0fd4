"""Fetching, checking and persisting the state at a point of a room's DAG.

`StateFetcher.fetch_state_after(prev_event_id)` does what Synapse's
`_get_state_ids_after_missing_prev_event` does (ask `/state_ids`, get the events
we lack, build the state map) without its limits:

- The events are read from a streamed `/state` response in chunks (see
  `stream.StateBodyReader`), or, when only a few are missing, from `/event`
  spread over several servers at once. No whole response is ever held.
- Only events promised by `/state_ids` are accepted (`checks.check_chunk`).
- Signature, hash and event-id checks run in worker threads; the keys they
  need are fetched through Synapse's keyring first.
- Events are auth-checked against their auth events in topological order
  (as Synapse does for outliers) and persisted in batches, as outliers
  (`persist.StatePersister`). An event whose auth events have not arrived
  yet waits (up to `park_limit` of them; past that it is dropped and
  fetched again in a later round, so memory stays bounded however the
  server orders its response).
- A round that fails (a cut connection, a hostile body, an error) loses
  nothing: what was persisted stays, and the next round, from the next
  server, only processes what is still missing.
"""

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from twisted.internet import defer
from twisted.python.threadpool import ThreadPool

from synapse.api.room_versions import RoomVersion
from synapse.logging.context import (
    PreserveLoggingContext,
    current_context,
    defer_to_threadpool,
    make_deferred_yieldable,
    run_in_background,
)
from synapse.storage.databases.main.events_worker import EventRedactBehaviour
from synapse.types import StateMap
from synapse.util.iterutils import batch_iter

from synapse_fastjoin.resync import requests
from synapse_fastjoin.resync.checkpool import CheckPool, CheckProcessFailed
from synapse_fastjoin.resync.checks import (
    check_chunk,
    collect_worker_verdicts,
    raw_keys,
    run_spam_checks,
)
from synapse_fastjoin.resync.event_cache import warn_if_state_outgrows_event_cache
from synapse_fastjoin.resync.keys import SigningKeys
from synapse_fastjoin.resync.policy import FetchPolicy, NoServerAnswered, NotFound
from synapse_fastjoin.resync.progress import (
    PHASE_EVENTS,
    PHASE_STATE,
    PHASE_STATE_IDS,
    ResyncProgress,
)
from synapse_fastjoin.resync.persist import StatePersister, stored_event_ids
from synapse_fastjoin.resync.stream import StateBodyReader

if TYPE_CHECKING:
    from synapse.server import HomeServer

    from synapse_fastjoin.config import ResyncConfig

logger = logging.getLogger(__name__)


class StateFetcher:
    """Fetches the state of one room; one instance per resync run."""

    def __init__(
        self,
        hs: "HomeServer",
        config: "ResyncConfig",
        room_id: str,
        room_version: RoomVersion,
        destinations: FetchPolicy,
        progress: ResyncProgress,
        threadpool: ThreadPool,
        checkpool: CheckPool | None = None,
        live_runs_busy: Callable[[], bool] | None = None,
    ) -> None:
        self._hs = hs
        self._live_runs_busy = live_runs_busy
        self._config = config
        self._room_id = room_id
        self._room_version = room_version
        self._destinations = destinations
        self._progress = progress
        self._threadpool = threadpool
        self._checkpool = checkpool
        self._store = hs.get_datastores().main
        self._clock = hs.get_clock()
        self._reactor = hs.get_reactor()
        self._http = hs.get_federation_http_client()
        self._federation_event_handler = hs.get_federation_event_handler()
        self._keys = SigningKeys(hs, room_id, room_version)
        self._timeout_ms = config.request_timeout_seconds * 1000
        self._key_problem_ids: set[str] = set()
        self._rejected_ids: set[str] = set()
        # Per fetch_state_after call (resync/persist.py).
        self._state: StatePersister | None = None

    @property
    def _s(self) -> StatePersister:
        assert self._state is not None, "only while fetch_state_after runs"
        return self._state

    # The state after one event.

    async def fetch_state_after(self, event_id: str) -> StateMap[str]:
        """The full state after `event_id` (an event we lack as a timeline
        event), with every state and auth event stored locally.

        Raises:
            NoServerAnswered: no server could give us what we need this time.
        """
        self._progress.set_phase(PHASE_STATE_IDS)
        await self._destinations.refresh()
        _, (state_ids, auth_ids) = await self._destinations.race(
            "/state_ids",
            lambda dest: requests.get_state_ids(
                self._http, dest, self._room_id, event_id, self._timeout_ms
            ),
            on_attempt=self._attempting,
        )
        promised = set(state_ids)
        promised.update(auth_ids)
        promised.add(event_id)
        stored = await stored_event_ids(self._store, promised)
        self._state = StatePersister(
            self._hs, self._config, self._room_id, self._progress, promised, stored, self._rejected_ids,
            self._live_runs_busy,
        )
        self._progress.expected = len(self._s.missing)
        self._progress.already_stored = len(stored)
        del stored
        if self._checkpool is not None and len(self._s.missing) >= self._config.check_process_min_events:
            # Ready a second or two later, while the first chunks are checked in threads.
            self._checkpool.warm_up()
        logger.info(
            "Resync of %s: /state_ids at %s lists %d state and %d auth events; "
            "%d of them are already stored, %d to fetch",
            self._room_id,
            event_id,
            len(state_ids),
            len(auth_ids),
            self._progress.already_stored,
            len(self._s.missing),
        )
        warn_if_state_outgrows_event_cache(self._store, self._room_id, len(state_ids))

        try:
            unavailable = await self._fetch_missing(event_id)
        except BaseException:
            self._state = None
            raise
        self._progress.unavailable = len(unavailable)

        # Build the state map from what is stored, as Synapse does: skip events
        # of other rooms and non-state events, with a warning.
        state_map: dict[tuple[str, str], str] = {}
        for batch in batch_iter(state_ids, 5000):
            metadata = await self._store.get_metadata_for_events(batch)
            for state_event_id, meta in metadata.items():
                if meta.room_id != self._room_id or meta.state_key is None:
                    logger.warning(
                        "Resync of %s: %s listed in the state is not a state event of this room",
                        self._room_id,
                        state_event_id,
                    )
                    continue
                state_map[(meta.event_type, meta.state_key)] = state_event_id
        prev = await self._store.get_event(
            event_id,
            allow_none=True,
            allow_rejected=True,
            redact_behaviour=EventRedactBehaviour.as_is,
        )
        if prev is None:
            raise NoServerAnswered(f"could not get the event {event_id} itself")
        if prev.is_state() and prev.rejected_reason is None:
            state_map[(prev.type, prev.state_key)] = prev.event_id
        self._state = None
        return state_map

    async def _fetch_missing(self, at_event_id: str) -> set[str]:
        """Fetch rounds until nothing is missing. Returns the events no server
        would give us although at least one answered the round completely."""
        rounds_without_progress = 0
        while self._s.missing:
            before = len(self._s.missing)
            before_missing = set(self._s.missing)
            complete_round = False
            # Keys that could not be fetched are asked for again each round.
            self._keys.new_round()
            self._key_problem_ids = set()
            # /state is the state *before* the event: the event itself always
            # comes from /event.
            in_state = len(self._s.missing - {at_event_id})
            if in_state and self._state_is_cheaper(in_state):
                self._progress.set_phase(PHASE_STATE)
                await self._destinations.refresh()
                # The event itself comes from /event while /state streams (it
                # waits, parked, for its auth events if it arrives first):
                # one round trip, not two in a row.
                itself = None
                if at_event_id in self._s.missing:
                    itself = run_in_background(self._fetch_events_individually, [at_event_id])
                    itself.addErrback(self._not_fetched, at_event_id)
                try:
                    complete_round = await self._stream_state_from_best(at_event_id)
                except NoServerAnswered:
                    if self._s.missing == before_missing:
                        raise
                    # A stream broke off part-way: keep what it brought, and
                    # go round again for the rest.
                    complete_round = False
                except defer.CancelledError:
                    if itself is not None:
                        itself.cancel()
                    raise
                finally:
                    if itself is not None and not itself.called:
                        # (Ends on its own: hedged, bounded by servers_per_attempt.)
                        await make_deferred_yieldable(_settled(itself))
                if itself is not None and itself.result is not True:
                    complete_round = False
            else:
                self._progress.set_phase(PHASE_EVENTS)
                complete_round = await self._fetch_events_individually()
            await self._s.drain(final=True)
            progress = before - len(self._s.missing)
            logger.info(
                "Resync of %s: round done, %d events stored, %d still missing",
                self._room_id,
                progress,
                len(self._s.missing),
            )
            if progress > 0:
                rounds_without_progress = 0
                continue
            rounds_without_progress += 1
            unchecked = self._s.missing & self._key_problem_ids
            if unchecked:
                # Not the events' fault: the keys to check them could not be
                # fetched (e.g. the notary is backing off). Try again later.
                raise NoServerAnswered(
                    f"signing keys to check {len(unchecked)} events could not be fetched"
                )
            if complete_round and rounds_without_progress >= 2:
                # Servers answered but none has these events (or they depend on
                # events none has): do what Synapse does, leave them out.
                unavailable = set(self._s.missing)
                logger.warning(
                    "Resync of %s: %d promised events could not be fetched from any "
                    "server; leaving them out of the state: %s",
                    self._room_id,
                    len(unavailable),
                    sorted(unavailable)[:20],
                )
                self._s.missing = set()
                return unavailable
            if not complete_round:
                raise NoServerAnswered("no server served the missing events")
        return set()

    def _not_fetched(self, failure: Any, event_id: str) -> bool:
        if not failure.check(defer.CancelledError):
            logger.info(
                "Resync of %s: /event %s failed: %s", self._room_id, event_id, failure.getErrorMessage()
            )
        return False

    def _state_is_cheaper(self, missing: int) -> bool:
        """Whether to stream /state (everything the state and auth chain hold,
        most of it perhaps stored already) rather than ask /event for each
        missing event: by their estimated cost to this server, which is what
        the two differ in (the missing events cost the same either way)."""
        method = self._config.fetch_method
        if method != "auto":
            return method == "state"
        if missing > self._config.event_fetch_threshold:
            return True
        surplus = max(0, len(self._s.promised) - missing)
        return missing * _EVENT_REQUEST_MS > _STATE_REQUEST_MS + surplus * _STATE_ITEM_MS

    def _attempting(self, server: str) -> None:
        self._progress.destination = server

    # /state, streamed.

    async def _stream_state_from_best(self, at_event_id: str) -> bool:
        """Stream /state from the first server whose response starts (hedged
        over the ranked servers). A stream that breaks off sets its server
        aside; what it brought is kept.

        Raises:
            NoServerAnswered: no server's response started, or the stream broke.
        """

        async def open_response(destination: str) -> Any:
            return await requests.open_state(
                self._http, destination, self._room_id, at_event_id, self._timeout_ms
            )

        broken: list[str] = []
        while True:
            try:
                destination, response = await self._destinations.race(
                    "/state",
                    open_response,
                    hedge_seconds=5 * self._config.hedge_seconds,
                    on_attempt=self._attempting,
                )
            except NotFound as e:
                raise NoServerAnswered(str(e)) from None
            except NoServerAnswered:
                if broken:
                    raise NoServerAnswered(
                        f"/state broke off from {len(broken)} servers (last: {broken[-1]})"
                    ) from None
                raise
            self._progress.destination = destination
            try:
                return await self._stream_state(destination, response)
            except defer.CancelledError:
                raise
            except Exception as e:
                # Keep what it brought; ask the next server for the rest at once.
                self._destinations.failed(destination, f"{type(e).__name__}: {e}")
                self._progress.last_error = f"/state from {destination}: {type(e).__name__}: {e}"
                logger.warning(
                    "Resync of %s: /state from %s broke off: %s: %s",
                    self._room_id, destination, type(e).__name__, e,
                )
                broken.append(destination)
                await self._destinations.refresh()
                if len(broken) >= self._config.servers_per_attempt:
                    raise NoServerAnswered(f"/state from {destination}: {type(e).__name__}: {e}") from e
                # (Under the lock: the event itself may be fetched meanwhile.)
                async with self._s.lock.queue(self._room_id):
                    await self._s.drain(final=False)
                if not self._s.missing - {at_event_id}:
                    return True

    async def _stream_state(self, destination: str, response: Any) -> bool:
        logcontext = current_context()

        inflight: list["defer.Deferred[None]"] = []

        def on_chunk(chunk: list[dict[str, Any]]) -> "defer.Deferred[None]":
            with PreserveLoggingContext(logcontext):
                d = run_in_background(self._take_chunk, chunk, reader)
            waiter: "defer.Deferred[None]" = defer.Deferred()
            d.addBoth(lambda r: (waiter.callback(None), r)[1])
            inflight.append(waiter)
            return d

        promised_count = len(self._s.promised)

        def on_data(items: int, nbytes: int) -> None:
            self._progress.fetched += items
            self._progress.bytes_received += nbytes

        reader = StateBodyReader(
            on_chunk,
            self._reactor,
            chunk_size=self._config.chunk_size,
            max_items=promised_count + max(1000, promised_count // 10),
            idle_timeout=self._config.request_timeout_seconds,
            on_data=on_data,
        )
        response.deliverBody(reader)
        try:
            await make_deferred_yieldable(reader.done)
        except defer.CancelledError:
            # Stop reading: nothing more is handed on in a context that ended.
            reader.reject("the resync was cancelled")
            raise
        finally:
            # Whatever happened, let the chunks already handed on finish
            # (their events are kept) before the round ends.
            await make_deferred_yieldable(
                defer.gatherResults(inflight, consumeErrors=True)
            )
        return True

    async def _take_chunk(self, chunk: list[dict[str, Any]], reader: StateBodyReader | None) -> None:
        state = self._s  # (the fetch this chunk belongs to, throughout)
        result = await self._check(chunk, state)
        if reader is not None:
            reader.unwanted += result.unwanted + result.malformed
            if reader.unwanted > max(1000, len(state.promised) // 10):
                reader.reject(f"{reader.unwanted} events that /state_ids did not list")
        async with state.lock.queue(self._room_id):
            writes = await state.take(result)
        # The next chunk is auth-checked while this one's batches are written.
        if writes is not None:
            await make_deferred_yieldable(writes)

    async def _check(self, chunk: list[dict[str, Any]], state: StatePersister) -> Any:
        await self._keys.ensure(chunk)
        result = None
        if self._checkpool is not None and self._checkpool.ready():
            # In a check process (resync/checkpool.py); the events are built
            # here, in a thread, from the canonical JSON it checked.
            try:
                verdicts = await make_deferred_yieldable(
                    self._checkpool.check(
                        chunk, self._room_version.identifier, raw_keys(self._keys.snapshot()), None
                    )
                )
                result = await defer_to_threadpool(
                    self._reactor,
                    self._threadpool,
                    collect_worker_verdicts,
                    verdicts,
                    self._room_version,
                    self._room_id,
                    state.promised,
                    state.missing,
                )
            except CheckProcessFailed as e:
                logger.warning("Resync of %s: %s; checking the chunk in threads", self._room_id, e)
        if result is None:
            result = await defer_to_threadpool(
                self._reactor,
                self._threadpool,
                check_chunk,
                chunk,
                self._room_version,
                self._room_id,
                state.promised,
                state.missing,
                self._keys.snapshot(),
            )
        # What Synapse's _check_sigs_and_hash does after the signatures and
        # hashes: the room's policy server and the spam checkers (on the
        # reactor: they may do I/O).
        await run_spam_checks(self._hs, result)
        self._progress.checked += len(result.accepted)
        self._progress.redacted += result.redacted
        self._progress.unwanted += result.unwanted + result.malformed
        self._progress.bad_signatures += len(result.bad_signature)
        self._key_problem_ids.update(event_id for event_id, _ in result.missing_key)
        for event_id, reason in result.missing_key[:3]:
            logger.warning("Resync of %s: cannot check %s yet: %s", self._room_id, event_id, reason)
        for event_id, reason in result.bad_signature[:5]:
            logger.warning("Resync of %s: dropping %s: %s", self._room_id, event_id, reason)
        for reason in result.malformed_reasons[:3]:
            logger.warning("Resync of %s: dropping a malformed event: %s", self._room_id, reason)
        if result.spam or result.policy_refused:
            logger.info(
                "Resync of %s: %d events redacted as spam, %d soft-failed by the policy server",
                self._room_id, result.spam, result.policy_refused,
            )
        return result

    # /event, from a queue, each request hedged over the ranked servers.

    async def _fetch_events_individually(self, event_ids: Iterable[str] | None = None) -> bool:
        """Fetch each missing event with /event: `event_fetch_concurrency`
        requests in flight from a queue (no batch waits for its slowest),
        each hedged over the ranked servers. Events go on to be checked and
        persisted as they arrive, in small chunks.

        Args:
            event_ids: the events to fetch (default: every missing one).

        Returns whether every event was answered by some server (found, or
        said not to exist)."""
        await self._destinations.refresh()
        if not len(self._destinations):
            raise NoServerAnswered("no other server is known to be in the room")
        queue = sorted(self._s.missing if event_ids is None else event_ids)
        total = len(queue)
        pdus: list[dict[str, Any]] = []
        flushing: list["defer.Deferred[None]"] = []
        answered: set[str] = set()
        latencies: list[float] = []
        flush_at = max(1, min(self._config.chunk_size, _EVENT_FLUSH))

        def hedge() -> float:
            # Quick servers get hedged quickly; never later than configured.
            if len(latencies) < 5:
                return self._config.hedge_seconds
            recent = sorted(latencies[-50:])
            return min(self._config.hedge_seconds, max(0.2, 4 * recent[len(recent) // 2]))

        def flush() -> None:
            nonlocal pdus
            if pdus:
                chunk, pdus = pdus, []
                flushing.append(run_in_background(self._take_chunk, chunk, None))

        async def get_one(event_id: str) -> None:
            async def ask(dest: str) -> dict[str, Any]:
                started = time.monotonic()
                pdu = await requests.get_event(
                    self._http, dest, self._room_id, self._room_version, event_id, self._timeout_ms
                )
                latencies.append(time.monotonic() - started)
                return pdu

            try:
                _, pdu = await self._destinations.race(f"/event {event_id}", ask, hedge_seconds=hedge())
            except NotFound:
                answered.add(event_id)
                return
            except NoServerAnswered as e:
                self._progress.last_error = str(e)[:300]
                return
            answered.add(event_id)
            self._progress.fetched += 1
            pdus.append(pdu)
            if len(pdus) >= flush_at:
                flush()

        async def worker() -> None:
            while queue:
                await get_one(queue.pop())

        workers = min(self._config.event_fetch_concurrency, total)
        try:
            await make_deferred_yieldable(
                defer.gatherResults(
                    [run_in_background(worker) for _ in range(workers)], consumeErrors=True
                )
            )
        except defer.CancelledError:
            queue.clear()
            for d in flushing:
                d.cancel()
            raise
        flush()
        await make_deferred_yieldable(defer.gatherResults(flushing, consumeErrors=True))
        # Complete if every event was served, or said not to exist, by someone.
        return len(answered) == total

def _settled(d: "defer.Deferred[Any]") -> "defer.Deferred[None]":
    """A Deferred that fires once `d` has, whatever its outcome (which stays
    on `d`, its failure handled)."""
    out: "defer.Deferred[None]" = defer.Deferred()

    def done(result: Any) -> Any:
        out.callback(None)
        return result

    d.addBoth(done)
    return out


# Estimated cost to this server, in ms, of what /state and /event differ in:
# an /event request (client, TLS, JSON and logging overhead), a /state
# request, and each item /state sends that we hold already (transfer, parse,
# skip). Measured roughly on the benchmark's joiner; only their ratios matter.
_EVENT_REQUEST_MS = 1.5
_STATE_REQUEST_MS = 10.0
_STATE_ITEM_MS = 0.03
# Events fetched with /event are checked and persisted in chunks this big, so
# progress moves while they arrive.
_EVENT_FLUSH = 100
