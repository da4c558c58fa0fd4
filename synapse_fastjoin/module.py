"""`FastJoinModule`: the class admins list under `modules:` in homeserver.yaml."""

import logging
import time
from typing import Any, Collection, Mapping

from synapse.config._base import ConfigError
from synapse.http.server import HttpServer
from synapse.module_api import ModuleApi
from synapse.server import HomeServer
from synapse.util.duration import Duration

from synapse_fastjoin import patching
from synapse_fastjoin.admin import servlets as admin_servlets
from synapse_fastjoin.config import FastJoinConfig, parse_config
from synapse_fastjoin.federation.destinations import PartialStateDestinations
from synapse_fastjoin.federation.device_lists import DeviceListReplay
from synapse_fastjoin.federation.staging import BatchStaging
from synapse_fastjoin.federation.state_ids import OwnEventStateIds
from synapse_fastjoin.handlers.control import RoomControl
from synapse_fastjoin.handlers.inbound_queue import InboundQueue
from synapse_fastjoin.handlers.make_join import MakeJoinState
from synapse_fastjoin.handlers.partial_auth import PartialStateAuth
from synapse_fastjoin.handlers.presence import JoinFanout, PartialStatePresence
from synapse_fastjoin.handlers.provisional_rejections import ProvisionalRejections
from synapse_fastjoin.handlers.staged_runs import StagedRuns
from synapse_fastjoin.handlers.state_deltas import StateDeltaMemberships
from synapse_fastjoin.handlers.user_directory import UserDirectoryBatcher
from synapse_fastjoin.handlers.waits import FullStateWaits
from synapse_fastjoin.metrics import FastJoinMetrics
from synapse_fastjoin.resync.engine import ResyncEngine
from synapse_fastjoin.storage import sqlite_batch
from synapse_fastjoin.storage.partial_state import mark_partial_again
from synapse_fastjoin.storage.room_turns import room_turns
from synapse_fastjoin.storage.store import OUTCOME_ABORTED, FastJoinStore

logger = logging.getLogger(__name__)

# The version of the hook API (patch 0001) this code was written against.
HOOKS_API_VERSION = 17

_DAY_MS = 24 * 60 * 60 * 1000

# How often dropped inbound events are looked for to fetch again (they are
# also fetched when a room's queue drains, and after a resync).
_INBOUND_REFILL_INTERVAL_MS = 5000

# How long after a join or a resync's start or end the metrics' database
# gauges are re-read (they are also re-read every 15 s).
_METRICS_REFRESH_DELAY_SECONDS = 2


def _now_ms() -> int:
    return int(time.time() * 1000)


class FastJoinModule:
    """Follows Synapse's partial-state joins, records them, and serves them on
    the admin API.

    Synapse refuses to start with this module enabled unless the installed
    Synapse is the version the patch series targets and every patch of the
    series is applied: without the hooks the module would silently do nothing.
    """

    def __init__(self, config: FastJoinConfig, api: ModuleApi):
        _check_series()
        self._config = config
        self._api = api
        self._is_main_process = api.worker_app is None
        self.store = FastJoinStore(
            api.run_db_interaction, may_migrate=self._is_main_process
        )

        # On SQLite, batched inserts as multi-row statements (any process).
        if config.resync.sqlite_multi_row_inserts and sqlite_batch.install(api._hs):
            logger.info("SQLite: batched inserts are sent as multi-row statements (patch 0035)")

        # Partial-state rooms' inbound queues: kept whole and bounded.
        self.inbound_queue = InboundQueue(
            api._hs,
            self.store,
            config.resync.inbound_queue_limit,
            api.run_as_background_process,
        )

        # Synapse runs resyncs on the main process only; so does the engine.
        self.engine: ResyncEngine | None = None
        if config.resync.engine and self._is_main_process:
            self.engine = ResyncEngine(api._hs, config.resync, self.store)

        # Runs of a room's staged inbound events, processed together; kept out
        # of the end of a resync run by this process.
        self.staged_runs = StagedRuns(
            api._hs,
            self.store,
            config.resync.inbound_run_length,
            self.engine.finish_gate if self.engine is not None else None,
        )

        # Bounded waits for full state (any process), and the admin's retry and
        # abort (main process: where resyncs run).
        self.waits = FullStateWaits(
            api._hs, config.client_wait_timeout_seconds, self._live_progress
        )
        self.control: RoomControl | None = None
        if self._is_main_process:
            self.control = RoomControl(api._hs, self.store, self.engine, self.waits)

        # MSC3902 beyond the resync: where our events go while partial, and
        # /state_ids for them (any process that sends or serves federation).
        self.destinations = PartialStateDestinations(api._hs)
        self.own_state_ids = OwnEventStateIds(api._hs)
        self.device_list_replay = DeviceListReplay(api._hs)
        # The auth state of events received while partial (any process).
        self.partial_auth = PartialStateAuth(api._hs)
        # Presence from the servers of partial-state rooms (any process that
        # serves /sync).
        self.presence = PartialStatePresence(api._hs)
        # Auth events rejected against partial state only (any process that
        # receives federation events).
        self.provisional_rejections = ProvisionalRejections(api._hs)
        self.user_directory = UserDirectoryBatcher()
        self.make_join_state = MakeJoinState(api._hs)
        # A /send transaction's PDUs of a room, checked and staged together
        # (any process that receives federation).
        self.batch_staging = BatchStaging(api._hs, self.store)

        # The memberships of a batch of state deltas, for the stats and
        # presence handlers (whichever process runs them).
        self.state_delta_memberships = StateDeltaMemberships(api._hs)
        # Who was in a room before a join, for the presence handler's fan-out
        # (whichever process runs it), from counts the database keeps.
        self.join_fanout = JoinFanout(api._hs, self.store)

        api.register_fastjoin_callbacks(  # type: ignore[attr-defined]
            on_partial_state_join=self._on_partial_state_join,
            on_resync_started=self._on_resync_started,
            on_resync_finished=self._on_resync_finished,
            register_admin_servlets=(
                self._register_admin_servlets if config.admin_api else None
            ),
            resync_room=self._resync_room if self.engine else None,
            may_prune_staged_events=(
                self.inbound_queue.may_prune if config.resync.keep_inbound_queue else None
            ),
            await_full_state=(
                self.waits.await_full_state
                if config.client_wait_timeout_seconds or self.control
                else None
            ),
            partial_state_destinations=self.destinations.destinations,
            state_ids_while_partial=self.own_state_ids.state_ids_while_partial,
            device_list_replay_hosts=self.device_list_replay.replay_hosts,
            state_for_auth_while_partial=self.partial_auth.state_for_auth_while_partial,
            presence_users_in_partial_rooms=self.presence.users_in_partial_rooms,
            auth_events_while_partial=self.provisional_rejections.auth_events_while_partial,
            user_directory_deltas=self.user_directory.handle_deltas,
            joined_member_count=self.store.joined_member_count,
            make_join_state_ids=self.make_join_state.state_ids,
            state_delta_memberships=self.state_delta_memberships.memberships,
            presence_join_fanout=self.join_fanout.prev_members,
            current_hosts_in_room=self.store.current_hosts_in_room,
            on_inbound_event_staged=(
                self.inbound_queue.on_staged if config.resync.keep_inbound_queue else None
            ),
            # Our writes to a room's events take turns with the tasks of
            # Synapse's persistence queue (any process that persists events).
            persistence_turn=room_turns(api._hs).synapse_turn,
            process_staged_run=(
                self.staged_runs.process_staged_run if config.resync.inbound_run_length else None
            ),
            stage_received_pdus=(
                self.batch_staging.stage_received_pdus if config.resync.batch_inbound_staging else None
            ),
        )

        # Prometheus metrics (served by Synapse's metrics listener), main only.
        self.metrics: FastJoinMetrics | None = None
        if self._is_main_process:
            self.metrics = FastJoinMetrics(
                api,
                self.engine,
                self.inbound_queue.stats,
                self.staged_runs.stats,
                self.batch_staging.stats,
                self.partial_auth,
            )
            self.metrics.start()

        if self._is_main_process:
            api.run_as_background_process("fastjoin_startup", self._startup)
            if config.resync.keep_inbound_queue:
                api.looping_background_call(
                    self.inbound_queue.refill_all,
                    _INBOUND_REFILL_INTERVAL_MS,
                    desc="fastjoin_inbound_refill",
                )
            if config.history_retention_days:
                api.looping_background_call(
                    self._prune_history,
                    config.history_prune_interval_minutes * 60 * 1000,
                    desc="fastjoin_prune_history",
                )
        logger.info("synapse-fastjoin enabled: %s", config)

    @staticmethod
    def parse_config(config: Mapping[str, Any] | None) -> FastJoinConfig:
        return parse_config(config)

    async def _startup(self) -> None:
        await self.store.ensure_schema()
        if self.control is not None:
            # Aborts a restart interrupted (resumed resyncs of partial rooms
            # find them too, see _resync_room).
            for room_id, purge in (await self.store.get_aborting()).items():
                self.control.resume_abort(room_id, purge)
        forgotten = await self.store.forget_rooms_not_partial()
        if forgotten:
            logger.info("Forgot %d rooms that are no longer partial-state", forgotten)
        await self._prune_history()
        if self._config.resync.keep_inbound_queue:
            try:
                await self.inbound_queue.startup()
            except Exception:
                # The periodic refill and Synapse's own handling take over.
                logger.exception("Resuming the inbound queues after the restart failed")
        if self.metrics is not None:
            await self.metrics.database_ready()

    async def _prune_history(self) -> None:
        if not self._config.history_retention_days:
            return
        cutoff = _now_ms() - self._config.history_retention_days * _DAY_MS
        pruned = await self.store.prune_history(cutoff)
        if pruned:
            logger.info("Pruned %d finished resyncs from the history", pruned)
        # Dropped inbound events fetched again (or given up on) long ago.
        await self.store.prune_dropped_done(cutoff)

    async def _resync_room(
        self,
        room_id: str,
        initial_destination: str | None,
        other_destinations: Collection[str],
    ) -> None:
        """The engine's resync, unless an admin's abort of the room was under
        way when Synapse stopped: then that is finished instead."""
        assert self.engine is not None
        if self.control is not None:
            aborting = await self.store.get_aborting()
            if room_id in aborting:
                self.control.resume_abort(room_id, aborting[room_id])
                return
        await self.engine.resync_room(room_id, initial_destination, other_destinations)

    async def _on_partial_state_join(
        self,
        room_id: str,
        join_event_id: str,
        joined_via: str,
        servers_in_room: Collection[str],
    ) -> None:
        logger.info(
            "Partial-state join of %s via %s (join event %s, %d servers known)",
            room_id,
            joined_via,
            join_event_id,
            len(servers_in_room),
        )
        if self._config.resync.keep_inbound_queue:
            self.inbound_queue.partial_join(room_id)
        last_outcome = await self.store.record_partial_state_join(
            room_id, join_event_id, joined_via, _now_ms()
        )
        if last_outcome == OUTCOME_ABORTED:
            # Rejoining a room whose resync an admin aborted.
            await mark_partial_again(self._api._hs, room_id)
        self._refresh_metrics()

    async def _on_resync_started(
        self,
        room_id: str,
        initial_destination: str | None,
        other_destinations: Collection[str],
    ) -> None:
        logger.info(
            "Resync of %s started (first via %s, %d other servers)",
            room_id,
            initial_destination,
            len(other_destinations),
        )
        await self.store.record_resync_started(room_id, _now_ms())
        self._refresh_metrics()  # the join event is stored by now

    async def _on_resync_finished(
        self, room_id: str, complete: bool, error: str | None
    ) -> None:
        if complete:
            # Its auth graph is of no more use here (workers drop theirs as
            # other rooms need the room).
            self.partial_auth.forget_room(room_id)
        if self.control is not None and self.control.is_aborting(room_id):
            return  # the abort records the end itself, as `aborted`
        if complete and await self._api._store.get_room(room_id) is None:
            # Not done: deleted (Synapse's room deletion purges the partial
            # state with the rest).
            logger.info("Resync of %s ended: the room was deleted", room_id)
            await self.store.record_resync_aborted(
                room_id, "the room was deleted during the resync", _now_ms()
            )
            return
        if complete:
            logger.info("Resync of %s complete: the room has full state", room_id)
        else:
            logger.warning(
                "Resync of %s ended with the room still partial: %s", room_id, error
            )
        if self.metrics is not None:
            await self.metrics.resync_finished(room_id, complete, error)
        await self.store.record_resync_finished(room_id, complete, error, _now_ms())
        if complete and self._config.resync.keep_inbound_queue:
            # Kept a while longer (the live events of the resync's end arrive
            # while the join's after-work runs); and what was dropped from the
            # queue while partial is fetched again, if its queue has room.
            self.inbound_queue.resync_complete(room_id)
            self.inbound_queue.schedule_refill(room_id)
        if complete:
            try:
                await self.destinations.reconcile(room_id)
            except Exception:
                logger.exception("Sending our events to the servers missed in %s failed", room_id)
        self._refresh_metrics()

    def _refresh_metrics(self) -> None:
        """Re-read the database gauges soon, in the background: a join or a
        resync must not wait for the metrics, nor share the database with them
        at its busiest moment (the state arriving)."""
        if self.metrics is not None:
            metrics = self.metrics
            self._api._hs.get_clock().call_later(
                Duration(seconds=_METRICS_REFRESH_DELAY_SECONDS),
                self._api.run_as_background_process,
                "fastjoin_metrics_refresh",
                metrics.refresh,
            )

    def _register_admin_servlets(self, hs: HomeServer, http_server: HttpServer) -> None:
        admin_servlets.register_servlets(
            hs,
            http_server,
            self.store,
            self._live_progress,
            self.control,
            self._inbound_queue_info if self._config.resync.keep_inbound_queue else None,
        )

    async def _inbound_queue_info(self, room_id: str) -> dict[str, Any]:
        return await self.inbound_queue.room_json(room_id)

    def _live_progress(self, room_id: str) -> dict[str, Any] | None:
        if self.engine is None:
            return None
        progress = self.engine.progress.get(room_id)
        return progress.as_json() if progress is not None else None


def _check_series() -> None:
    """Refuse to run unless the shipped patch series is applied to this Synapse.

    Raises:
        ConfigError: saying what is wrong and which command fixes it.
    """
    try:
        patching.verify_applied()
    except patching.PatchSeriesError as e:
        raise ConfigError(f"synapse-fastjoin cannot start: {e}") from None

    from synapse.module_api.callbacks import fastjoin_callbacks

    if fastjoin_callbacks.FASTJOIN_HOOKS_API_VERSION != HOOKS_API_VERSION:
        raise ConfigError(
            "synapse-fastjoin cannot start: the applied patch series provides hook "
            f"API version {fastjoin_callbacks.FASTJOIN_HOOKS_API_VERSION}, this module "
            f"needs {HOOKS_API_VERSION}; run `synapse-fastjoin patches revert` with the "
            "old module, then `synapse-fastjoin patches apply` with this one"
        )
