# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""The current state `/make_join` reads, without the whole room (patch 0023).

In a room version with restricted joins, Synapse's `on_make_join_request`
reads the room's whole current state, and uses of it only:

- `has_restricted_join_rules`: the join rules event;
- the joiner's membership (already invited or joined: no authoriser needed);
- `get_user_which_could_invite` (restricted rooms): the create and power
  levels events, and the joined members among the room's *local* users (the
  candidates are intersected with `get_local_users_in_room`, so no other
  membership can change the answer).

So the map this returns (those keys, as they are in `current_state_events`)
leads to the same answer as the whole map. When Synapse's cache of the whole
map holds the room,
this returns None and Synapse uses the cached map: a hit is never replaced by
a database read. The keys are read through Synapse's own lookup
(`_get_current_state_event_ids`: its per-key cache, then one batched read,
which patch 0025 makes an index lookup per key on SQLite).
"""

from synapse.api.constants import EventTypes
from synapse.server import HomeServer
from synapse.storage.databases.main import DataStore


class MakeJoinState:
    def __init__(self, hs: HomeServer) -> None:
        self._store: DataStore = hs.get_datastores().main

    def _whole_map_cached(self, room_id: str) -> bool:
        # A cache of a one-argument function is keyed by the argument itself.
        cache = self._store.get_partial_current_state_ids.cache  # type: ignore[attr-defined]
        return cache.get_immediate(room_id, None, update_metrics=False) is not None

    async def state_ids(self, room_id: str, user_id: str) -> dict[tuple[str, str], str] | None:
        if self._whole_map_cached(room_id):
            return None
        local_users = await self._store.get_local_users_in_room(room_id)
        keys = [
            (EventTypes.Create, ""),
            (EventTypes.PowerLevels, ""),
            (EventTypes.JoinRules, ""),
            (EventTypes.Member, user_id),
            *((EventTypes.Member, u) for u in local_users),
        ]
        ids = await self._store._get_current_state_event_ids(room_id, list(dict.fromkeys(keys)))
        return {key: event_id for key, event_id in ids.items() if event_id is not None}
