# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""The memberships of a batch of current-state deltas' events, read together.

Right after a big room's resync its whole membership becomes current state at
once, and Synapse's stats and presence handlers take the deltas one at a time,
each loading a member delta's event and previous event with its own database
fetch (`get_event(event_id, allow_none=True)`) only to read
`content["membership"]`. Patch 0026 lets them ask for all those memberships
first (`state_delta_memberships`).

This answers from `room_memberships` (`storage/member_rows.py`: one query per
chunk of events, no event read, parsed or cached) wherever the row says what
the event would, and with Synapse's own `get_events` for the rest (events
rejected or redacted since they were stored, events with no row), a chunk of
events per call.

`get_event(event_id, allow_none=True)` is `get_events_as_list([event_id])`
with the same defaults as `get_events` (redacted events pruned, which keeps a
membership; rejected events and those that cannot be read left out), so each
event is what the handlers would have loaded: an event missing from the answer
of `get_events` is None here, as `get_event` gives None. An event whose
content has no string `membership` is left out of the answer, for the handler
to load itself as before. A test (tests/unit/test_state_delta_memberships.py)
runs both handlers with and without this on the same deltas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Collection

from synapse.api.constants import Membership

from synapse_fastjoin.storage.member_rows import member_rows_or_events

if TYPE_CHECKING:
    from synapse.server import HomeServer

# Events per `get_events` call: bounds the events built at once (the answer
# keeps only strings).
CHUNK = 500

# One string object per known membership, however many events hold it.
_KNOWN = {
    m: m
    for m in (Membership.JOIN, Membership.LEAVE, Membership.INVITE, Membership.BAN, Membership.KNOCK)
}


class StateDeltaMemberships:
    def __init__(self, hs: "HomeServer", chunk: int = CHUNK) -> None:
        self._store = hs.get_datastores().main
        self._chunk = chunk
        self.answered = 0
        """Event ids answered (for the tests and the logs)."""
        self.from_rows = 0
        """Of those, answered from `room_memberships` rather than the events."""

    async def memberships(self, event_ids: Collection[str]) -> dict[str, str | None]:
        """For each of `event_ids`: the string `content["membership"]` of the
        event `get_event(event_id, allow_none=True)` returns, or None where it
        returns None; ids whose event has no string membership are left out."""
        ids = list(dict.fromkeys(event_ids))
        answer: dict[str, str | None] = {}
        for start in range(0, len(ids), self._chunk):
            chunk = ids[start : start + self._chunk]
            rows, events = await member_rows_or_events(self._store, chunk, "fastjoin_state_delta_member_rows")
            for event_id, row in rows.items():
                answer[event_id] = _KNOWN.get(row.membership, row.membership)
            self.from_rows += len(rows)
            for event_id in chunk:
                if event_id in rows:
                    continue
                event = events.get(event_id)
                if event is None:
                    answer[event_id] = None
                    continue
                membership = event.content.get("membership")
                if isinstance(membership, str):
                    answer[event_id] = _KNOWN.get(membership, membership)
            del events
        self.answered += len(answer)
        return answer
