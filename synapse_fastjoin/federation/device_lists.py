"""Each local device-list update reaches each server once across a resync
(patch 0013 asks here).

While a room is partial Synapse sends our users' device-list changes to the
servers it believes are in the room (the join-time servers plus those it saw
join). When the resync ends it sends every change made since the join again to
every server that was not in the join-time list, to catch the servers it
missed; the servers that joined while partial got the change already and got
it twice. Here a server is left out of that replay if it already has the
device's latest change: Synapse's record of what it sent each server
(`device_lists_outbound_last_success`, the newest update of the user a server
acknowledged) is at or past that change, or an update of the device newer than
the change is still queued for it (`device_lists_outbound_pokes`). Both are
read by index, for the replay's servers only
(`storage/device_lists.py: hosts_with_device_change_txn`).
"""

import logging
from typing import TYPE_CHECKING, Collection

from synapse_fastjoin.storage.device_lists import hosts_with_device_change_txn

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)


class DeviceListReplay:
    def __init__(self, hs: "HomeServer") -> None:
        self._store = hs.get_datastores().main

    async def replay_hosts(
        self,
        room_id: str,
        user_id: str,
        device_id: str,
        since_stream_id: int,
        hosts: Collection[str],
    ) -> Collection[str]:
        """`hosts` without those already sent an update of the device since
        `since_stream_id` (the device-list position at the join)."""
        if not hosts:
            return hosts
        already = await self._store.db_pool.runInteraction(
            "fastjoin_device_list_replay_hosts",
            hosts_with_device_change_txn,
            user_id,
            device_id,
            since_stream_id,
            hosts,
        )
        remaining = set(hosts) - already
        if len(remaining) < len(hosts):
            logger.info(
                "Resync of %s done: device %s of %s not sent again to %d servers "
                "that got it while the room was partial; %d still to send",
                room_id,
                device_id,
                user_id,
                len(hosts) - len(remaining),
                len(remaining),
            )
        return remaining
