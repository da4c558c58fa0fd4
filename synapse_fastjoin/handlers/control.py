"""What a server admin can do to a partial-state room's resync: retry it now
(through given servers first), or abort it for good.

Abort, in order:

1. every wait for the room's full state ends with an error at once
   (`FullStateWaits.abort`), and new ones fail until the abort is over;
2. every local user leaves the room (as Synapse's room shutdown makes them;
   with `purge`, through the shutdown handler itself, which also forgets the
   room for them);
3. the engine's resync is cancelled wherever it is, and Synapse's wrapper
   around it has returned (so it cannot restart it);
4. the partial-state records are removed (`storage.partial_state`);
5. the history gets a row with outcome `aborted`;
6. with `purge`, the room is purged as Synapse's room deletion does
   (`PaginationHandler.purge_room`).

A second abort while one is under way waits for that one and answers as it
does; once it is over the room is not partial any more and the answer is 404.
An abort is recorded (`fastjoin_rooms.resync_status`) before it starts: if
Synapse stops half-way, the next start finishes it (`resume_abort`), so the
room ends aborted, not half.
"""

import logging
import time
from typing import TYPE_CHECKING, Any, Iterable


from synapse.api.constants import Membership
from synapse.api.errors import Codes, NotFoundError, SynapseError
from synapse.logging.context import make_deferred_yieldable, run_in_background
from synapse.types import create_requester
from synapse.util.async_helpers import ObservableDeferred
from synapse.util.duration import Duration
from synapse.util.stringutils import parse_and_validate_server_name

from synapse_fastjoin.storage.partial_state import drop_partial_state

if TYPE_CHECKING:
    from synapse.server import HomeServer

    from synapse_fastjoin.handlers.waits import FullStateWaits
    from synapse_fastjoin.resync.engine import ResyncEngine
    from synapse_fastjoin.storage.store import FastJoinStore

logger = logging.getLogger(__name__)

# How long an abort waits for Synapse's resync wrapper to let go of the room.
_WRAPPER_WAIT_SECONDS = 30


def validate_via(value: Any, own_server_name: str) -> list[str]:
    """The `via` of a retry request: a list of server names. Our own name is
    dropped, duplicates too; order is kept.

    Raises:
        SynapseError: 400 M_INVALID_PARAM naming the bad entry.
    """
    if value is None:
        return []
    if not isinstance(value, list):
        raise SynapseError(400, "'via' must be a list of server names", Codes.INVALID_PARAM)
    servers: list[str] = []
    for entry in value:
        if not isinstance(entry, str):
            raise SynapseError(
                400, f"'via' must hold server names, not {entry!r}", Codes.INVALID_PARAM
            )
        try:
            parse_and_validate_server_name(entry)
        except ValueError:
            raise SynapseError(
                400, f"'via' holds an invalid server name: {entry!r}", Codes.INVALID_PARAM
            ) from None
        if entry != own_server_name and entry not in servers:
            servers.append(entry)
    return servers


class RoomControl:
    def __init__(
        self,
        hs: "HomeServer",
        store: "FastJoinStore",
        engine: "ResyncEngine | None",
        waits: "FullStateWaits",
    ) -> None:
        self._hs = hs
        self._main = hs.get_datastores().main
        self._clock = hs.get_clock()
        self._store = store
        self._engine = engine
        self._waits = waits
        self._aborts: dict[str, ObservableDeferred[dict[str, Any]]] = {}

    def is_aborting(self, room_id: str) -> bool:
        return room_id in self._aborts

    def resume_abort(self, room_id: str, purge: bool) -> None:
        """Finish an abort that a restart interrupted (in the background)."""
        if room_id in self._aborts:
            return
        logger.info("Abort of %s was under way when Synapse stopped: finishing it", room_id)

        async def run() -> None:
            # Registered before the first await: callers see it at once.
            if room_id not in self._aborts:
                await make_deferred_yieldable(
                    self._start_abort(room_id, purge, None).observe()
                )

        self._hs.run_as_background_process("fastjoin_resume_abort", run)

    def _start_abort(
        self, room_id: str, purge: bool, admin_user_id: str | None
    ) -> "ObservableDeferred[dict[str, Any]]":
        d = ObservableDeferred(
            run_in_background(self._abort, room_id, purge, admin_user_id),
            consumeErrors=True,
        )
        self._aborts[room_id] = d

        def done(result: Any) -> Any:
            self._aborts.pop(room_id, None)
            self._waits.aborted(room_id)
            return result

        d.observe().addBoth(done)
        return d

    async def _assert_partial(self, room_id: str) -> None:
        if not await self._main.is_partial_state_room(room_id):
            raise NotFoundError(f"{room_id} is not a partial-state room")

    def _assert_engine(self) -> "ResyncEngine":
        if self._engine is None:
            raise SynapseError(
                400,
                "the synapse-fastjoin resync engine is not enabled on this process "
                "(resync.engine: false, or a worker)",
                Codes.UNRECOGNIZED,
            )
        return self._engine

    # Retry.

    async def retry(self, room_id: str, via: list[str]) -> dict[str, Any]:
        """Wake the room's resync now, asking `via` first.

        Returns:
            `woken`: the resync was running here and was told to go on now;
            `started`: none was running, so one was started.
        """
        engine = self._assert_engine()
        if room_id in self._aborts:
            raise NotFoundError(f"the resync of {room_id} is being aborted")
        await self._assert_partial(room_id)
        progress = engine.progress.get(room_id)
        was_waiting = progress is not None and progress.phase == "waiting_to_retry"
        if engine.wake(room_id, via):
            logger.info("Admin retry of %s (via %s)", room_id, via)
            return {
                "room_id": room_id,
                "via": via,
                "running": True,
                "woken": was_waiting,
                "started": False,
            }
        # Not running here (it stopped after the last local user left, or it
        # is between Synapse's wrapper and the engine): start one, as Synapse
        # does on a rejoin.
        joined_via = None
        rows = await self._store.get_partial_state_rooms(room_id)
        if rows:
            joined_via = rows[0]["joined_via"]
        servers = await self._main.get_partial_state_servers_at_join(room_id) or set()
        first = via[0] if via else joined_via
        others = set(via[1:]) | set(servers) | ({joined_via} if joined_via else set())
        others.discard(first)
        others.discard(self._hs.hostname)
        self._hs.get_federation_handler()._start_partial_state_room_sync(
            initial_destination=first, other_destinations=others, room_id=room_id
        )
        if via:
            # The run registers itself on its first step; tell it then.
            for _ in range(50):
                if engine.wake(room_id, via):
                    break
                await self._clock.sleep(Duration(milliseconds=20))
        logger.info("Admin retry of %s: no resync was running, started one", room_id)
        return {"room_id": room_id, "via": via, "running": True, "woken": False, "started": True}

    # Abort.

    async def abort(self, room_id: str, purge: bool, admin_user_id: str) -> dict[str, Any]:
        existing = self._aborts.get(room_id)
        if existing is not None:
            return await make_deferred_yieldable(existing.observe())
        await self._assert_partial(room_id)
        if room_id in self._aborts:  # raced in while we looked
            return await make_deferred_yieldable(self._aborts[room_id].observe())
        d = self._start_abort(room_id, purge, admin_user_id)
        return await make_deferred_yieldable(d.observe())

    async def _abort(
        self, room_id: str, purge: bool, admin_user_id: str | None
    ) -> dict[str, Any]:
        started = time.monotonic()
        by = admin_user_id or "a server admin"
        logger.info("Abort of the resync of %s by %s (purge: %s)", room_id, by, purge)
        answered = self._waits.abort(room_id)
        await self._store.mark_aborting(room_id, purge, int(time.time() * 1000))
        left, failed = await self._leave_all(room_id, purge, admin_user_id)
        was_running = False
        if self._engine is not None:
            was_running = await self._engine.abort(room_id)
        await self._wait_for_wrapper(room_id)
        # Recorded while Synapse's row is still there (its join details).
        await self._store.record_resync_aborted(
            room_id, f"aborted by {by}", int(time.time() * 1000)
        )
        await drop_partial_state(self._hs, room_id)
        purged = False
        if purge and await self._main.get_room(room_id) is not None:
            await self._hs.get_pagination_handler().purge_room(room_id, force=False)
            purged = True
        logger.info(
            "Abort of %s done in %.1f s: %d users left, %d waiting requests answered%s",
            room_id,
            time.monotonic() - started,
            len(left),
            answered,
            ", room purged" if purged else "",
        )
        return {
            "room_id": room_id,
            "aborted": True,
            "resync_was_running": was_running,
            "left": left,
            "failed_to_leave": failed,
            "requests_answered": answered,
            "purged": purged,
        }

    async def _leave_all(
        self, room_id: str, purge: bool, admin_user_id: str | None
    ) -> tuple[list[str], list[str]]:
        if purge:
            # Synapse's room deletion: every local user leaves and forgets it.
            result = await self._hs.get_room_shutdown_handler().shutdown_room(
                room_id,
                {
                    "requester_user_id": admin_user_id,
                    "new_room_user_id": None,
                    "new_room_name": None,
                    "message": None,
                    "block": False,
                    "purge": True,
                    "force_purge": False,
                },
            )
            assert result is not None
            return list(result["kicked_users"]), list(result["failed_to_kick_users"])
        left: list[str] = []
        failed: list[str] = []
        member_handler = self._hs.get_room_member_handler()
        users = await self._main.get_local_users_related_to_room(room_id)
        for user_id, membership in _leavable(users):
            requester = create_requester(user_id, authenticated_entity=admin_user_id)
            try:
                await member_handler.update_membership(
                    requester=requester,
                    target=requester.user,
                    room_id=room_id,
                    action=Membership.LEAVE,
                    content={},
                    ratelimit=False,
                    require_consent=False,
                )
                left.append(user_id)
            except Exception:
                logger.exception("Abort of %s: %s could not leave", room_id, user_id)
                failed.append(user_id)
        return left, failed

    async def _wait_for_wrapper(self, room_id: str) -> None:
        """Synapse's resync wrapper still holds the room for a moment after the
        engine returns (it records the end, and may restart the resync if the
        room is still partial and someone joined meanwhile). Wait until it has
        let go, so that it does not start a new resync of an aborted room."""
        active = self._hs.get_federation_handler()._active_partial_state_syncs
        deadline = time.monotonic() + _WRAPPER_WAIT_SECONDS
        while room_id in active and time.monotonic() < deadline:
            await self._clock.sleep(Duration(milliseconds=50))
        if room_id in active:
            logger.warning("Abort of %s: Synapse's resync of the room is still running", room_id)


def _leavable(users: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [
        (u, m) for u, m in users if m in (Membership.JOIN, Membership.INVITE, Membership.KNOCK)
    ]
