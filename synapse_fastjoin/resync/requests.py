"""The federation requests of a resync, and what makes their answers usable.

Each ignores Synapse's per-destination backoff: the fetch policy
(`policy.FetchPolicy`) ranks servers by that backoff and by what it has seen
itself, and one failure must not lock a room's only resident out of its resync
for Synapse's 10 minutes.
"""

import urllib.parse
from typing import Any

from synapse.api.room_versions import RoomVersion
from synapse.events import make_event_from_dict
from synapse.http.matrixfederationclient import MatrixFederationHttpClient, MatrixFederationRequest

_FEDERATION = "/_matrix/federation/v1"


class BadAnswer(Exception):
    """A server answered with something other than what was asked for."""


def quote(s: str) -> str:
    return urllib.parse.quote(s, safe="")


async def get_state_ids(
    http: MatrixFederationHttpClient, destination: str, room_id: str, event_id: str, timeout_ms: int
) -> tuple[list[str], list[str]]:
    """`/state_ids` at `event_id`: (state event ids, auth chain event ids).

    Raises:
        BadAnswer: the answer is not two lists of event ids.
    """
    doc = await http.get_json(
        destination,
        path=f"{_FEDERATION}/state_ids/{quote(room_id)}",
        args={"event_id": event_id},
        timeout=timeout_ms,
        ignore_backoff=True,
        try_trailing_slash_on_400=True,
    )
    state_ids = doc.get("pdu_ids") if isinstance(doc, dict) else None
    auth_ids = doc.get("auth_chain_ids", []) if isinstance(doc, dict) else None
    if (
        not isinstance(state_ids, list)
        or not isinstance(auth_ids, list)
        or not all(isinstance(i, str) for i in state_ids)
        or not all(isinstance(i, str) for i in auth_ids)
    ):
        raise BadAnswer("invalid /state_ids response")
    return state_ids, auth_ids


async def get_event(
    http: MatrixFederationHttpClient,
    destination: str,
    room_id: str,
    room_version: RoomVersion,
    event_id: str,
    timeout_ms: int,
) -> dict[str, Any]:
    """`/event/{event_id}`: the event as sent (checked later like any other).

    Raises:
        BadAnswer: no single event in the answer, an event of another room, or
            another event than the one asked for (its id computed from its
            content).
    """
    doc = await http.get_json(
        destination,
        path=f"{_FEDERATION}/event/{quote(event_id)}",
        timeout=timeout_ms,
        ignore_backoff=True,
    )
    found = doc.get("pdus") if isinstance(doc, dict) else None
    if not isinstance(found, list) or len(found) != 1 or not isinstance(found[0], dict):
        raise BadAnswer(f"/event {event_id}: no single event in the answer")
    pdu = found[0]
    if pdu.get("room_id", room_id) != room_id:
        raise BadAnswer(f"/event {event_id}: an event of another room")
    try:
        served_id = make_event_from_dict(dict(pdu), room_version).event_id
    except Exception as e:
        raise BadAnswer(f"/event {event_id}: not an event: {e}") from None
    if served_id != event_id:
        raise BadAnswer(f"/event {event_id}: served {served_id} instead")
    return pdu


async def open_state(
    http: MatrixFederationHttpClient, destination: str, room_id: str, event_id: str, timeout_ms: int
) -> Any:
    """Start `/state` at `event_id`: the response once its headers are in (a
    Twisted IResponse, to be read as a stream with `deliverBody`)."""
    request = MatrixFederationRequest(
        method="GET",
        destination=destination,
        path=f"{_FEDERATION}/state/{quote(room_id)}",
        query={"event_id": event_id},
    )
    return await http._send_request(request, timeout=timeout_ms, ignore_backoff=True)
