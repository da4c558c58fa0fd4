# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""A partial-state join whose resync is about to end, in an in-process
HomeServer: for the parity test and the measurement of the resync's end
steps (the state at the join, then the room's current state).

`prepare_partial_join` stores a generated room's state as outliers (the bulk
writer, as the engine does), then a local user's join event with a partial
state (the non-member state, the creator's membership and a few keys the
full state changes or drops), as Synapse's `process_remote_join` persists it:
the room's current state is then the partial state. `un_partial_join` gives
the join its full state as the engine's `_un_partial_event` does (a new state
group, Synapse's `update_state_for_partial_state_event`). What is left is
the end step under test: `update_current_state`.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import Any

import attr

from synapse.api.room_versions import RoomVersion
from synapse.app.homeserver import SynapseHomeServer
from synapse.events import EventBase, make_event_from_dict
from synapse.events.snapshot import EventContext

from synapse_fastjoin.storage.bulk import persist_outliers
from tests.harness.fakehs.room import Room, RoomSpec, load_or_generate

StateKey = tuple[str, str]


@attr.s(slots=True, auto_attribs=True)
class JoinScenario:
    room_id: str
    room: Room
    version: RoomVersion
    join: dict[str, Any]
    partial_state: dict[StateKey, str]
    full_state: dict[StateKey, str]


def join_scenario(room_version: str, members: int, servers: int, local_server: str, variety: bool = True) -> JoinScenario:
    """A generated room, a local user's join at its tip, the partial state
    the resident would send and the full state after the resync.

    With `variety`: local users besides the joiner (one joined, one invited
    in the partial state and gone in the full state, one only in the full
    state), a member whose membership the partial state has wrong, a key the
    full state does not have (a state reset), the room's name changed."""
    room = load_or_generate(RoomSpec(members=members, servers=servers, room_version=room_version))
    creator = room.spec.creator
    local = [f"@local{i}:{local_server}" for i in range(3)]
    extra: dict[StateKey, str] = {}
    if variety:
        # Events the full state has and the partial state has another
        # version of, or not at all.
        invite = room.create_event(creator, "m.room.member", {"membership": "invite"}, local[1], 1_700_000_100_000)
        extra[("m.room.member", local[1])] = invite.event_id
        room.create_event(creator, "m.room.member", {"membership": "leave"}, local[1], 1_700_000_100_001)
        room.create_event(creator, "m.room.member", {"membership": "invite"}, local[0], 1_700_000_100_002)
        room.create_event(local[0], "m.room.member", {"membership": "join", "displayname": "L0"}, local[0], 1_700_000_100_003)
        room.create_event(creator, "m.room.member", {"membership": "invite"}, local[2], 1_700_000_100_004)
        # The partial state has the room's old name (the sliding-sync row changes).
        extra[("m.room.name", "")] = room.current_state[("m.room.name", "")]
        room.create_event(creator, "m.room.name", {"name": "Renamed at the end"}, "", 1_700_000_100_005)
        member = room.spec.member(3)
        old = room.current_state[("m.room.member", member)]
        extra[("m.room.member", member)] = old  # the partial state has the old one...
        room.create_event(member, "m.room.member", {"membership": "join", "displayname": "changed"}, member, 1_700_000_100_006)
        # ...and a key the full state lost (a state reset), stored as an event.
        ghost = room.create_event(creator, "org.example.ghost", {"x": 1}, "", 1_700_000_100_007)
        extra[("org.example.ghost", "")] = ghost.event_id
    full_state = dict(room.current_state)
    if variety:
        full_state.pop(("org.example.ghost", ""))
    partial_state = {k: v for k, v in full_state.items() if k[0] != "m.room.member"}
    partial_state[("m.room.member", creator)] = full_state[("m.room.member", creator)]
    if variety:
        partial_state[("m.room.member", local[0])] = full_state[("m.room.member", local[0])]
        partial_state.update(extra)
    joiner = f"@joiner:{local_server}"
    join_event = room.create_event(joiner, "m.room.member", {"membership": "join"}, joiner, 1_700_000_200_000)
    return JoinScenario(room.room_id, room, room.version, join_event.as_dict(), partial_state, full_state)


async def prepare_partial_join(
    hs: SynapseHomeServer, scenario: JoinScenario, batch: int = 2000, leave_out: Collection[str] = ()
) -> EventBase:
    """Store the room's events as outliers (but those in `leave_out`: as if
    the resync had not stored them yet) and the join with its partial state
    (the room's current state becomes the partial state)."""
    room = scenario.room
    version = room.version
    store = hs.get_datastores().main
    join_id = None
    events = []
    for stored in room.events:
        event = make_event_from_dict(stored.as_dict(), version)
        if event.type == "m.room.member" and event.state_key == scenario.join["state_key"] and event.sender == event.state_key:
            join_id = event.event_id
            continue
        if event.event_id in leave_out:
            continue
        event.internal_metadata.outlier = True
        events.append(event)
    await store.upsert_room_on_join(scenario.room_id, version, [events[0]])
    await store.store_partial_state_room(
        scenario.room_id, {room.spec.server_name(0)}, store.get_device_stream_token().stream, room.spec.server_name(0)
    )
    storage = hs.get_storage_controllers()
    for i in range(0, len(events), batch):
        pairs = [(e, EventContext.for_outlier(storage)) for e in events[i : i + batch]]
        await persist_outliers(hs, scenario.room_id, pairs)
    join = make_event_from_dict(copy.deepcopy(scenario.join), version)
    assert join.event_id == join_id
    context = await hs.get_state_handler().compute_event_context(
        join, state_ids_before_event=scenario.partial_state, partial_state=True
    )
    await storage.persistence.persist_event(join, context)
    return join


async def un_partial_join(hs: SynapseHomeServer, scenario: JoinScenario) -> None:
    """Give the join its full state, as the engine's `_un_partial_event`
    does once the state at the join is fetched."""
    store = hs.get_datastores().main
    join = await store.get_event(make_event_from_dict(copy.deepcopy(scenario.join), scenario.version).event_id)
    state_before = {k: v for k, v in scenario.full_state.items() if k != ("m.room.member", join.state_key)}
    context = await hs.get_state_handler().compute_event_context(
        join, state_ids_before_event=state_before, partial_state=False
    )
    await store.update_state_for_partial_state_event(join, context)
    hs.get_storage_controllers().state.notify_event_un_partial_stated(join.event_id)
