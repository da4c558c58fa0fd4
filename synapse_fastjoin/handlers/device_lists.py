"""Remote device lists cached on a wrong belief about a partial-state room
(the engine calls this when a room's resync ends).

Synapse keeps a remote user's device list cached (and counts on their server
to send updates) while it shares a room with them. While a room is partial the
memberships it holds are those the resident gave at the join plus those
received since, each checked against partial state: a user can be believed
joined when they were not (a kick wrongly rejected, a join wrongly accepted),
or believed continuously joined when they left and came back. Their server
sends us no updates while they are out of every room we share, so a list
cached through that belief may have missed changes, whatever the user's
membership is now (upstream #13887).

When the full state arrives, a remote user is *suspect* if

- they were joined in the partial current state and are not in the full one
  (believed in the room, not in it), or
- one of their membership events in the room was accepted while partial and
  is rejected with full state, or the other way round (our view of their
  comings and goings was wrong, even if it ends in the same membership).

A suspect's cached device list is dropped (as Synapse does when it stops
sharing rooms with a user), so the next key query fetches it again from their
server, and resubscribes if a room is still shared. If one is, local users
are told the list changed (`device_lists.changed` in /sync), as Synapse does
after fetching a list anew.
"""

import logging
from typing import TYPE_CHECKING, Collection

from synapse_fastjoin.storage.device_lists import joined_among_txn

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)


class RemoteDeviceListCheck:
    def __init__(self, hs: "HomeServer") -> None:
        self._hs = hs
        self._store = hs.get_datastores().main

    async def remote_joined_users(self, room_id: str) -> set[str]:
        """The remote users joined in the room's current state (partial or
        full, whichever the room has now)."""
        users = await self._store.get_users_in_room(room_id)
        return {u for u in users if not self._hs.is_mine_id(u)}

    async def correct(
        self,
        room_id: str,
        joined_while_partial: Collection[str],
        membership_flipped: Collection[str],
    ) -> set[str]:
        """After the room got full state: drop the cached device lists of the
        suspects. Returns the users whose cached list was dropped.

        Args:
            room_id: the room, now with full current state.
            joined_while_partial: remote users joined in its partial current
                state, just before the full state replaced it.
            membership_flipped: users whose membership event in the room had
                its rejection status changed by the resync.
        """
        # Only the users joined while partial are looked up (not every member
        # of the full state: a big room's member list is big).
        joined_now = await self._store.db_pool.runInteraction(
            "fastjoin_joined_among", joined_among_txn, room_id, set(joined_while_partial)
        )
        suspects = (set(joined_while_partial) - joined_now) | {
            u for u in membership_flipped if not self._hs.is_mine_id(u)
        }
        if not suspects:
            return set()
        cached = await self._store.get_users_whose_devices_are_cached(suspects)
        if not cached:
            return set()
        still_shared = await self._store.get_users_server_still_shares_room_with(cached)
        device_handler = self._hs.get_device_handler()
        notify = getattr(device_handler, "notify_device_update", None)
        for user_id in sorted(cached):
            devices = await self._store.get_cached_devices_for_user(user_id)
            await self._store.mark_remote_user_device_list_as_unsubscribed(user_id)
            if user_id in still_shared and devices and notify is not None:
                try:
                    await notify(user_id, list(devices))
                except Exception:
                    # Not the device-list writer: the list is refetched on the
                    # next query anyway.
                    logger.warning(
                        "Could not tell local users that %s's device list changed",
                        user_id,
                        exc_info=True,
                    )
        logger.info(
            "Resync of %s: dropped the cached device lists of %d remote users our "
            "partial state had wrong memberships for: %s",
            room_id,
            len(cached),
            sorted(cached)[:10],
        )
        return set(cached)
