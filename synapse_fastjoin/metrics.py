"""Prometheus metrics for partial-state joins and resyncs, and the WARNINGs an
admin must act on.

Everything is registered in Synapse's registry (prometheus_client's global
`REGISTRY`, which Synapse's `metrics` listener serves), named `synapse_fastjoin_*`
and labelled with `server_name` as Synapse labels its own. No metric has a
per-room label: the admin API lists the rooms.

Counters are derived from the engine's `ResyncProgress` objects rather than
incremented in the engine's hot paths: each counter is the total of the runs
that ended in this process plus the live values of the runs going on. A run's
values are kept as high-water marks, so a counter never goes down even where
the engine sets a field rather than adding to it. The engine tells us when a
run ends (`ResyncEngine.run_observers`), so nothing a run did is lost between
two scrapes.

Gauges that need the database (partial-state rooms, queued inbound events) are
read by a background call on the reactor every `REFRESH_SECONDS` (and at once
after a join or a resync ends), once the module's start-up has made its tables,
and served from that cache: a scrape, which runs
in the metrics listener's own thread, never touches the database.

Only the main process runs resyncs and owns these metrics; on workers the
module exports none of them.
"""

import logging
import math
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Iterable

from prometheus_client import Histogram
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric

from synapse.metrics import SERVER_NAME_LABEL
from synapse.metrics._types import Collector

from synapse_fastjoin.resync.progress import (
    PHASE_CATCHUP,
    PHASE_DONE,
    PHASE_EVENTS,
    PHASE_FINISHING,
    PHASE_RESOLVING,
    PHASE_STARTING,
    PHASE_STATE,
    PHASE_STATE_IDS,
    PHASE_WAITING,
    ResyncProgress,
)

if TYPE_CHECKING:
    from synapse_fastjoin.handlers.inbound_queue import InboundQueueStats
    from synapse_fastjoin.handlers.partial_auth import PartialStateAuth
    from synapse_fastjoin.federation.staging import StagingStats
    from synapse_fastjoin.handlers.staged_runs import StagedRunStats
    from synapse.module_api import ModuleApi

    from synapse_fastjoin.resync.engine import ResyncEngine

logger = logging.getLogger(__name__)

# How often the database-backed gauges are read, and the WARNING checks run.
REFRESH_SECONDS = 15.0

# A room whose resync has failed for the same reason this long, with nothing
# stored meanwhile, is reported at WARNING (and again every as long).
STUCK_WARNING_SECONDS = 3600.0

PHASES = (
    PHASE_STARTING,
    PHASE_STATE_IDS,
    PHASE_STATE,
    PHASE_EVENTS,
    PHASE_RESOLVING,
    PHASE_CATCHUP,
    PHASE_FINISHING,
    PHASE_WAITING,
    PHASE_DONE,
)

# Counter name (without `_total`) -> (ResyncProgress field, help). Each is
# the field's high-water mark per run (see `_counted`), summed over the runs.
PROGRESS_COUNTERS: dict[str, tuple[str, str]] = {
    "synapse_fastjoin_resync_events_fetched": (
        "fetched",
        "State events received from other servers by resyncs (before any check)",
    ),
    "synapse_fastjoin_resync_events_checked": (
        "checked",
        "State events that passed the signature, content hash and event id checks",
    ),
    "synapse_fastjoin_resync_events_persisted": ("persisted", "State events persisted by resyncs"),
    "synapse_fastjoin_resync_events_rejected": (
        "rejected",
        "State events persisted as rejected by the auth rules",
    ),
    "synapse_fastjoin_resync_events_redacted": (
        "redacted",
        "State events whose content hash did not match (stored redacted)",
    ),
    "synapse_fastjoin_resync_events_unwanted": (
        "unwanted",
        "Events received that /state_ids had not listed, or malformed (dropped)",
    ),
    "synapse_fastjoin_resync_events_bad_signatures": (
        "bad_signatures",
        "Events received with a bad signature (dropped, fetched again)",
    ),
    "synapse_fastjoin_resync_events_unavailable": (
        "unavailable",
        "Events /state_ids listed that no server would serve",
    ),
    "synapse_fastjoin_resync_received_bytes": (
        "bytes_received",
        "Bytes of /state and /event bodies received by resyncs",
    ),
    "synapse_fastjoin_resync_catchup_events": (
        "catchup_done",
        "Events that arrived while their room was partial, brought to full state",
    ),
    "synapse_fastjoin_resync_catchup_seconds": (
        "catchup_seconds",
        "Time spent bringing events that arrived while partial to full state",
    ),
    "synapse_fastjoin_resync_yielded_seconds": (
        "yielded_seconds",
        "Time resyncs waited after their writes while other transactions used "
        "SQLite's one database connection (resync.sqlite_yield_ratio)",
    ),
    "synapse_fastjoin_resync_slot_wait_seconds": (
        "slot_wait_seconds",
        "Time resyncs' writes waited for their room's slot in Synapse's event "
        "persistence queue while Synapse persisted other events of the room",
    ),
    "synapse_fastjoin_resync_retries": (
        "retries",
        "Retries of resyncs after a failure (the progress field `retries`)",
    ),
}


def _counted(p: ResyncProgress, field: str) -> float:
    """The value of a run's counter field that this process counts."""
    if field == "retries":
        # Those restored from a checkpoint were counted by the process before.
        return float(max(0, p.retries - p.retries_before))
    return float(getattr(p, field) or 0)


# Counter name -> (InboundQueueStats field, help): bounded staging
# (resync.inbound_queue_limit).
INBOUND_COUNTERS: dict[str, tuple[str, str]] = {
    "synapse_fastjoin_inbound_events_dropped_total": (
        "dropped",
        "Inbound events dropped from a kept queue past its bound, to fetch again",
    ),
    "synapse_fastjoin_inbound_events_refetched_total": (
        "refetched",
        "Dropped inbound events fetched again and queued",
    ),
    "synapse_fastjoin_inbound_events_arrived_total": (
        "arrived",
        "Dropped inbound events Synapse stored meanwhile (not fetched again)",
    ),
    "synapse_fastjoin_inbound_events_refetch_failed_total": (
        "failed",
        "Dropped inbound events no server served again (given up)",
    ),
}

# Counter name -> (StagedRunStats field, help): staged inbound events
# processed in runs (resync.inbound_run_length, handlers/staged_runs.py).
RUN_COUNTERS: dict[str, tuple[str, str]] = {
    "synapse_fastjoin_inbound_runs_total": (
        "runs",
        "Runs of a room's staged inbound events processed together",
    ),
    "synapse_fastjoin_inbound_run_events_total": (
        "events",
        "Staged inbound events processed in runs (the rest go one at a time)",
    ),
    "synapse_fastjoin_inbound_runs_given_back_total": (
        "given_back",
        "Runs given back to Synapse's one-at-a-time path (their persistence failed, "
        "the room changed meanwhile, or an error)",
    ),
    "synapse_fastjoin_inbound_run_auth_chains_ahead_total": (
        "chains_ahead",
        "Staged inbound events whose auth chains were fetched while the run before theirs was "
        "checked and written",
    ),
}

# Counter name -> (StagingStats field, help): /send transactions' PDUs of a
# room staged together (resync.batch_inbound_staging, federation/staging.py).
STAGING_COUNTERS: dict[str, tuple[str, str]] = {
    "synapse_fastjoin_inbound_staged_batches_total": (
        "transactions",
        "A /send transaction's PDUs of a room checked and staged together",
    ),
    "synapse_fastjoin_inbound_staged_pdus_total": (
        "pdus",
        "Inbound PDUs staged in those batches (this process)",
    ),
}

# Counter name -> (PartialStateAuth field, help): how inbound events of
# partial-state rooms were authorised (handlers/partial_auth.py, patch 0016).
PARTIAL_AUTH_COUNTERS: dict[str, tuple[str, str]] = {
    "synapse_fastjoin_partial_auth_unconflicted_total": (
        "unconflicted",
        "Inbound events of partial-state rooms authorised from the partial state at their "
        "auth keys (each the same in the partial state and the claimed auth events)",
    ),
    "synapse_fastjoin_partial_auth_resolved_at_auth_keys_total": (
        "resolved_at_auth_keys",
        "Inbound events of partial-state rooms whose state resolution was computed at "
        "their auth keys",
    ),
    "synapse_fastjoin_partial_auth_synapse_resolutions_total": (
        "resolved",
        "Inbound events of partial-state rooms left to Synapse's resolution of the whole "
        "partial state",
    ),
}

# Every family labelled by server_name alone: (name, help, where its value is
# in a server's `samples()`). A server whose samples lack the value (the
# database not read yet, a thread pool without Twisted's legacy accessors) has
# no sample in the family rather than a wrong one.
_Series = tuple[str, str, tuple[str, ...]]
GAUGES: tuple[_Series, ...] = (
    # Database-backed.
    (
        "synapse_fastjoin_partial_state_rooms",
        "Rooms this server holds in partial state now",
        ("db", "rooms"),
    ),
    (
        "synapse_fastjoin_partial_state_events",
        "Events of partial-state rooms whose state is not resolved yet",
        ("db", "events"),
    ),
    (
        "synapse_fastjoin_partial_state_oldest_join_age_seconds",
        "How long ago the oldest partial-state room was joined (0: none)",
        ("db", "oldest_join_age"),
    ),
    (
        "synapse_fastjoin_inbound_events_queued",
        "Inbound federation events queued for partial-state rooms",
        ("db", "queued"),
    ),
    # Live.
    (
        "synapse_fastjoin_resync_next_retry_seconds",
        "Longest wait until the next attempt among resyncs waiting to retry (0: none waits)",
        ("next_retry_seconds",),
    ),
    (
        "synapse_fastjoin_resync_catchup_remaining",
        "Events that arrived while partial still to be caught up, over running resyncs",
        ("catchup_remaining",),
    ),
    (
        "synapse_fastjoin_check_pool_queued",
        "Check tasks (chunks of events) waiting for a worker thread",
        ("pool", "queued"),
    ),
    (
        "synapse_fastjoin_check_pool_busy",
        "Worker threads checking signatures and hashes now",
        ("pool", "busy"),
    ),
)
COUNTERS: tuple[_Series, ...] = (
    *((name, doc, ("counters", field)) for name, (field, doc) in PROGRESS_COUNTERS.items()),
    *((name, doc, ("inbound", field)) for name, (field, doc) in INBOUND_COUNTERS.items()),
    *((name, doc, ("runs", field)) for name, (field, doc) in RUN_COUNTERS.items()),
    *((name, doc, ("staging", field)) for name, (field, doc) in STAGING_COUNTERS.items()),
    *((name, doc, ("partial_auth", field)) for name, (field, doc) in PARTIAL_AUTH_COUNTERS.items()),
    (
        "synapse_fastjoin_resyncs_started",
        "Resync runs started in this process (after a join, or resumed on start-up)",
        ("runs_started",),
    ),
    (
        "synapse_fastjoin_resync_attempts",
        "Resync attempts: runs started plus attempts after a failure",
        ("attempts",),
    ),
)


# Join to full state, and first resync start to end: 1 s to a day.
DURATION_BUCKETS = (
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
    3600.0, 7200.0, 14400.0, 28800.0, 86400.0, math.inf,
)  # fmt: skip

join_to_full_state = Histogram(
    "synapse_fastjoin_join_to_full_state_seconds",
    "Time from a partial-state join to the room having full state",
    labelnames=[SERVER_NAME_LABEL],
    buckets=DURATION_BUCKETS,
)
resync_duration = Histogram(
    "synapse_fastjoin_resync_duration_seconds",
    "Time from a room's first resync start to its end (complete, or failed for good)",
    labelnames=[SERVER_NAME_LABEL, "outcome"],
    buckets=DURATION_BUCKETS,
)
catchup_events = Histogram(
    "synapse_fastjoin_resync_catchup_batch_events",
    "Per finished resync run: events that arrived while partial and were caught up",
    labelnames=[SERVER_NAME_LABEL],
    buckets=(0, 1, 10, 100, 1000, 10000, 100000, 1000000, math.inf),
)
catchup_duration = Histogram(
    "synapse_fastjoin_resync_catchup_duration_seconds",
    "Per finished resync run: time spent catching up events that arrived while partial",
    labelnames=[SERVER_NAME_LABEL],
    buckets=(0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, math.inf),
)


class _RunValues:
    """High-water marks of one run's counters."""

    __slots__ = ("progress", "values", "failures")

    def __init__(self, progress: ResyncProgress) -> None:
        self.progress = progress
        self.values: dict[str, float] = {}
        self.failures: dict[str, int] = {}

    def update(self) -> None:
        p = self.progress
        for field, _ in PROGRESS_COUNTERS.values():
            value = _counted(p, field)
            if value > self.values.get(field, 0.0):
                self.values[field] = value
        for reason, n in tuple(p.failures.items()):
            if n > self.failures.get(reason, 0):
                self.failures[reason] = n


class _RoomWatch:
    """What the WARNING checks remember about one room's resync."""

    __slots__ = ("reason", "since", "done", "warned", "bad")

    def __init__(self) -> None:
        self.reason: str | None = None
        self.since = 0.0
        self.done = 0
        self.warned = 0.0
        self.bad = 0


class FastJoinMetrics:
    """The metrics of one homeserver's module (main process).

    Args:
        api: the module API (database, background calls).
        engine: the resync engine, or None when Synapse's own loop runs (then
            only the database-backed gauges and the histograms are exported).
    """

    def __init__(
        self,
        api: "ModuleApi",
        engine: "ResyncEngine | None",
        inbound: "InboundQueueStats | None" = None,
        runs: "StagedRunStats | None" = None,
        staging: "StagingStats | None" = None,
        partial_auth: "PartialStateAuth | None" = None,
    ) -> None:
        self._api = api
        self._engine = engine
        # Totals of bounded staging (handlers/inbound_queue.py) in this process.
        self._inbound = inbound
        # Totals of the staged events' runs (handlers/staged_runs.py) in this process.
        self._runs = runs
        # Totals of the /send batches staged (federation/staging.py) in this process.
        self._staging = staging
        # How inbound events of partial-state rooms were authorised (handlers/partial_auth.py).
        self._partial_auth = partial_auth
        self.server_name = api.server_name
        self._lock = threading.Lock()
        # Totals of the runs that ended; the runs going on, by room.
        self._ended: dict[str, float] = {}
        self._ended_failures: dict[str, int] = {}
        self._runs_started = 0
        self._live: dict[str, _RunValues] = {}
        # Database-backed gauges (None until first read).
        self._db: dict[str, float] | None = None
        self._oldest_join_ts: int | None = None
        self._ready = False
        self._refreshing = False
        self._refresh_again = False
        # Runs already added to the totals (so an end is never counted twice).
        self._folded: "weakref.WeakValueDictionary[int, ResyncProgress]" = (
            weakref.WeakValueDictionary()
        )
        self._watch: dict[str, _RoomWatch] = {}
        if engine is not None:
            engine.run_observers.append(self.run_ended)
        # Create the histograms' series at zero now: a series that appears
        # with its first observation hides that observation from rate().
        join_to_full_state.labels(self.server_name)
        for outcome in ("complete", "failed"):
            resync_duration.labels(self.server_name, outcome)
        catchup_events.labels(self.server_name)
        catchup_duration.labels(self.server_name)

    def start(self) -> None:
        """Register with Synapse's registry (the database-backed gauges have no
        value until `database_ready`)."""
        _COLLECTOR.add(self)

    async def database_ready(self) -> None:
        """The module's tables exist: read the gauges now and every
        REFRESH_SECONDS from now on."""
        if self._ready:
            return
        self._ready = True
        await self.refresh()
        self._api.looping_background_call(
            self.refresh, REFRESH_SECONDS * 1000, desc="fastjoin_metrics_refresh"
        )

    # Engine and module hooks (reactor thread).

    def run_ended(self, progress: ResyncProgress) -> None:
        """A resync run ended (ResyncEngine.run_observers): fold its counters
        into the totals, and observe its catch-up."""
        try:
            with self._lock:
                if not self._was_folded(progress):
                    run = self._live.pop(progress.room_id, None)
                    if run is None or run.progress is not progress:
                        if run is not None:
                            self._fold_locked(run)
                        run = _RunValues(progress)
                        self._runs_started += 1
                    run.update()
                    self._fold_locked(run)
            if progress.phase == PHASE_DONE:
                catchup_events.labels(self.server_name).observe(progress.catchup_done)
                catchup_duration.labels(self.server_name).observe(progress.catchup_seconds)
            # What the last periodic check did not see yet.
            self._warn_bad_signatures(progress, self._watch.pop(progress.room_id, _RoomWatch()))
        except Exception:
            logger.warning("Could not record the metrics of a resync run", exc_info=True)

    async def resync_finished(self, room_id: str, complete: bool, error: str | None) -> None:
        """Observe the durations of a resync that ended; call it before the
        module's store forgets the room."""
        if error is not None and error.startswith("CancelledError"):
            return  # shutting down: not an outcome
        try:

            def txn(txn: Any) -> tuple[int | None, int | None]:
                txn.execute(
                    "SELECT joined_ts, first_resync_ts FROM fastjoin_rooms WHERE room_id = ?",
                    (room_id,),
                )
                row = txn.fetchone()
                return (row[0], row[1]) if row else (None, None)

            joined_ts, first_resync_ts = await self._api.run_db_interaction(
                "fastjoin_metrics_resync_times", txn
            )
        except Exception:
            logger.warning("Could not read the times of the resync of %s", room_id, exc_info=True)
            return
        now_ms = int(time.time() * 1000)
        if complete and joined_ts:
            join_to_full_state.labels(self.server_name).observe(max(0, now_ms - joined_ts) / 1000)
        if first_resync_ts:
            resync_duration.labels(self.server_name, "complete" if complete else "failed").observe(
                max(0, now_ms - first_resync_ts) / 1000
            )

    async def refresh(self) -> None:
        """Read the database-backed gauges, and log what an admin must act on."""
        if not self._ready:
            return
        if self._refreshing:
            # Read again once the running read is done: it may predate the
            # change that made the caller ask.
            self._refresh_again = True
            return
        self._refreshing = True
        try:
            self._check_warnings()
            while True:
                self._refresh_again = False
                values, oldest = await self._api.run_db_interaction(
                    "fastjoin_metrics_gauges", _read_gauges_txn
                )
                with self._lock:
                    self._db = values
                    self._oldest_join_ts = oldest
                if not self._refresh_again:
                    break
        except Exception:
            logger.warning("Could not read the partial-state gauges", exc_info=True)
        finally:
            self._refreshing = False

    # WARNINGs an admin must act on.

    def _check_warnings(self) -> None:
        if self._engine is None:
            return
        now = time.monotonic()
        current = dict(self._engine.progress)
        for room_id in set(self._watch) - set(current):
            del self._watch[room_id]
        for room_id, p in current.items():
            w = self._watch.setdefault(room_id, _RoomWatch())
            self._warn_bad_signatures(p, w)
            # The same failure for an hour with nothing stored meanwhile.
            done = p.persisted + p.catchup_done
            reason = p.last_failure_reason
            if reason is None or reason != w.reason or done != w.done:
                w.reason, w.since, w.done, w.warned = reason, now, done, 0.0
                continue
            if (
                p.phase == PHASE_WAITING
                and now - w.since >= STUCK_WARNING_SECONDS
                and now - w.warned >= STUCK_WARNING_SECONDS
            ):
                w.warned = now
                logger.warning(
                    "Resync of %s has been failing for %.0f minutes with %s and nothing"
                    " stored meanwhile (%d retries; last error: %s). Check that the"
                    " room's servers are reachable (the admin API shows the room).",
                    room_id,
                    (now - w.since) / 60,
                    reason,
                    p.retries,
                    p.last_error,
                )

    @staticmethod
    def _warn_bad_signatures(p: ResyncProgress, w: _RoomWatch) -> None:
        """A server that serves events with bad signatures is broken or hostile."""
        if p.bad_signatures > w.bad:
            logger.warning(
                "Resync of %s: %d events with bad signatures received (last server"
                " asked: %s); they were dropped and fetched from other servers, but a"
                " server that serves forged events is broken or hostile",
                p.room_id,
                p.bad_signatures - w.bad,
                p.destination,
            )
            w.bad = p.bad_signatures

    # Scrape (the metrics listener's thread).

    def _sync_live_locked(self) -> dict[str, _RunValues]:
        """Bring `_live` in line with the engine's running resyncs."""
        if self._engine is None:
            return self._live
        current = tuple(self._engine.progress.items())
        for room_id, progress in current:
            run = self._live.get(room_id)
            if run is None or run.progress is not progress:
                if run is not None:  # ended without telling us: keep its values
                    run.update()
                    self._fold_locked(run)
                if self._was_folded(progress):
                    continue
                self._live[room_id] = run = _RunValues(progress)
                self._runs_started += 1
            run.update()
        running = {room_id for room_id, _ in current}
        for room_id in [r for r in self._live if r not in running]:
            # Ended (its observer call may be on its way): keep its values.
            run = self._live.pop(room_id)
            run.update()
            self._fold_locked(run)
        return self._live

    def _was_folded(self, progress: ResyncProgress) -> bool:
        # By identity: ResyncProgress compares by value and is not hashable.
        return self._folded.get(id(progress)) is progress

    def _fold_locked(self, run: _RunValues) -> None:
        if self._was_folded(run.progress):
            return
        self._folded[id(run.progress)] = run.progress
        for field, value in run.values.items():
            self._ended[field] = self._ended.get(field, 0.0) + value
        for reason, n in run.failures.items():
            self._ended_failures[reason] = self._ended_failures.get(reason, 0) + n

    def samples(self) -> dict[str, Any]:
        """Every exported value of this server (the collector's input; tests)."""
        with self._lock:
            live = self._sync_live_locked()
            counters = {field: 0.0 for field, _ in PROGRESS_COUNTERS.values()}
            counters.update(self._ended)
            failures = dict(self._ended_failures)
            for run in live.values():
                for field, value in run.values.items():
                    counters[field] = counters.get(field, 0.0) + value
                for reason, n in run.failures.items():
                    failures[reason] = failures.get(reason, 0) + n
            runs = self._runs_started
            progresses = [run.progress for run in live.values()]
            db = dict(self._db) if self._db is not None else None
            oldest = self._oldest_join_ts
        phases = dict.fromkeys(PHASES, 0)
        next_retry = 0.0
        catchup_left = 0
        now_ms = int(time.time() * 1000)
        for p in progresses:
            phases[p.phase] = phases.get(p.phase, 0) + 1
            if p.phase == PHASE_WAITING and p.next_retry_ts:
                next_retry = max(next_retry, (p.next_retry_ts - now_ms) / 1000)
            catchup_left += p.catchup_remaining or 0
        pool: dict[str, int] = {}
        threadpool = getattr(self._engine, "_threadpool", None)
        if threadpool is not None:
            try:
                pool = {"queued": threadpool.q.qsize(), "busy": len(threadpool.working)}
            except Exception:  # a Twisted without the legacy accessors
                pool = {}
        if db is not None:
            db["oldest_join_age"] = (
                max(0.0, (now_ms - oldest) / 1000) if oldest and db["rooms"] else 0.0
            )
        return {
            "counters": counters,
            "failures": failures,
            "runs_started": runs,
            "attempts": runs + sum(failures.values()),
            "phases": phases,
            "next_retry_seconds": max(0.0, next_retry),
            "catchup_remaining": catchup_left,
            "pool": pool,
            "db": db,
            "inbound": {
                field: getattr(self._inbound, field) if self._inbound else 0
                for field, _ in INBOUND_COUNTERS.values()
            },
            "runs": {
                field: getattr(self._runs, field) if self._runs else 0
                for field, _ in RUN_COUNTERS.values()
            },
            "staging": {
                field: getattr(self._staging, field) if self._staging else 0
                for field, _ in STAGING_COUNTERS.values()
            },
            "partial_auth": {
                field: getattr(self._partial_auth, field) if self._partial_auth else 0
                for field, _ in PARTIAL_AUTH_COUNTERS.values()
            },
        }


def _read_gauges_txn(txn: Any) -> tuple[dict[str, float], int | None]:
    txn.execute("SELECT COUNT(*) FROM partial_state_rooms")
    (rooms,) = txn.fetchone()
    txn.execute("SELECT COUNT(*) FROM partial_state_events")
    (events,) = txn.fetchone()
    txn.execute(
        "SELECT COUNT(*) FROM federation_inbound_events_staging"
        " WHERE room_id IN (SELECT room_id FROM partial_state_rooms)"
    )
    (queued,) = txn.fetchone()
    # Rooms joined before the module was enabled have no join time.
    txn.execute(
        "SELECT MIN(f.joined_ts) FROM fastjoin_rooms f"
        " INNER JOIN partial_state_rooms p ON p.room_id = f.room_id"
    )
    (oldest,) = txn.fetchone()
    return {"rooms": float(rooms), "events": float(events), "queued": float(queued)}, oldest


class _Collector(Collector):
    """The one collector in Synapse's registry; serves every homeserver whose
    module registered (one per process in production; tests may make more)."""

    def __init__(self) -> None:
        self._servers: "weakref.WeakValueDictionary[str, FastJoinMetrics]" = (
            weakref.WeakValueDictionary()
        )

    def add(self, metrics: FastJoinMetrics) -> None:
        # A module constructed again for the same server replaces the last one.
        self._servers[metrics.server_name] = metrics

    def remove(self, metrics: FastJoinMetrics) -> None:
        if self._servers.get(metrics.server_name) is metrics:
            del self._servers[metrics.server_name]

    def collect(self) -> Iterable[Metric]:
        return _families([(m.server_name, m.samples()) for m in list(self._servers.values())])


def _lookup(samples: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = samples
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _families(servers: list[tuple[str, dict[str, Any]]]) -> list[Metric]:
    """Metric families for the samples of each server."""
    out: list[Metric] = []
    for kind, table in ((GaugeMetricFamily, GAUGES), (CounterMetricFamily, COUNTERS)):
        for name, doc, path in table:
            family = kind(name, doc, labels=[SERVER_NAME_LABEL])
            for server, s in servers:
                value = _lookup(s, path)
                if value is not None:
                    family.add_metric([server], value)
            out.append(family)
    # The families with a second label.
    phases = GaugeMetricFamily(
        "synapse_fastjoin_resyncs_running",
        "Resyncs running in this process, by phase",
        labels=[SERVER_NAME_LABEL, "phase"],
    )
    failures = CounterMetricFamily(
        "synapse_fastjoin_resync_failures",
        "Failed resync attempts (each followed by a backoff), by reason",
        labels=[SERVER_NAME_LABEL, "reason"],
    )
    for server, s in servers:
        for phase, n in s["phases"].items():
            phases.add_metric([server, phase], n)
        for reason, n in sorted(s["failures"].items()):
            failures.add_metric([server, reason], n)
    out.extend((phases, failures))
    return out


_COLLECTOR = _Collector()
REGISTRY.register(_COLLECTOR)
