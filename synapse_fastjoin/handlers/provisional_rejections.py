"""Auth events rejected against partial state only (patch 0019 asks here).

An event received while its room is partial is checked against the partial
state, state-resolved with the event's own auth events
(`FederationEventHandler._check_event_auth`, step 5 of the checks on receipt
of a PDU). When that state is wrong (a ban we accepted because we could not
check its sender's power, say) a valid event is rejected, and the resync
re-checks it against the full state and may accept it (Complement's "State
rejected incorrectly"). Until then, rule 2.3 of the authorization rules
(an event whose auth events include a rejected one is rejected) passes the
wrong verdict on to every later event naming it: a user kicked by a moderator
we wrongly believed banned cannot be seen to rejoin, since the rejoin names the
kick (upstream #13887). The rejoin is then rejected for good: by the time the
resync re-checks it, it was checked against the kick's old status, or is
checked again only if it was partial-state itself.

Here, for an event whose own state is partial, a rejected auth event is given
to the state-independent checks as not rejected when

- it is itself still a partial-state event (its rejection was decided against
  partial state and the resync will decide again), and
- it passes the auth checks against its own auth events (steps 1-4 on
  receipt): it was rejected against the state, not on its own. An event that
  fails those is rejected whatever the state, and stays so for this purpose.

Everything else is unchanged: the event must still pass the state-dependent
checks against its auth events and against the partial state resolved with
them, where state resolution re-checks the provisionally rejected event itself
(so it cannot lend powers the known state denies). The resync re-checks the
auth event and the event against full state, in order, and either may become
rejected then; rule 2.3 applies in full from then on.
"""

import logging
from typing import TYPE_CHECKING, Any

from synapse.api.errors import AuthError
from synapse.event_auth import (
    check_state_dependent_auth_rules,
    check_state_independent_auth_rules,
)
from synapse.events import EventBase, make_event_from_dict
from synapse.storage.databases.main.events_worker import EventRedactBehaviour

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)


class ProvisionalRejections:
    def __init__(self, hs: "HomeServer") -> None:
        self._store = hs.get_datastores().main

    async def auth_events_while_partial(
        self, event: EventBase, claimed_auth_events: list[EventBase]
    ) -> dict[str, Any] | None:
        """`claimed_auth_events` by id, with those rejected against partial
        state only given as not rejected; None when there are none."""
        rejected = [e for e in claimed_auth_events if e.rejected_reason is not None]
        if not rejected:
            return None
        partial = await self._store.get_partial_state_events([e.event_id for e in rejected])
        provisional: dict[str, EventBase] = {}
        for auth_event in rejected:
            if not partial.get(auth_event.event_id):
                continue  # decided with full state (or an outlier): final
            if not await self._passes_on_its_own(auth_event):
                continue
            provisional[auth_event.event_id] = make_event_from_dict(
                auth_event.get_pdu_json(),
                auth_event.room_version,
                auth_event.internal_metadata.get_dict(),
                rejected_reason=None,
            )
        if not provisional:
            return None
        logger.info(
            "Event %s: auth events %s were rejected against partial state only; "
            "checking it as if they were not, until the resync decides",
            event.event_id,
            sorted(provisional),
        )
        return {e.event_id: provisional.get(e.event_id, e) for e in claimed_auth_events}

    async def _passes_on_its_own(self, event: EventBase) -> bool:
        """Whether `event` passes the auth checks against its own auth events
        (rejected auth events of its own count as rejected)."""
        try:
            await check_state_independent_auth_rules(self._store, event)
            auth_events = await self._store.get_events_as_list(
                event.auth_event_ids(),
                redact_behaviour=EventRedactBehaviour.as_is,
                allow_rejected=True,
            )
            check_state_dependent_auth_rules(event, auth_events)
        except AuthError:
            return False
        return True
