"""The resident side of a /send_join: what the restricted-join check reads
(patch 0024 asks here).

For every join received through /send_join, Synapse's
`check_join_restrictions` loaded the full state map before the join (every
membership of the room: in a 100,000-member room the biggest part of a
partial /send_join's own CPU once patch 0014 took the rest) and read two keys
of it: the join rules (`has_restricted_join_rules`, `get_rooms_that_allow_join`)
and the joiner's own membership (a joined or invited user needs no
authorisation). Here only those two keys are read, from the same state group.
"""

import logging
from typing import Any

from synapse.api.constants import EventTypes
from synapse.types import StateMap
from synapse.types.state import StateFilter

logger = logging.getLogger(__name__)


def join_restrictions_filter(user_id: str) -> StateFilter:
    """The keys `check_join_restrictions` and `check_restricted_join_rules`
    read for a join of `user_id`."""
    return StateFilter.freeze(
        {EventTypes.JoinRules: {""}, EventTypes.Member: {user_id}}, include_others=False
    )


async def join_restrictions_state(event: Any, context: Any) -> StateMap[str]:
    state = await context.get_prev_state_ids(join_restrictions_filter(event.state_key))
    logger.debug(
        "Restricted-join check of %s in %s: %d state keys read, not the full state",
        event.event_id,
        event.room_id,
        len(state),
    )
    return state
