"""The user directory's share of a big join, in batches.

Once a resync ends, Synapse writes the room's whole membership to its current
state at once, and its user directory handler then takes the new members one
state delta at a time: for every remote member that joined, one transaction
for their profile (`user_directory`, `user_directory_search`, the stale-profile
table) and one for `users_in_public_rooms`, each with its own commit. At
200,000 members that is 400,000 commits, minutes of work after the room is
already usable (stock Synapse does the same after its own resync).

Here, runs of such deltas are written in one transaction each per step, with
the values Synapse's per-delta code computes: `users_in_public_rooms` through
Synapse's own `add_users_in_public_rooms`, the profiles through Synapse's
batch function on PostgreSQL and, on SQLite, through
`storage/user_directory.py`, which writes the same rows without Synapse's
scan of the whole search table per user. A member's membership, display name
and avatar URL are read from `room_memberships` where its row says what the
event would (`storage/member_rows.py`), from the events themselves otherwise.
Only the plainest deltas are taken
(a remote user's membership with no previous membership, in a room that is
public): everything else, in its place in the order, goes through Synapse's
own per-delta code, as do whole runs in a private room. A test
(tests/unit/test_user_directory_parity.py) lets Synapse and this code process
the same rooms and compares every table the user directory writes.
"""

import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from synapse.api.constants import EventTypes, Membership
from synapse.storage.databases.main.user_directory import _UserDirProfile

from synapse_fastjoin.storage.member_rows import member_rows_or_events
from synapse_fastjoin.storage.user_directory import update_profiles_in_user_dir_txn

if TYPE_CHECKING:
    from synapse.handlers.user_directory import UserDirectoryHandler
    from synapse.storage.databases.main.state_deltas import StateDelta

logger = logging.getLogger(__name__)

HandleDeltas = Callable[[list["StateDelta"]], Awaitable[None]]

# Below this a run goes through Synapse's code: batching a handful gains nothing.
_MIN_RUN = 4
# A run's events are fetched and its rows written this many deltas at a time:
# a big room's run is the whole room (200,000 events held at once were most of
# the joiner's memory peak after a resync).
_CHUNK = 1000


class UserDirectoryBatcher:
    def __init__(self) -> None:
        self.batched = 0
        """Deltas written in batches (for the tests and the logs)."""
        self.from_rows = 0
        """Events of those read from `room_memberships` (the same)."""

    async def handle_deltas(
        self, handler: "UserDirectoryHandler", deltas: list["StateDelta"], one_by_one: HandleDeltas
    ) -> None:
        """What `UserDirectoryHandler._handle_deltas` does with `deltas`, in
        order; `one_by_one` is Synapse's own per-delta loop."""
        run: list["StateDelta"] = []
        users: set[str] = set()
        for delta in deltas:
            if _plain_remote_join(handler, delta) and (
                not run or (delta.room_id == run[0].room_id and delta.state_key not in users)
            ):
                run.append(delta)
                users.add(delta.state_key)
                continue
            if run:
                await self._run(handler, run, one_by_one)
                run, users = [], set()
            if _plain_remote_join(handler, delta):
                run, users = [delta], {delta.state_key}
            else:
                await one_by_one([delta])
        if run:
            await self._run(handler, run, one_by_one)

    async def _run(self, handler: "UserDirectoryHandler", run: list["StateDelta"], one_by_one: HandleDeltas) -> None:
        """A run of plain remote joins, all in one room, each user once."""
        store = handler.store
        room_id = run[0].room_id
        if len(run) < _MIN_RUN or not await store.is_room_world_readable_or_publicly_joinable(room_id):
            # Private rooms: Synapse marks the profiles stale and works out who
            # shares the room with whom; its own code does that.
            await one_by_one(run)
            return
        for start in range(0, len(run), _CHUNK):
            await self._write_chunk(store, room_id, run[start : start + _CHUNK])
        self.batched += len(run)

    async def _write_chunk(self, store: Any, room_id: str, chunk: list["StateDelta"]) -> None:
        # As `_get_key_change` and `_handle_possible_remote_profile_change`
        # fetch each event (the same defaults: redacted events as redacted),
        # from its `room_memberships` row where that says the same.
        event_ids = [d.event_id for d in chunk if d.event_id is not None]
        rows, events = await member_rows_or_events(store, event_ids, "fastjoin_user_dir_member_rows")
        self.from_rows += len(rows)
        profiles = []
        joined = []
        for delta in chunk:
            # With no previous membership, a delta is a join for the directory
            # exactly when the event's membership is "join"; anything else
            # (no event, an invite, a leave) changes nothing there.
            row = rows.get(delta.event_id) if delta.event_id is not None else None
            if row is not None:
                if row.membership != Membership.JOIN:
                    continue
                # The row holds `non_null_str_or_none` of the content's values,
                # which is what `_UserDirProfile` keeps of them.
                profiles.append(_UserDirProfile(delta.state_key, row.display_name, row.avatar_url))
                joined.append(delta.state_key)
                continue
            event = events.get(delta.event_id) if delta.event_id is not None else None
            if event is None or event.content.get("membership") != Membership.JOIN:
                continue
            profiles.append(
                _UserDirProfile(
                    delta.state_key,
                    _str_or_none(event.content.get("displayname")),
                    _str_or_none(event.content.get("avatar_url")),
                )
            )
            joined.append(delta.state_key)
        if profiles:
            await store.db_pool.runInteraction(
                "fastjoin_update_profiles_in_user_dir", update_profiles_in_user_dir_txn, store, profiles
            )
        if joined:
            await store.add_users_in_public_rooms(room_id, joined)


def _plain_remote_join(handler: "UserDirectoryHandler", delta: "StateDelta") -> bool:
    return (
        delta.event_type == EventTypes.Member
        and delta.prev_event_id is None
        and delta.event_id is not None
        and not handler.is_mine_id(delta.state_key)
    )


def _str_or_none(value: Any) -> str | None:
    # What `_handle_possible_remote_profile_change` keeps of a display name or
    # avatar URL of an unexpected type (`_UserDirProfile` then drops any NUL).
    return value if isinstance(value, str) else None
