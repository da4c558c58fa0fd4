"""Admin API: /_synapse/admin/v1/fastjoin/...

Served by Synapse's own admin resource (patch 0003 lets the module add servlets
to it), so authentication and errors are Synapse's: 401 without a valid token,
403 for a user who is not a server admin.
"""

from typing import TYPE_CHECKING, Any, Awaitable, Callable

from synapse.api.errors import Codes, NotFoundError, SynapseError
from synapse.http.server import HttpServer
from synapse.http.servlet import (
    RestServlet,
    parse_integer,
    parse_json_object_from_request,
    parse_string,
)
from synapse.http.site import SynapseRequest
from synapse.rest.admin._base import (
    admin_patterns,
    assert_requester_is_admin,
    assert_user_is_admin,
)
from synapse.types import JsonDict

from synapse_fastjoin.handlers.control import validate_via

if TYPE_CHECKING:
    from synapse.server import HomeServer

    from synapse_fastjoin.handlers.control import RoomControl
    from synapse_fastjoin.storage.store import FastJoinStore


LiveProgress = Callable[[str], "dict[str, Any] | None"]
"""The engine's in-memory progress of a room being resynced right now."""

InboundQueueInfo = Callable[[str], Awaitable["dict[str, Any] | None"]]
"""A room's inbound queue (handlers/inbound_queue.py), or None without it."""


async def _no_queue_info(room_id: str) -> None:
    return None


def _room_json(
    row: dict[str, Any], live: LiveProgress, queue: "dict[str, Any] | None" = None
) -> JsonDict:
    running = live(row["room_id"])
    return {
        "room_id": row["room_id"],
        "join_event_id": row["join_event_id"],
        "joined_via": row["joined_via"],
        "joined_ts": row["joined_ts"],
        "known_servers": row["known_servers"],
        "partial_state_events_remaining": row["partial_state_events_remaining"],
        "resync": {
            "status": row["resync_status"],
            "attempts": row["resync_attempts"],
            "first_started_ts": row["first_resync_ts"],
            "last_started_ts": row["last_resync_ts"],
            "last_error": row["last_error"],
            # Whether the engine is working on it in this process right now;
            # `progress` is live if so, else the last checkpoint (or null).
            "running": running is not None,
            "progress": running if running is not None else row["progress"],
        },
        # Inbound events queued for the room, and those dropped past the
        # queue's bound and fetched again (null: the queue is not kept).
        "inbound_queue": queue,
    }


def _history_json(row: dict[str, Any]) -> JsonDict:
    joined_ts = row["joined_ts"]
    first_resync_ts = row["first_resync_ts"]
    finished_ts = row["finished_ts"]
    return {
        **row,
        # From the join (when known) to the end of the resync: what a user waits.
        "duration_ms": None if joined_ts is None else finished_ts - joined_ts,
        "resync_duration_ms": (
            None if first_resync_ts is None else finished_ts - first_resync_ts
        ),
    }


class _AdminServlet(RestServlet):
    def __init__(
        self,
        hs: "HomeServer",
        store: "FastJoinStore",
        live: LiveProgress,
        queue_info: InboundQueueInfo = _no_queue_info,
    ):
        super().__init__()
        self._auth = hs.get_auth()
        self._store = store
        self._live = live
        self._queue_info = queue_info


class PartialStateRoomsServlet(_AdminServlet):
    """GET /_synapse/admin/v1/fastjoin/rooms: every partial-state room."""

    PATTERNS = admin_patterns("/fastjoin/rooms$")

    async def on_GET(self, request: SynapseRequest) -> tuple[int, JsonDict]:
        await assert_requester_is_admin(self._auth, request)
        rooms = [
            _room_json(r, self._live, await self._queue_info(r["room_id"]))
            for r in await self._store.get_partial_state_rooms()
        ]
        return 200, {"rooms": rooms, "total": len(rooms)}


class PartialStateRoomServlet(_AdminServlet):
    """GET /_synapse/admin/v1/fastjoin/rooms/{roomId}: one partial-state room,
    404 if the room is not (or no longer) partial."""

    PATTERNS = admin_patterns("/fastjoin/rooms/(?P<room_id>[^/]+)$")

    async def on_GET(
        self, request: SynapseRequest, room_id: str
    ) -> tuple[int, JsonDict]:
        await assert_requester_is_admin(self._auth, request)
        rows = await self._store.get_partial_state_rooms(room_id)
        if not rows:
            raise NotFoundError(f"{room_id} is not a partial-state room")
        return 200, _room_json(rows[0], self._live, await self._queue_info(room_id))


class ResyncHistoryServlet(_AdminServlet):
    """GET /_synapse/admin/v1/fastjoin/history[?room_id=...&limit=N]: finished
    resyncs, newest first, with their durations."""

    PATTERNS = admin_patterns("/fastjoin/history$")

    async def on_GET(self, request: SynapseRequest) -> tuple[int, JsonDict]:
        await assert_requester_is_admin(self._auth, request)
        room_id = parse_string(request, "room_id")
        limit = parse_integer(request, "limit", default=100)
        if not 1 <= limit <= 1000:
            raise SynapseError(400, "limit must be between 1 and 1000")
        rows = await self._store.get_history(room_id, limit)
        return 200, {"resyncs": [_history_json(r) for r in rows]}


class RetryResyncServlet(RestServlet):
    """POST /_synapse/admin/v1/fastjoin/rooms/{roomId}/retry, body (optional)
    `{"via": ["server", ...]}`: retry the resync now, asking `via` first."""

    PATTERNS = admin_patterns("/fastjoin/rooms/(?P<room_id>[^/]+)/retry$")

    def __init__(self, hs: "HomeServer", control: "RoomControl"):
        super().__init__()
        self._auth = hs.get_auth()
        self._hostname = hs.hostname
        self._control = control

    async def on_POST(
        self, request: SynapseRequest, room_id: str
    ) -> tuple[int, JsonDict]:
        await assert_requester_is_admin(self._auth, request)
        body = parse_json_object_from_request(request, allow_empty_body=True)
        via = validate_via(body.get("via"), self._hostname)
        return 200, await self._control.retry(room_id, via)


class AbortResyncServlet(RestServlet):
    """POST /_synapse/admin/v1/fastjoin/rooms/{roomId}/abort, body (optional)
    `{"purge": bool}`: stop the resync for good; every local user leaves the
    room; with `purge`, the room is deleted as Synapse's room deletion does."""

    PATTERNS = admin_patterns("/fastjoin/rooms/(?P<room_id>[^/]+)/abort$")

    def __init__(self, hs: "HomeServer", control: "RoomControl"):
        super().__init__()
        self._auth = hs.get_auth()
        self._control = control

    async def on_POST(
        self, request: SynapseRequest, room_id: str
    ) -> tuple[int, JsonDict]:
        requester = await self._auth.get_user_by_req(request)
        await assert_user_is_admin(self._auth, requester)
        body = parse_json_object_from_request(request, allow_empty_body=True)
        purge = body.get("purge", False)
        if not isinstance(purge, bool):
            raise SynapseError(400, "'purge' must be true or false", Codes.INVALID_PARAM)
        return 200, await self._control.abort(room_id, purge, requester.user.to_string())


def register_servlets(
    hs: "HomeServer",
    http_server: HttpServer,
    store: "FastJoinStore",
    live: LiveProgress = lambda room_id: None,
    control: "RoomControl | None" = None,
    queue_info: InboundQueueInfo | None = None,
) -> None:
    """Add the module's admin servlets to Synapse's admin resource."""
    queue_info = queue_info or _no_queue_info
    PartialStateRoomsServlet(hs, store, live, queue_info).register(http_server)
    PartialStateRoomServlet(hs, store, live, queue_info).register(http_server)
    ResyncHistoryServlet(hs, store, live).register(http_server)
    if control is not None:
        RetryResyncServlet(hs, control).register(http_server)
        AbortResyncServlet(hs, control).register(http_server)
