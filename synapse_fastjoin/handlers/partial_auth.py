"""The state an incoming event of a partial-state room is authorised against
(patch 0016 hands Synapse's computation here).

For an event whose state before it is partial, Synapse
(`FederationEventHandler._check_event_auth`) state-resolves the whole partial
state before the event, P, with the event's claimed auth events, A, and picks
the event's auth events from the result with `compute_auth_events`, which reads
only the keys `auth_types_for_event` names. Every key of P that A lacks is
conflicted, so the resolution works through (nearly) the whole partial state
for every inbound event: its cost grows with the room.

Where the answer at those keys is known without the resolution, it is given
here; everywhere else the resolution is computed at those keys only (below),
and where that declines, Synapse's own resolution runs, unchanged.

Why the shortcut is exact. State resolution v2 and v2.1 (`state/v2.py`,
`resolve_events_with_store`) split the keys first (`_seperate`): a key is
*unconflicted* when every state set maps it to the same event (absent from
all is not a key at all), and the result is
`ChainMap(unconflicted, resolved_conflicted)`: at an unconflicted key it is the
unconflicted event, whatever the power sort, the mainline sort, the iterative
auth checks and the auth chain difference do with the conflicted keys. So when
*every* key of `auth_types_for_event(event)` is in both P and A with the same
event, the resolution returns exactly those events at those keys, and
`compute_auth_events`, which reads nothing else, returns what it would have.

A key missing from P or from A (the usual case for a sender whose membership
the partial state omits), or a key where they differ, is conflicted: its
resolved value depends on the rest of the conflicted set (a ban of the sender
of a conflicting power-levels event, an older membership resurrected from the
auth chain difference, the mainline order of events at other keys), so no
restriction of P to the auth keys is equivalent in general. There the
resolution runs, computed only as far as the auth keys need it
(`synapse_fastjoin.state.partial_resolution`: every power event, and the
other events at the keys the auth keys depend on, with Synapse's own sort and
check functions); where that declines, Synapse's own resolution runs.
"""

import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping

from synapse.event_auth import auth_types_for_event
from synapse.events import EventBase
from synapse.events.snapshot import EventContext
from synapse.types import StateMap
from synapse.types.state import StateFilter

from synapse_fastjoin.state.partial_resolution import PartialStateResolver

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

StateKey = tuple[str, str]


def auth_state_from_unconflicted(
    event: EventBase,
    partial_state_at_auth_types: Mapping[StateKey, str],
    claimed_auth_event_ids: Mapping[StateKey, str],
) -> dict[StateKey, str] | None:
    """The resolved state at the auth keys of `event`, if it needs no
    resolution: every key `auth_types_for_event` names is in the partial state
    before the event and in the claimed auth events, with the same event.

    Args:
        event: the incoming event.
        partial_state_at_auth_types: the partial state before `event`, at least
            at the keys `auth_types_for_event(event)` names.
        claimed_auth_event_ids: the event's claimed auth events, by key.

    Returns:
        Those events by key, or None when some key is conflicted (Synapse's
        resolution must decide it).
    """
    answer: dict[StateKey, str] = {}
    for key in auth_types_for_event(event.room_version, event):
        event_id = partial_state_at_auth_types.get(key)
        if event_id is None or claimed_auth_event_ids.get(key) != event_id:
            return None
        answer[key] = event_id
    return answer


class PartialStateAuth:
    """Answers `state_for_auth_while_partial` (patch 0016).

    Args:
        hs: the homeserver; without it, conflicted auth keys are left to
            Synapse's own resolution.
    """

    def __init__(self, hs: "HomeServer | None" = None) -> None:
        self._hs = hs
        self._resolver: PartialStateResolver | None = None
        # How often each way was taken, for tests and benchmarks.
        self.unconflicted = 0
        self.resolved = 0
        self.resolved_at_auth_keys = 0

    def forget_room(self, room_id: str) -> None:
        """Drop what is kept about `room_id` (its resync finished)."""
        if self._resolver is not None:
            self._resolver.forget_room(room_id)

    def _get_resolver(self) -> PartialStateResolver | None:
        if self._resolver is None and self._hs is not None:
            from synapse.state import StateResolutionStore

            hs = self._hs
            self._resolver = PartialStateResolver(
                hs.get_datastores().main,
                StateResolutionStore(hs.get_datastores().main, hs.get_datastores().state_deletion),
                hs.get_clock(),
            )
        return self._resolver

    async def state_for_auth_while_partial(
        self,
        event: EventBase,
        context: EventContext,
        claimed_auth_event_ids: dict[StateKey, str],
        resolve: Callable[[], Awaitable[StateMap[str]]],
    ) -> StateMap[str]:
        """The state `event` is authorised against: from the partial state at
        its auth keys when those are unconflicted, else the resolution at the
        auth keys, else `resolve()` (Synapse's resolution of the whole partial
        state with the claimed auth events)."""
        auth_types = auth_types_for_event(event.room_version, event)
        partial: Any = await context.get_prev_state_ids(StateFilter.from_types(auth_types))
        answer = auth_state_from_unconflicted(event, partial, claimed_auth_event_ids)
        if answer is not None:
            self.unconflicted += 1
            return answer
        resolver = self._get_resolver()
        group = context.state_group_before_event
        if resolver is not None and group is not None:
            answer = await resolver.resolve_at_auth_keys(
                event, event.room_version, group, context.get_prev_state_ids, claimed_auth_event_ids
            )
            if answer is not None:
                self.resolved_at_auth_keys += 1
                return answer
        self.resolved += 1
        return await resolve()
