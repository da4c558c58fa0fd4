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
read by index: per server (in batches) and per stream position.
"""

import logging
from typing import TYPE_CHECKING, Collection

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

        host_list = sorted(hosts)

        def txn(txn) -> set[str]:  # type: ignore[no-untyped-def]
            # The device's latest change (device_lists_stream's (user_id,
            # device_id) index).
            txn.execute(
                "SELECT MAX(stream_id) FROM device_lists_stream"
                " WHERE user_id = ? AND device_id = ?",
                (user_id, device_id),
            )
            row = txn.fetchone()
            if row is None or row[0] is None:
                return set()
            change = max(row[0], since_stream_id)
            already: set[str] = set()
            # Still queued: an update of this device since the change.
            txn.execute(
                "SELECT DISTINCT destination FROM device_lists_outbound_pokes"
                " WHERE stream_id >= ? AND user_id = ? AND device_id = ?",
                (change, user_id, device_id),
            )
            already.update(r[0] for r in txn)
            # Sent and acknowledged.
            for i in range(0, len(host_list), 500):
                batch = host_list[i : i + 500]
                txn.execute(
                    "SELECT destination FROM device_lists_outbound_last_success"
                    f" WHERE user_id = ? AND stream_id >= ? AND destination IN ({','.join('?' * len(batch))})",
                    (user_id, change, *batch),
                )
                already.update(r[0] for r in txn)
            return already

        already = await self._store.db_pool.runInteraction(
            "fastjoin_device_list_replay_hosts", txn
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
