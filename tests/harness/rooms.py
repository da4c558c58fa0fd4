# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Rooms built event by event for the differential tests that persist them into
a real in-process HomeServer through Synapse's own persistence (`persist`):
a linear DAG of signed events of one remote server, with rejected events and
outliers hanging off it."""

from __future__ import annotations

import copy
from typing import Any

from synapse.api.room_versions import KNOWN_ROOM_VERSIONS, RoomVersion
from synapse.app.homeserver import SynapseHomeServer
from synapse.events import make_event_from_dict
from synapse.events.snapshot import EventContext

from tests.harness.fakehs.events import finalise_event

REMOTE = "remote.example"
CREATOR = f"@creator:{REMOTE}"
TS = 1_700_000_000_000
MEMBER = "m.room.member"


class Room:
    """A linear room DAG (every event has one prev event); rejected events and
    outliers hang off it."""

    def __init__(self, version: str, tag: str) -> None:
        self.version: RoomVersion = KNOWN_ROOM_VERSIONS[version]
        self.state: dict[tuple[str, str], str] = {}
        self.tip: str | None = None
        self.depth = 0
        self.pending: list[tuple[dict[str, Any], str]] = []
        create: dict[str, Any] = {"room_version": version, "tag": tag}
        if self.version.msc4291_room_ids_as_hashes:
            self.room_id = ""
        else:
            create["creator"] = CREATOR
            self.room_id = f"!{tag}-{version}:{REMOTE}"
        self.add(CREATOR, "m.room.create", create, "")
        if self.version.msc4291_room_ids_as_hashes:
            self.room_id = "!" + self.state[("m.room.create", "")][1:]
        self.add(CREATOR, MEMBER, {"membership": "join"}, CREATOR)
        self.add(CREATOR, "m.room.power_levels", {"users": {CREATOR: 100}}, "")
        self.add(CREATOR, "m.room.join_rules", {"join_rule": "knock"}, "")
        self.add(CREATOR, "m.room.name", {"name": f"Room {tag}"}, "")

    def add(
        self,
        sender: str,
        etype: str,
        content: dict[str, Any],
        state_key: str | None,
        kind: str = "normal",
        redacts: str | None = None,
    ) -> str:
        """kind: "normal", "rejected" or "outlier"."""
        auth = [
            self.state[k]
            for k in (("m.room.create", ""), ("m.room.power_levels", ""), ("m.room.member", sender))
            if k in self.state and not (k[0] == "m.room.create" and self.version.msc4291_room_ids_as_hashes)
        ]
        self.depth += 1
        event: dict[str, Any] = {
            "type": etype,
            "sender": sender,
            "content": content,
            "depth": self.depth,
            "origin_server_ts": TS + self.depth,
            "prev_events": [self.tip] if self.tip else [],
            "auth_events": auth,
        }
        if state_key is not None:
            event["state_key"] = state_key
        if redacts is not None:
            if self.version.updated_redaction_rules:
                event["content"] = {**content, "redacts": redacts}
            else:
                event["redacts"] = redacts
        if self.room_id:
            event["room_id"] = self.room_id
        event_id = finalise_event(self.version, event, sender.split(":", 1)[1])
        self.pending.append((event, kind))
        if kind == "normal":
            self.tip = event_id
            if state_key is not None:
                self.state[(etype, state_key)] = event_id
        return event_id

    def member(self, user: str, membership: str, by: str | None = None, kind: str = "normal", **extra: Any) -> str:
        sender = by or (user if membership in ("join", "leave", "knock") else CREATOR)
        return self.add(sender, MEMBER, {"membership": membership, **extra}, user, kind)


async def persist(hs: SynapseHomeServer, room: Room) -> None:
    """The room's pending events stored through Synapse's persistence: in
    order, as outliers, or with their context marked rejected."""
    store = hs.get_datastores().main
    persistence = hs.get_storage_controllers().persistence
    if not await store.get_room(room.room_id):
        await store.store_room(room.room_id, CREATOR, True, room.version)
    outliers = []
    for raw, kind in room.pending:
        event = make_event_from_dict(copy.deepcopy(raw), room.version)
        if kind == "outlier":
            event.internal_metadata.outlier = True
            outliers.append((event, EventContext.for_outlier(hs.get_storage_controllers())))
            continue
        context = await hs.get_state_handler().compute_event_context(event)
        if kind == "rejected":
            context.rejected = "auth_error"
        await persistence.persist_event(event, context)
    if outliers:
        await persistence.persist_events(outliers)
    room.pending = []


def rewrite_membership_txn(txn: Any, room_id: str, fill: bool) -> None:
    """Rewrite the room's `current_state_events.membership` column in place,
    as Synapse's background update `current_state_events_membership` does: to
    NULL, or filled again from `room_memberships`."""
    if not fill:
        txn.execute("UPDATE current_state_events SET membership = NULL WHERE room_id = ?", (room_id,))
    else:
        txn.execute(
            "UPDATE current_state_events SET membership = (SELECT membership FROM room_memberships"
            " WHERE room_memberships.event_id = current_state_events.event_id) WHERE room_id = ?",
            (room_id,),
        )
