"""Reads and writes of the module's tables, alongside Synapse's own
partial-state tables (`partial_state_rooms`, `partial_state_rooms_servers`,
`partial_state_events`), through Synapse's database pool.
"""

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Collection, TypeVar

from synapse.logging.context import make_deferred_yieldable
from synapse.storage.database import LoggingTransaction
from twisted.internet import defer

from synapse_fastjoin.storage import events, inbound, push_actions, servers
from synapse_fastjoin.storage.member_counts import (
    ROOM_COUNTS,
    SERVER_COUNTS,
    KeptCount,
    counts_kept_txn,
    join_fanout_txn,
    joined_member_count_txn,
    joined_servers_txn,
)
from synapse_fastjoin.storage.push_actions import StagedPushActions
from synapse_fastjoin.storage.schema import check_schema_txn, prepare_schema_txn

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Values of fastjoin_rooms.resync_status. A partial-state room that Synapse knows
# but the module has no row for (joined before the module was enabled) is
# reported as STATUS_UNKNOWN.
STATUS_JOINING = "joining"
STATUS_RESYNCING = "resyncing"
STATUS_FAILED = "failed"
STATUS_UNKNOWN = "unknown"
# An admin's abort under way (see handlers/control.py); "+purge" when the room
# is to be purged too. Kept across a restart, which finishes the abort.
STATUS_ABORTING = "aborting"
STATUS_ABORTING_PURGE = "aborting+purge"

OUTCOME_COMPLETE = "complete"
OUTCOME_FAILED = "failed"
OUTCOME_ABORTED = "aborted"

# Errors are free text from exceptions; keep rows small.
_MAX_ERROR_LENGTH = 1000

_ROOM_COLUMNS = (
    "room_id",
    "join_event_id",
    "joined_via",
    "joined_ts",
    "known_servers",
    "partial_state_events_remaining",
    "resync_status",
    "first_resync_ts",
    "last_resync_ts",
    "resync_attempts",
    "last_error",
    "progress",
)

_HISTORY_COLUMNS = (
    "room_id",
    "join_event_id",
    "joined_via",
    "joined_ts",
    "first_resync_ts",
    "finished_ts",
    "outcome",
    "resync_attempts",
    "error",
)

RunDbInteraction = Callable[..., Awaitable[Any]]


class FastJoinStore:
    """The module's storage. Every method waits for the schema to be ready.

    Args:
        run_db_interaction: `ModuleApi.run_db_interaction`, which runs a `_txn`
            function in a transaction on Synapse's main database.
        may_migrate: whether this process creates and upgrades the tables. Only
            the main process does; workers check that it has.
    """

    def __init__(self, run_db_interaction: RunDbInteraction, may_migrate: bool) -> None:
        self._run = run_db_interaction
        self._may_migrate = may_migrate
        self._schema_ready = False
        self._schema_lock = defer.DeferredLock()
        # Whether the triggers of each kept count are there, by table
        # (checked once per process).
        self._counts_kept: dict[str, bool] = {}

    async def ensure_schema(self) -> None:
        """Create or upgrade the module's tables, once per process. A failure is
        raised to the caller and tried again by the next one."""
        if self._schema_ready:
            return
        # Waited on through make_deferred_yieldable, so that a caller that
        # queues behind another keeps its logcontext.
        await make_deferred_yieldable(self._schema_lock.acquire())
        try:
            if self._schema_ready:
                return
            if self._may_migrate:
                before = await self._run("fastjoin_prepare_schema", prepare_schema_txn)
                logger.info("synapse-fastjoin tables ready (were at version %d)", before)
            else:
                await self._run("fastjoin_check_schema", check_schema_txn)
            self._schema_ready = True
        finally:
            self._schema_lock.release()

    async def _interaction(self, desc: str, func: Callable[..., T], *args: Any) -> T:
        await self.ensure_schema()
        return await self._run(desc, func, *args)

    async def _are_kept(self, kept: KeptCount, otherwise: str) -> bool:
        """Whether every trigger keeping `kept` is there (seen once per
        process; a warning says what Synapse does `otherwise`)."""
        if kept.table not in self._counts_kept:
            self._counts_kept[kept.table] = await self._interaction(
                "fastjoin_counts_kept", counts_kept_txn, kept
            )
            if not self._counts_kept[kept.table]:
                logger.warning(
                    "%s is not kept (a trigger is missing): %s until this process"
                    " restarts (the main process restores the triggers when it starts)",
                    kept.table,
                    otherwise,
                )
        return self._counts_kept[kept.table]

    async def joined_member_count(self, room_id: str) -> int | None:
        """The room's joined members in its current state, from the count the
        database keeps (storage/member_counts.py), for Synapse's
        `get_number_joined_users_in_room` (patch 0022); None (Synapse counts)
        if a trigger that keeps it is missing."""
        if not await self._are_kept(ROOM_COUNTS, "Synapse counts rooms' members"):
            return None
        return await self._interaction(
            "fastjoin_joined_member_count", joined_member_count_txn, room_id
        )

    async def _server_counts_are_kept(self) -> bool:
        return await self._are_kept(
            SERVER_COUNTS, "Synapse reads rooms' member lists for their servers"
        )

    async def join_fanout_reads(
        self, room_id: str, newly_joined: list[str]
    ) -> tuple[list[str], dict[str, int], set[str]] | None:
        """The local members of `room_id`, its per-server joined counts and
        which of `newly_joined` are joined now (`join_fanout_txn`); None if a
        trigger keeping the per-server counts is missing."""
        if not await self._server_counts_are_kept():
            return None
        return await self._interaction(
            "fastjoin_join_fanout", join_fanout_txn, room_id, newly_joined
        )

    async def current_hosts_in_room(self, room_id: str) -> set[str] | None:
        """The servers with a member joined to `room_id`, from the per-server
        counts (patch 0031, Synapse's `get_current_hosts_in_room`); None if a
        trigger keeping them is missing."""
        if not await self._server_counts_are_kept():
            return None
        servers = await self._interaction(
            "fastjoin_current_hosts_in_room", joined_servers_txn, room_id
        )
        return set(servers)

    # Lifecycle, written by the hooks of the patch series.

    async def record_partial_state_join(
        self, room_id: str, join_event_id: str, joined_via: str, now_ms: int
    ) -> str | None:
        """A remote join has just left `room_id` in partial state.

        Returns:
            The outcome of the room's last finished resync, if any (in the same
            transaction: the join path waits for this).
        """

        def txn_fn(txn: LoggingTransaction) -> str | None:
            txn.execute("DELETE FROM fastjoin_rooms WHERE room_id = ?", (room_id,))
            txn.execute(
                "INSERT INTO fastjoin_rooms (room_id, join_event_id, joined_via,"
                " joined_ts, resync_status, resync_attempts, updated_ts)"
                " VALUES (?, ?, ?, ?, ?, 0, ?)",
                (room_id, join_event_id, joined_via, now_ms, STATUS_JOINING, now_ms),
            )
            txn.execute(
                "SELECT outcome FROM fastjoin_resync_history WHERE room_id = ?"
                " ORDER BY finished_ts DESC LIMIT 1",
                (room_id,),
            )
            row = txn.fetchone()
            return row[0] if row else None

        return await self._interaction("fastjoin_record_partial_state_join", txn_fn)

    async def record_resync_started(self, room_id: str, now_ms: int) -> None:
        """A resync of `room_id` has started (after a join, or on resumption)."""

        def txn_fn(txn: LoggingTransaction) -> None:
            txn.execute(
                "UPDATE fastjoin_rooms SET resync_status = CASE WHEN resync_status"
                " IN (?, ?) THEN resync_status ELSE ? END,"
                " first_resync_ts = COALESCE(first_resync_ts, ?), last_resync_ts = ?,"
                " resync_attempts = resync_attempts + 1, updated_ts = ?"
                " WHERE room_id = ?",
                (
                    STATUS_ABORTING,
                    STATUS_ABORTING_PURGE,
                    STATUS_RESYNCING,
                    now_ms,
                    now_ms,
                    now_ms,
                    room_id,
                ),
            )
            if txn.rowcount == 0:
                # Joined before the module was enabled: we never saw the join.
                txn.execute(
                    "INSERT INTO fastjoin_rooms (room_id, join_event_id, joined_via,"
                    " joined_ts, resync_status, first_resync_ts, last_resync_ts,"
                    " resync_attempts, updated_ts)"
                    " SELECT room_id, join_event_id, joined_via, NULL, ?, ?, ?, 1, ?"
                    " FROM partial_state_rooms WHERE room_id = ?",
                    (STATUS_RESYNCING, now_ms, now_ms, now_ms, room_id),
                )

        await self._interaction("fastjoin_record_resync_started", txn_fn)

    async def record_resync_finished(
        self, room_id: str, complete: bool, error: str | None, now_ms: int
    ) -> None:
        """A resync of `room_id` ended; `complete` says whether the room has full
        state now. Adds a history row; forgets the room if it is complete."""
        if error is not None:
            error = error[:_MAX_ERROR_LENGTH]

        def txn_fn(txn: LoggingTransaction) -> None:
            txn.execute(
                "SELECT join_event_id, joined_via, joined_ts, first_resync_ts,"
                " resync_attempts FROM fastjoin_rooms WHERE room_id = ?",
                (room_id,),
            )
            row = txn.fetchone() or (None, None, None, None, 0)
            join_event_id, joined_via, joined_ts, first_resync_ts, attempts = row
            txn.execute(
                "INSERT INTO fastjoin_resync_history (room_id, join_event_id,"
                " joined_via, joined_ts, first_resync_ts, finished_ts, outcome,"
                " resync_attempts, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    room_id,
                    join_event_id,
                    joined_via,
                    joined_ts,
                    first_resync_ts,
                    now_ms,
                    OUTCOME_COMPLETE if complete else OUTCOME_FAILED,
                    attempts,
                    error,
                ),
            )
            if complete:
                txn.execute("DELETE FROM fastjoin_rooms WHERE room_id = ?", (room_id,))
            else:
                txn.execute(
                    "UPDATE fastjoin_rooms SET resync_status = ?, last_error = ?,"
                    " updated_ts = ? WHERE room_id = ?",
                    (
                        STATUS_FAILED,
                        error or "resync ended with the room still partial",
                        now_ms,
                        room_id,
                    ),
                )

        await self._interaction("fastjoin_record_resync_finished", txn_fn)

    async def record_resync_aborted(self, room_id: str, reason: str, now_ms: int) -> None:
        """A server admin aborted the resync of `room_id`: adds a history row
        with outcome `aborted` and forgets the room. Call it while Synapse's
        `partial_state_rooms` row still exists, for a room the module did not
        record (joined before it was enabled)."""
        reason = reason[:_MAX_ERROR_LENGTH]

        def txn_fn(txn: LoggingTransaction) -> None:
            txn.execute(
                "SELECT join_event_id, joined_via, joined_ts, first_resync_ts,"
                " resync_attempts FROM fastjoin_rooms WHERE room_id = ?",
                (room_id,),
            )
            row = txn.fetchone()
            if row is None:
                txn.execute(
                    "SELECT join_event_id, joined_via FROM partial_state_rooms"
                    " WHERE room_id = ?",
                    (room_id,),
                )
                joined = txn.fetchone() or (None, None)
                row = (*joined, None, None, 0)
            txn.execute(
                "INSERT INTO fastjoin_resync_history (room_id, join_event_id,"
                " joined_via, joined_ts, first_resync_ts, finished_ts, outcome,"
                " resync_attempts, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (room_id, *row[:4], now_ms, OUTCOME_ABORTED, row[4], reason),
            )
            txn.execute("DELETE FROM fastjoin_rooms WHERE room_id = ?", (room_id,))

        await self._interaction("fastjoin_record_resync_aborted", txn_fn)

    async def mark_aborting(self, room_id: str, purge: bool, now_ms: int) -> None:
        """An admin's abort of `room_id` has begun: remember it, so that a
        restart half-way finishes it."""
        status = STATUS_ABORTING_PURGE if purge else STATUS_ABORTING

        def txn_fn(txn: LoggingTransaction) -> None:
            txn.execute(
                "UPDATE fastjoin_rooms SET resync_status = ?, updated_ts = ? WHERE room_id = ?",
                (status, now_ms, room_id),
            )
            if txn.rowcount == 0:
                txn.execute(
                    "INSERT INTO fastjoin_rooms (room_id, join_event_id, joined_via,"
                    " resync_status, resync_attempts, updated_ts)"
                    " SELECT room_id, join_event_id, joined_via, ?, 0, ?"
                    " FROM partial_state_rooms WHERE room_id = ?",
                    (status, now_ms, room_id),
                )

        await self._interaction("fastjoin_mark_aborting", txn_fn)

    async def get_aborting(self) -> dict[str, bool]:
        """Rooms whose abort was under way: room id -> whether to purge."""

        def txn_fn(txn: LoggingTransaction) -> dict[str, bool]:
            txn.execute(
                "SELECT room_id, resync_status FROM fastjoin_rooms WHERE resync_status IN (?, ?)",
                (STATUS_ABORTING, STATUS_ABORTING_PURGE),
            )
            return {room_id: status == STATUS_ABORTING_PURGE for room_id, status in txn}

        return await self._interaction("fastjoin_get_aborting", txn_fn)

    # The resync engine's checkpoint.

    async def save_checkpoint(self, room_id: str, progress: dict[str, Any]) -> None:
        """Record a running resync's progress (phase, counters, last error)."""
        now_ms = int(time.time() * 1000)
        error = progress.get("last_error")
        if isinstance(error, str):
            error = error[:_MAX_ERROR_LENGTH]

        def txn_fn(txn: LoggingTransaction) -> None:
            txn.execute(
                "UPDATE fastjoin_rooms SET progress = ?, progress_ts = ?,"
                " last_error = COALESCE(?, last_error), updated_ts = ?"
                " WHERE room_id = ?",
                (json.dumps(progress), now_ms, error, now_ms, room_id),
            )

        await self._interaction("fastjoin_save_checkpoint", txn_fn)

    async def get_checkpoint(self, room_id: str) -> dict[str, Any] | None:
        """The last progress saved for `room_id`, if any."""

        def txn_fn(txn: LoggingTransaction) -> Any:
            txn.execute("SELECT progress FROM fastjoin_rooms WHERE room_id = ?", (room_id,))
            row = txn.fetchone()
            return row[0] if row else None

        return _load_json(await self._interaction("fastjoin_get_checkpoint", txn_fn))

    # Reads, for the admin API.

    async def get_partial_state_rooms(
        self, room_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Every room Synapse holds in partial state (or just `room_id`), with
        what the module recorded about it, ordered by room id."""

        def txn_fn(txn: LoggingTransaction) -> list[dict[str, Any]]:
            sql = (
                "SELECT p.room_id, COALESCE(p.join_event_id, f.join_event_id),"
                " COALESCE(p.joined_via, f.joined_via), f.joined_ts,"
                " (SELECT COUNT(*) FROM partial_state_rooms_servers s"
                "   WHERE s.room_id = p.room_id),"
                " (SELECT COUNT(*) FROM partial_state_events e"
                "   WHERE e.room_id = p.room_id),"
                " COALESCE(f.resync_status, ?), f.first_resync_ts, f.last_resync_ts,"
                " COALESCE(f.resync_attempts, 0), f.last_error, f.progress"
                " FROM partial_state_rooms p"
                " LEFT JOIN fastjoin_rooms f ON f.room_id = p.room_id"
            )
            args: list[Any] = [STATUS_UNKNOWN]
            if room_id is not None:
                sql += " WHERE p.room_id = ?"
                args.append(room_id)
            txn.execute(sql + " ORDER BY p.room_id", args)
            rows = [dict(zip(_ROOM_COLUMNS, row)) for row in txn.fetchall()]
            for row in rows:
                row["progress"] = _load_json(row["progress"])
            return rows

        return await self._interaction("fastjoin_get_partial_state_rooms", txn_fn)

    async def get_history(
        self, room_id: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Finished resyncs, newest first."""

        def txn_fn(txn: LoggingTransaction) -> list[dict[str, Any]]:
            sql = f"SELECT {', '.join(_HISTORY_COLUMNS)} FROM fastjoin_resync_history"
            args: list[Any] = []
            if room_id is not None:
                sql += " WHERE room_id = ?"
                args.append(room_id)
            sql += " ORDER BY finished_ts DESC LIMIT ?"
            args.append(limit)
            txn.execute(sql, args)
            return [dict(zip(_HISTORY_COLUMNS, row)) for row in txn.fetchall()]

        return await self._interaction("fastjoin_get_history", txn_fn)

    async def last_complete_resync_ts(self, room_id: str) -> int | None:
        """When the room's newest complete resync ended (ms), if any."""

        def txn_fn(txn: LoggingTransaction) -> int | None:
            txn.execute(
                "SELECT MAX(finished_ts) FROM fastjoin_resync_history WHERE room_id = ? AND outcome = 'complete'",
                (room_id,),
            )
            row = txn.fetchone()
            return int(row[0]) if row and row[0] is not None else None

        return await self._interaction("fastjoin_last_complete_resync_ts", txn_fn)

    async def prune_history(self, before_ts: int) -> int:
        """Delete history rows that finished before `before_ts`; returns how many."""

        def txn_fn(txn: LoggingTransaction) -> int:
            txn.execute(
                "DELETE FROM fastjoin_resync_history WHERE finished_ts < ?", (before_ts,)
            )
            return txn.rowcount

        return await self._interaction("fastjoin_prune_history", txn_fn)

    async def forget_rooms_not_partial(self) -> int:
        """Drop module rows for rooms Synapse no longer holds in partial state
        (e.g. purged while partial), so the tables do not grow stale."""

        def txn_fn(txn: LoggingTransaction) -> int:
            txn.execute(
                "DELETE FROM fastjoin_rooms WHERE room_id NOT IN"
                " (SELECT room_id FROM partial_state_rooms)"
            )
            return txn.rowcount

        return await self._interaction("fastjoin_forget_rooms_not_partial", txn_fn)


    # Bounded inbound staging (storage/inbound.py).

    async def bound_inbound_queue(
        self, room_id: str, limit: int, now_ms: int, quick: bool = False
    ) -> tuple[int, int, int]:
        return await self._interaction(
            "fastjoin_bound_inbound_queue",
            inbound.bound_queue_txn,
            room_id,
            limit,
            now_ms,
            quick,
        )

    async def next_staged_events(self, room_id: str, limit: int) -> list[inbound.StagedEventRow]:
        return await self._interaction(
            "fastjoin_next_staged_events", inbound.next_staged_events_txn, room_id, limit
        )

    async def stage_received_events(self, rows: list[inbound.NewStagedRow]) -> None:
        await self._interaction(
            "fastjoin_stage_received_events", inbound.stage_received_events_txn, rows
        )

    async def remove_staged_events(self, rows: list[tuple[str, str]]) -> list[int]:
        return await self._interaction(
            "fastjoin_remove_staged_events", inbound.remove_staged_events_txn, rows
        )

    async def add_push_actions_to_staging(self, entries: list[StagedPushActions], now_ms: int) -> None:
        await self._interaction(
            "fastjoin_add_push_actions_to_staging", push_actions.add_push_actions_to_staging_txn, entries, now_ms
        )

    async def ignored_by(self, user_ids: Collection[str]) -> dict[str, frozenset[str]]:
        """For each of `user_ids`, who ignores it (Synapse's `ignored_by`, for
        many users at once)."""
        return await self._interaction("fastjoin_ignored_by", push_actions.ignored_by_txn, user_ids)

    async def finish_run(
        self, room_id: str, extremities: list[tuple[str, int]] | None, staged: list[tuple[str, str]]
    ) -> list[int]:
        """A persisted run's last writes, in one transaction: its
        forward-extremity history (`record_run_extremities_txn`, unless
        None) and the removal of its staged events (the received_ts of each
        row removed)."""

        def txn_fn(txn: LoggingTransaction) -> list[int]:
            if extremities is not None:
                events.record_run_extremities_txn(txn, room_id, extremities)
            return inbound.remove_staged_events_txn(txn, staged)

        return await self._interaction("fastjoin_finish_run", txn_fn)

    async def count_staged(self, room_id: str) -> int:
        return await self._interaction(
            "fastjoin_count_staged", inbound.count_staged_txn, room_id
        )

    async def get_dropped_pending(
        self, room_id: str, limit: int, now_ms: int
    ) -> list[tuple[str, str, int]]:
        return await self._interaction(
            "fastjoin_get_dropped_pending", inbound.get_pending_txn, room_id, limit, now_ms
        )

    async def begin_dropped_attempts(
        self, room_id: str, attempts: list[tuple[str, int]]
    ) -> None:
        await self._interaction(
            "fastjoin_begin_dropped_attempts", inbound.begin_attempts_txn, room_id, attempts
        )

    async def mark_dropped_restaged(
        self, room_id: str, event_ids: list[str], now_ms: int
    ) -> tuple[int, int]:
        return await self._interaction(
            "fastjoin_mark_dropped_restaged", inbound.mark_restaged_txn, room_id, event_ids, now_ms
        )

    async def mark_dropped_arrived(self, room_id: str, event_ids: list[str], now_ms: int) -> None:
        await self._interaction(
            "fastjoin_mark_dropped_arrived", inbound.mark_arrived_txn, room_id, event_ids, now_ms
        )

    async def mark_dropped_failed(
        self, room_id: str, event_id: str, error: str, give_up: bool, now_ms: int
    ) -> None:
        await self._interaction(
            "fastjoin_mark_dropped_failed",
            inbound.mark_failed_txn,
            room_id,
            event_id,
            error,
            give_up,
            now_ms,
        )

    async def rooms_with_dropped_pending(self) -> list[str]:
        return await self._interaction(
            "fastjoin_rooms_with_dropped_pending", inbound.rooms_with_pending_txn
        )

    async def inbound_queue_stats(self, room_id: str) -> dict[str, int]:
        return await self._interaction(
            "fastjoin_inbound_queue_stats", inbound.queue_stats_txn, room_id
        )

    async def prune_dropped_done(self, before_ts: int) -> int:
        return await self._interaction(
            "fastjoin_prune_dropped_done", inbound.prune_done_txn, before_ts
        )

    # What the fetch policy knows of each server of a room.

    async def get_room_servers(self, room_id: str) -> dict[str, servers.ServerRecord]:
        return await self._interaction(
            "fastjoin_get_room_servers", servers.get_room_servers_txn, room_id
        )

    async def save_room_servers(
        self, room_id: str, updates: dict[str, servers.ServerUpdate]
    ) -> None:
        await self._interaction(
            "fastjoin_save_room_servers", servers.save_room_servers_txn, room_id, updates
        )

    async def get_servers_in_backoff(self, names: list[str]) -> list[str]:
        return await self._interaction(
            "fastjoin_get_servers_in_backoff", servers.get_servers_in_backoff_txn, names
        )


def _load_json(raw: Any) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None
