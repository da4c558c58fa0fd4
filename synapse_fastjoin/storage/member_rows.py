# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""What a membership event says, read from `room_memberships` instead of the
event itself, where the two cannot differ.

Right after a big room's resync, Synapse's stats, presence and user directory
handlers each read the room's whole membership event by event to learn a
membership, a display name and an avatar URL: at 50,000 members that is
three passes over 50,000 events through an event cache that holds 5,000 by
default, each event read from the database, parsed and built again.

Synapse writes one `room_memberships` row for every membership event it
persists that is not rejected at the time (`_store_room_members_txn`): the
event's `membership`, and `non_null_str_or_none` of its content's
`displayname` and `avatar_url`. The row is never rewritten. So the row says
what `get_events` would give for the event, except where `get_events` would
change the event or leave it out after the row was written:

- the event was rejected later (a `rejections` row: an event accepted against
  partial state and rejected against the full state); `get_events` leaves it
  out;
- a redaction points at it (a `redactions` row, confirmed or to be
  rechecked), or its sender is under an MSC4293 redaction in the room (a
  `room_ban_redactions` row); `get_events` may prune its content.

Those events, and events with no row (rejected at persistence, missing), are
not answered here: the callers read them with `get_events` as before. (An
event whose stored JSON can no longer be read, which `get_events` would leave
out, is answered here from its row: a damaged database, not a case Synapse
produces.)
"""

from collections.abc import Collection
from typing import TYPE_CHECKING, Any, NamedTuple

from synapse.storage.database import LoggingTransaction

from synapse_fastjoin.storage.sql import in_list_batches, select_rows_txn

if TYPE_CHECKING:
    from synapse.events import EventBase


class MemberRow(NamedTuple):
    membership: str
    display_name: str | None
    avatar_url: str | None


def plain_member_rows_txn(txn: LoggingTransaction, event_ids: Collection[str]) -> dict[str, MemberRow]:
    """The `room_memberships` rows of those of `event_ids` that `get_events`
    returns as they were persisted (not rejected, no redaction that could
    apply); other ids are left out."""
    rows: dict[str, MemberRow] = {}
    for batch, placeholders in in_list_batches(event_ids):
        found = select_rows_txn(
            txn,
            ("m.event_id", "m.membership", "m.display_name", "m.avatar_url"),
            f"""
            FROM room_memberships AS m
            WHERE m.event_id IN ({placeholders})
              AND NOT EXISTS (SELECT 1 FROM rejections AS rej WHERE rej.event_id = m.event_id)
              AND NOT EXISTS (SELECT 1 FROM redactions AS red WHERE red.redacts = m.event_id)
              AND NOT EXISTS (
                  SELECT 1 FROM room_ban_redactions AS ban
                  WHERE ban.room_id = m.room_id AND ban.user_id = m.sender
              )
            """,
            batch,
        )
        for event_id, membership, display_name, avatar_url in found:
            if isinstance(membership, str):
                rows[event_id] = MemberRow(membership, display_name, avatar_url)
    return rows


async def member_rows_or_events(
    store: Any, event_ids: Collection[str], desc: str
) -> tuple[dict[str, MemberRow], dict[str, "EventBase"]]:
    """The rows of `event_ids` that say what their events would, and for the
    others what `store.get_events` returns (Synapse's defaults: redacted
    events as redacted; rejected and missing ones left out)."""
    rows: dict[str, MemberRow] = await store.db_pool.runInteraction(desc, plain_member_rows_txn, event_ids)
    rest = [event_id for event_id in event_ids if event_id not in rows]
    events = await store.get_events(rest) if rest else {}
    return rows, events
