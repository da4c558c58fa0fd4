"""Where our own events go while a room is partial (patch 0009 asks here).

Stock Synapse sends the events our users create in a partial-state room to the
servers that were in the room when we joined (the resident's `servers_in_room`)
and to no other: a server that joins after us never gets them, however long the
resync takes (MSC3902's "outgoing events", Synapse issue #12997).

Here the destinations are the join-time servers plus every server with a member
joined in the state we hold now. While partial, that state is the state
`/send_join` gave us plus every membership event received since, each applied
only once it passed the auth checks: a server that joins after us is added when
its join arrives, and a server we learnt of that way is dropped again when its
last known member leaves. A membership event that is rejected (a server never
in the room claiming a join it may not make, a forged signature) does not get
into the state, so it adds nobody.

A join-time server is kept even when one of its members leaves: the resident
did not tell us how many members it has, and leaking our own events to a server
that left (what Synapse already accepts) is better than not sending them to one
still in the room.

When the resync ends, Synapse sends to the servers in the full state again. Those
of them we did not send to while partial (a server the resident left out of
`servers_in_room`, or one whose join we had not seen) are sent our newest event
of the room, from which they fetch the rest with `/get_missing_events`.
"""

import logging
from typing import TYPE_CHECKING, Collection

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)


class PartialStateDestinations:
    """Computes the destinations of our events in partial-state rooms, and
    reconciles them with the full state when the resync ends.

    What was sent where is remembered in memory, in the process that sends
    federation traffic; the reconciliation runs only there (the main process
    in a deployment without federation sender workers) and only for rooms this
    process sent to since it started.
    """

    def __init__(self, hs: "HomeServer") -> None:
        self._hs = hs
        self._store = hs.get_datastores().main
        self._server_name = hs.hostname
        # room id -> every destination an event of ours was sent to while the
        # room was partial.
        self._sent: dict[str, set[str]] = {}

    async def destinations(
        self, room_id: str, servers_at_join: Collection[str]
    ) -> Collection[str]:
        """The servers to send our new event in partial-state room `room_id` to.

        Args:
            room_id: the room.
            servers_at_join: the resident's `servers_in_room` at our join.

        Returns:
            The join-time servers plus the servers with a joined member in our
            current (partial) state.
        """
        joined_hosts = await self._store.get_current_hosts_in_room(room_id)
        destinations = set(servers_at_join)
        destinations.update(joined_hosts)
        destinations.discard(self._server_name)
        added = destinations - set(servers_at_join)
        if added:
            logger.debug(
                "Partial-state room %s: also sending to %d servers that joined since: %s",
                room_id,
                len(added),
                sorted(added)[:10],
            )
        self._sent.setdefault(room_id, set()).update(destinations)
        return destinations

    def sent_while_partial(self, room_id: str) -> set[str] | None:
        """The destinations of our events while `room_id` was partial (None if
        this process sent none)."""
        return self._sent.get(room_id)

    async def reconcile(self, room_id: str) -> set[str]:
        """After the resync of `room_id`: send our newest event of the room to
        the servers of the full state that did not get our events while it was
        partial. Returns those servers (empty when there were none, or when
        this process did not send for the room)."""
        sent = self._sent.pop(room_id, None)
        if sent is None:
            return set()
        sender = self._hs.get_federation_sender()
        send_pdu = getattr(sender, "_send_pdu", None)
        if send_pdu is None:
            # Federation sending runs on a worker: it cannot be asked from here.
            return set()
        hosts = set(await self._store.get_current_hosts_in_room(room_id))
        missed = hosts - sent - {self._server_name}
        if not missed:
            return set()
        event_id = await self._newest_own_event(room_id)
        if event_id is None:
            return set()
        event = await self._store.get_event(event_id, allow_none=True)
        if event is None:
            return set()
        logger.info(
            "Resync of %s done: sending our newest event %s to %d servers that "
            "did not get our events while the room was partial: %s",
            room_id,
            event_id,
            len(missed),
            sorted(missed)[:10],
        )
        await send_pdu(event, missed)
        return missed

    async def _newest_own_event(self, room_id: str) -> str | None:
        """Our newest non-outlier event in `room_id`, if any."""

        is_mine_id = self._hs.is_mine_id

        def txn(txn) -> str | None:  # type: ignore[no-untyped-def]
            # LIKE may match more than our server (`_` matches any character):
            # the sender is checked again below.
            txn.execute(
                "SELECT event_id, sender FROM events WHERE room_id = ? AND sender LIKE ?"
                " AND outlier = ? ORDER BY stream_ordering DESC LIMIT 20",
                (room_id, f"%:{self._server_name}", False),
            )
            for event_id, sender in txn:
                if is_mine_id(sender):
                    return event_id
            return None

        return await self._store.db_pool.runInteraction("fastjoin_newest_own_event", txn)
