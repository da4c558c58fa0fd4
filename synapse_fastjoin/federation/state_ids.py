"""`/state_ids` for our own events while a room is partial (patch 0010 asks here).

MSC3902: a server in partial state must still be able to answer `/state_ids`
(and `/get_missing_events`) for the events it created itself, or a remote server
that misses one of our events' prev events has nowhere to get the state at it.
Synapse refuses `/state_ids` for every event of a partial-state room with
MSC3895's 403 (`ORG.MATRIX.MSC3895_UNABLE_DUE_TO_PARTIAL_STATE`).

Here an event our server created is answered with the state we computed for it
when we created it (its state group, read without waiting for the resync): the
state `/send_join` gave us plus every event received since. Any other event is
still refused with MSC3895's error (the state at a remote event is not ours to
vouch for). The asking server must be in the room as far as we know (the
join-time servers plus the servers of the members we know of), as for
Synapse's other endpoints it answers while partial (`/backfill`).

`/get_missing_events` needs nothing here: Synapse serves it while partial and
only redacts other servers' events, never ours.
"""

import logging
from typing import TYPE_CHECKING, Any

from synapse.api.errors import AuthError

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)


class OwnEventStateIds:
    """Answers `/state_ids` for our own events in partial-state rooms."""

    def __init__(self, hs: "HomeServer") -> None:
        self._is_mine_id = hs.is_mine_id
        self._store = hs.get_datastores().main
        self._state = hs.get_storage_controllers().state

    async def state_ids_while_partial(
        self, origin: str, room_id: str, event_id: str
    ) -> dict[str, Any] | None:
        """The `/state_ids` answer for `event_id`, or None (MSC3895's error).

        Raises:
            AuthError: the event is ours but `origin` is not in the room as far
                as we know.
        """
        event = await self._store.get_event(
            event_id, check_room_id=room_id, allow_none=True
        )
        if (
            event is None
            or not self._is_mine_id(event.sender)
            or event.internal_metadata.is_outlier()
        ):
            return None
        hosts = await self._state.get_current_hosts_in_room_or_partial_state_approximation(
            room_id
        )
        if origin not in hosts:
            raise AuthError(403, "Host not in room (partial-state approx).")

        groups = await self._state.get_state_groups_ids(
            room_id, [event_id], await_full_state=False
        )
        if len(groups) != 1:
            return None
        state_map = dict(next(iter(groups.values())))
        state_key = event.get_state_key()
        if state_key is not None:
            # The state *before* the event, as FederationHandler.get_state_ids_for_pdu.
            if "replaces_state" in event.unsigned:
                state_map[(event.type, state_key)] = event.unsigned["replaces_state"]
            else:
                state_map.pop((event.type, state_key), None)
        state_ids = list(state_map.values())
        auth_chain_ids = await self._store.get_auth_chain_ids(room_id, state_ids)
        logger.info(
            "Answering /state_ids for our event %s in partial-state room %s to %s "
            "(%d state events, from the state we computed)",
            event_id,
            room_id,
            origin,
            len(state_ids),
        )
        return {"pdu_ids": state_ids, "auth_chain_ids": list(auth_chain_ids)}
