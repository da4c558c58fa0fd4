"""Presence from the servers of a partial-state room (patch 0018 asks here).

Synapse shows a local user the presence of the users who share a room with
them, read from the rooms' current memberships
(`PresenceEventSource.get_new_events`). It stores every presence update a
server sends about its own users (`PresenceHandler.incoming_presence` checks
only that the user belongs to the sending server), and the sharing check at
/sync decides who sees it. A partial-state room holds none of the memberships
of the users who were in it before us: none of them shares a room with us, and
their presence never reaches /sync until the resync ends (upstream #13008).

Here, while a room is partial, a remote user shares it with its local members
when the user's server can be in the room: it is one of the servers the
resident named at the join (`servers_in_room`, `partial_state_rooms_servers`)
or it has a member joined in the partial state we hold (memberships received
since the join, each applied only once it passed the auth checks). A server
that is neither is not believed: its users' presence is still not shown. This
is a belief about servers, not users (the resident did not say which of a
server's users are in the room), the same one Synapse makes to send our events
and device-list updates while partial.

Cost: nothing for a user in no partial-state room (Synapse's cached set of
partial rooms and the user's cached rooms answer that); otherwise, per /sync,
one read of each partial room's join-time servers and one indexed read of the
presence updates since the sync's token.

A wrong belief ends with the resync: once the room has full state it is no
longer partial, nothing is added here for it, and Synapse's own sharing check
over the full memberships decides again.
"""

import logging
from collections import Counter
from collections.abc import Collection
from typing import TYPE_CHECKING

from synapse.types import get_domain_from_id

if TYPE_CHECKING:
    from synapse.server import HomeServer

    from synapse_fastjoin.storage.store import FastJoinStore

logger = logging.getLogger(__name__)


class PartialStatePresence:
    def __init__(self, hs: "HomeServer") -> None:
        self._store = hs.get_datastores().main
        self._server_name = hs.hostname

    async def servers_in_partial_rooms(self, user_id: str) -> set[str]:
        """The remote servers that may be in the partial-state rooms `user_id`
        is joined to (empty when none of their rooms is partial)."""
        partial_rooms = await self._store.get_partial_rooms()
        if not partial_rooms:
            return set()
        rooms = await self._store.get_rooms_for_user(user_id)
        servers: set[str] = set()
        for room_id in rooms:
            if room_id not in partial_rooms:
                continue
            at_join = await self._store.get_partial_state_servers_at_join(room_id)
            if at_join is None:
                # The resync ended meanwhile: full state decides.
                continue
            servers.update(at_join)
            servers.update(await self._store.get_current_hosts_in_room(room_id))
        servers.discard(self._server_name)
        return servers

    async def users_in_partial_rooms(
        self, user_id: str, from_key: int | None
    ) -> Collection[str]:
        """Remote users whose presence `user_id` may be shown because of a
        partial-state room: those with presence stored (changed after
        `from_key`, if given) whose server may be in one of the user's
        partial-state rooms."""
        servers = await self.servers_in_partial_rooms(user_id)
        if not servers:
            return set()

        def txn(txn) -> list[str]:  # type: ignore[no-untyped-def]
            if from_key is None:
                txn.execute("SELECT user_id FROM presence_stream")
            else:
                txn.execute(
                    "SELECT user_id FROM presence_stream WHERE stream_id > ?",
                    (from_key,),
                )
            return [row[0] for row in txn]

        candidates = await self._store.db_pool.runInteraction(
            "fastjoin_presence_users_in_partial_rooms", txn
        )
        users = {u for u in candidates if _domain(u) in servers}
        if users:
            logger.debug(
                "Presence for %s: %d users of partial-state rooms' servers",
                user_id,
                len(users),
            )
        return users


class JoinFanout:
    """Who was in a room before a join, for the presence handler (patch 0030).

    For every batch of a room's state deltas that makes someone joined,
    Synapse's `PresenceHandler._handle_state_delta` reads the room's whole
    member list (`get_users_in_room`; a database read of every membership
    once the room is bigger than its cache) and walks it in Python to find the
    local users and the remote servers that were in the room before: at a
    resident of a 200,000-member room, about 200 ms of the reactor for every
    join, on stock Synapse too.

    Here the same two answers come from the local members
    (`local_current_membership`, by its room index) and each server's joined
    count (`fastjoin_room_server_joined_counts`, kept by triggers;
    `storage/member_counts.py`): a server was in the room before when it has
    more joined members now than the newly joined users of that server who
    are still joined. One transaction, reading rows in proportion to the local
    members and the servers of the room, not its members.

    A batch of more than `MAX_NEWLY_JOINED` new members (the end of a resync,
    where every member of the room is new) is left to Synapse, whose walk of
    the room then costs what the batch does anyway.
    """

    MAX_NEWLY_JOINED = 1000

    def __init__(self, hs: "HomeServer", store: "FastJoinStore") -> None:
        self._store = store
        self._server_name = hs.hostname

    async def prev_members(
        self, room_id: str, newly_joined_users: Collection[str]
    ) -> tuple[list[str], set[str]] | None:
        """The local users and the remote servers with members in `room_id`
        other than `newly_joined_users` (what Synapse computes from
        `get_users_in_room`), or None to let Synapse compute them."""
        if len(newly_joined_users) > self.MAX_NEWLY_JOINED:
            return None
        reads = await self._store.join_fanout_reads(room_id, sorted(newly_joined_users))
        if reads is None:
            return None
        local, servers, joined_now = reads
        newly = set(newly_joined_users)
        prev_local = [user for user in local if user not in newly]
        new_per_server = Counter(_domain(user) for user in joined_now)
        prev_remote = {
            server
            for server, joined in servers.items()
            if server != self._server_name and joined > new_per_server[server]
        }
        return prev_local, prev_remote


def _domain(user_id: str) -> str | None:
    try:
        return get_domain_from_id(user_id)
    except Exception:
        return None
