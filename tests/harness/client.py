"""Asynchronous Matrix client-server API calls for end-to-end tests (treq/Twisted).

Used from ``@pytest_twisted.ensureDeferred`` tests::

    api = ClientAPI(server.client_url, token)
    room_id = await api.create_room(preset="public_chat")
    status, body = await api.post(f"/_matrix/client/v3/join/{room_id}")

The raw verbs (:meth:`ClientAPI.get` / ``post`` / ``put``) never raise on HTTP
error statuses - they return ``(status, body)`` so tests can assert on
failures.  The convenience helpers raise :class:`MatrixRequestError` on a
non-2xx answer because they return parsed results.  Every call has a bounded
timeout (:class:`RequestTimeout` when it expires) so no test can hang on a
server that never answers (e.g. one that is paused).
"""

from __future__ import annotations

import inspect
import itertools
import json
import time
import urllib.parse
from typing import Any, Awaitable, Callable, Mapping, Sequence, TypeVar

import treq
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent, HTTPConnectionPool

__all__ = [
    "ClientAPI",
    "MatrixRequestError",
    "RequestTimeout",
    "poll_until",
    "sleep",
]

T = TypeVar("T")

#: Default per-request timeout in seconds.
DEFAULT_TIMEOUT = 30.0

_txn_counter = itertools.count(1)


def _reactor() -> Any:
    """The global reactor, imported lazily.

    Importing ``twisted.internet.reactor`` installs the default reactor; doing
    that when ``tests/conftest.py`` is loaded would pre-empt pytest-twisted's
    ``--reactor`` choice, so it only happens on first use.
    """
    from twisted.internet import reactor

    return reactor


class MatrixRequestError(Exception):
    """A helper got a non-2xx answer; carries ``method``, ``path``, ``status``, ``body``."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        super().__init__(f"{method} {path} -> {status}: {body!r}")
        self.method = method
        self.path = path
        self.status = status
        self.body = body


class RequestTimeout(TimeoutError):
    """No complete response arrived within the request's timeout."""


def quote(value: str) -> str:
    """Percent-encode a path segment (room IDs, aliases, user IDs, event types)."""
    return urllib.parse.quote(value, safe="")


async def sleep(seconds: float) -> None:
    """Non-blocking sleep on the Twisted reactor."""
    d: defer.Deferred[None] = defer.Deferred()
    clock: IReactorTime = _reactor()
    clock.callLater(seconds, d.callback, None)
    await d


async def poll_until(
    check: Callable[[], Awaitable[T | None]] | Callable[[], T | None],
    timeout: float = 30.0,
    interval: float = 0.2,
    description: str = "condition",
) -> T:
    """Call ``check`` until it returns something truthy; return that value.

    ``check`` may be sync or async.  Raises ``TimeoutError`` naming
    ``description`` (and the last value seen) once ``timeout`` seconds pass, so
    waits on other servers are always bounded.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        last = result
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"timed out after {timeout:.0f}s waiting for {description} (last: {last!r})"
            )
        await sleep(interval)


class ClientAPI:
    """A Matrix client-server API session against one homeserver's client port.

    Args:
        base_url: e.g. ``http://127.0.0.1:8008`` (no trailing slash needed).
        access_token: sent as a Bearer token when set.
        default_timeout: seconds allowed per request when a call passes none.

    Connections are not kept alive (``persistent=False``): servers in these
    tests are restarted and paused, and a stale pooled connection would turn
    into a confusing error on an otherwise fine request.
    """

    def __init__(
        self,
        base_url: str,
        access_token: str | None = None,
        default_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.access_token = access_token
        self.default_timeout = default_timeout
        reactor = _reactor()
        pool = HTTPConnectionPool(reactor, persistent=False)
        self._http = HTTPClient(Agent(reactor, pool=pool))

    def __repr__(self) -> str:
        return f"<ClientAPI {self.base_url}>"

    # ------------------------------------------------------------- raw verbs

    async def request(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        params: Mapping[str, str | Sequence[str]] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, Any]:
        """Send one request; return ``(status, body)`` whatever the status.

        ``body`` is the decoded JSON, ``None`` for an empty body, or the text
        if it was not JSON.  ``path`` may already contain a query string;
        ``params`` are appended (sequence values repeat the key).  Raises
        :class:`RequestTimeout` if the full response does not arrive within
        ``timeout`` seconds (connection errors propagate as they are).
        """
        timeout = self.default_timeout if timeout is None else timeout
        url = self.base_url + path
        if params:
            query = urllib.parse.urlencode(
                [
                    (k, v)
                    for k, vs in params.items()
                    for v in ([vs] if isinstance(vs, str) else vs)
                ]
            )
            url += ("&" if "?" in url else "?") + query
        headers: dict[str, list[str]] = {}
        if self.access_token:
            headers["Authorization"] = [f"Bearer {self.access_token}"]
        data: bytes | None = None
        if json_body is not None:
            data = json.dumps(json_body).encode()
            headers["Content-Type"] = ["application/json"]

        async def _do() -> tuple[int, bytes]:
            response = await self._http.request(
                method, url, headers=headers, data=data
            )
            content = await treq.content(response)
            return response.code, content

        # Cancelling an in-flight request surfaces as different exception types
        # depending on how far it got (CancelledError, ResponseNeverReceived,
        # ...), so remember that *we* cancelled it and translate any failure.
        d = defer.ensureDeferred(_do())
        timed_out = False

        def _expire() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        timer = _reactor().callLater(timeout, _expire)
        try:
            status, raw = await d
        except Exception as e:
            if timed_out:
                raise RequestTimeout(f"{method} {url}: no response within {timeout}s") from e
            raise
        finally:
            if timer.active():
                timer.cancel()
        if not raw:
            return status, None
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode("utf-8", errors="replace")

    async def get(
        self,
        path: str,
        json: Any = None,
        timeout: float | None = None,
        params: Mapping[str, str | Sequence[str]] | None = None,
    ) -> tuple[int, Any]:
        """``GET path`` -> ``(status, body)``; never raises on HTTP errors."""
        return await self.request("GET", path, json, params=params, timeout=timeout)

    async def post(
        self,
        path: str,
        json: Any = None,
        timeout: float | None = None,
        params: Mapping[str, str | Sequence[str]] | None = None,
    ) -> tuple[int, Any]:
        """``POST path`` (JSON body, ``{}`` if none) -> ``(status, body)``."""
        return await self.request(
            "POST", path, {} if json is None else json, params=params, timeout=timeout
        )

    async def put(
        self,
        path: str,
        json: Any = None,
        timeout: float | None = None,
        params: Mapping[str, str | Sequence[str]] | None = None,
    ) -> tuple[int, Any]:
        """``PUT path`` (JSON body, ``{}`` if none) -> ``(status, body)``."""
        return await self.request(
            "PUT", path, {} if json is None else json, params=params, timeout=timeout
        )

    async def delete(
        self,
        path: str,
        json: Any = None,
        timeout: float | None = None,
        params: Mapping[str, str | Sequence[str]] | None = None,
    ) -> tuple[int, Any]:
        """``DELETE path`` -> ``(status, body)``; never raises on HTTP errors."""
        return await self.request("DELETE", path, json, params=params, timeout=timeout)

    async def _ok(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        params: Mapping[str, str | Sequence[str]] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Like :meth:`request` but raise :class:`MatrixRequestError` unless 2xx."""
        status, body = await self.request(method, path, json_body, params, timeout)
        if not 200 <= status < 300:
            raise MatrixRequestError(method, path, status, body)
        return body

    # --------------------------------------------------------------- helpers

    async def whoami(self, timeout: float | None = None) -> str:
        """The user ID the access token belongs to."""
        body = await self._ok("GET", "/_matrix/client/v3/account/whoami", timeout=timeout)
        return str(body["user_id"])

    async def create_room(self, timeout: float | None = None, **body: Any) -> str:
        """``POST /createRoom`` with ``body`` (e.g. ``preset="public_chat"``); return room ID."""
        result = await self._ok("POST", "/_matrix/client/v3/createRoom", body, timeout=timeout)
        return str(result["room_id"])

    async def join(
        self,
        room_id_or_alias: str,
        server_name: str | Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> str:
        """``POST /join/{room}`` (``?server_name=`` for each given server); return room ID."""
        params = None if server_name is None else {"server_name": server_name}
        result = await self._ok(
            "POST",
            f"/_matrix/client/v3/join/{quote(room_id_or_alias)}",
            {},
            params=params,
            timeout=timeout,
        )
        return str(result["room_id"])

    async def leave(self, room_id: str, timeout: float | None = None) -> None:
        """``POST /rooms/{room}/leave``."""
        await self._ok(
            "POST", f"/_matrix/client/v3/rooms/{quote(room_id)}/leave", {}, timeout=timeout
        )

    async def invite(self, room_id: str, user_id: str, timeout: float | None = None) -> None:
        """``POST /rooms/{room}/invite`` for ``user_id``."""
        await self._ok(
            "POST",
            f"/_matrix/client/v3/rooms/{quote(room_id)}/invite",
            {"user_id": user_id},
            timeout=timeout,
        )

    async def send_event(
        self,
        room_id: str,
        event_type: str,
        content: Mapping[str, Any],
        timeout: float | None = None,
    ) -> str:
        """``PUT /rooms/{room}/send/{type}/{txn}`` with a fresh txn ID; return event ID."""
        txn = f"t{time.time_ns()}.{next(_txn_counter)}"
        result = await self._ok(
            "PUT",
            f"/_matrix/client/v3/rooms/{quote(room_id)}/send/{quote(event_type)}/{txn}",
            dict(content),
            timeout=timeout,
        )
        return str(result["event_id"])

    async def send_message(self, room_id: str, text: str, timeout: float | None = None) -> str:
        """Send an ``m.room.message`` / ``m.text`` event; return its event ID."""
        return await self.send_event(
            room_id, "m.room.message", {"msgtype": "m.text", "body": text}, timeout=timeout
        )

    async def send_state(
        self,
        room_id: str,
        event_type: str,
        content: Mapping[str, Any],
        state_key: str = "",
        timeout: float | None = None,
    ) -> str:
        """``PUT /rooms/{room}/state/{type}/{state_key}``; return event ID."""
        result = await self._ok(
            "PUT",
            f"/_matrix/client/v3/rooms/{quote(room_id)}/state/{quote(event_type)}/"
            f"{quote(state_key)}",
            dict(content),
            timeout=timeout,
        )
        return str(result["event_id"])

    async def members(
        self, room_id: str, timeout: float | None = None, **params: str
    ) -> list[dict[str, Any]]:
        """``GET /rooms/{room}/members`` -> the ``chunk`` of membership events.

        Note: for a partial-state room this blocks until the resync finishes.
        """
        body = await self._ok(
            "GET",
            f"/_matrix/client/v3/rooms/{quote(room_id)}/members",
            params=params or None,
            timeout=timeout,
        )
        return list(body["chunk"])

    async def joined_members(
        self, room_id: str, timeout: float | None = None
    ) -> dict[str, dict[str, Any]]:
        """``GET /rooms/{room}/joined_members`` -> ``{user_id: profile}``.

        Note: for a partial-state room this blocks until the resync finishes.
        """
        body = await self._ok(
            "GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/joined_members", timeout=timeout
        )
        return dict(body["joined"])

    async def state(self, room_id: str, timeout: float | None = None) -> list[dict[str, Any]]:
        """``GET /rooms/{room}/state`` -> list of current state events."""
        body = await self._ok(
            "GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/state", timeout=timeout
        )
        return list(body)

    async def messages(
        self,
        room_id: str,
        dir: str = "b",
        limit: int = 50,
        from_token: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """``GET /rooms/{room}/messages`` -> the response (``chunk``, ``start``, ``end``)."""
        params: dict[str, str] = {"dir": dir, "limit": str(limit)}
        if from_token is not None:
            params["from"] = from_token
        body = await self._ok(
            "GET",
            f"/_matrix/client/v3/rooms/{quote(room_id)}/messages",
            params=params,
            timeout=timeout,
        )
        return dict(body)

    async def sync(
        self,
        since: str | None = None,
        filter: str | Mapping[str, Any] | None = None,
        timeout: float = 0,
        request_timeout: float | None = None,
    ) -> dict[str, Any]:
        """``GET /sync``; ``timeout`` is the server long-poll time in seconds.

        ``filter`` may be a filter ID or an inline filter object.  The HTTP
        request is allowed ``timeout + default_timeout`` seconds unless
        ``request_timeout`` says otherwise.
        """
        params: dict[str, str] = {"timeout": str(int(timeout * 1000))}
        if since is not None:
            params["since"] = since
        if filter is not None:
            params["filter"] = filter if isinstance(filter, str) else json.dumps(filter)
        body = await self._ok(
            "GET",
            "/_matrix/client/v3/sync",
            params=params,
            timeout=(
                request_timeout
                if request_timeout is not None
                else timeout + self.default_timeout
            ),
        )
        return dict(body)
