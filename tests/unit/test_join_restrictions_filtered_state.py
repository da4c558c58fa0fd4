# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""The restricted-join check reading two state keys (patch 0024) gives the
verdicts it gave with the whole state, and does not load the whole state.

`FederationEventHandler.check_join_restrictions` runs for every `/make_join`
and every join received through `/send_join`. A real in-process HomeServer
(SQLite or PostgreSQL, `--db`), named after the rooms' creator so that the
creator and some members are local, holds rooms of versions 10 and 12: a
restricted one allowed through a room we are in, one whose allow list has an
unknown rule, one allowed only through a room we are not in, and a public one;
with an invited user, a joined one, one who left, one in the allowed room, one
in no room, and a local user in no room. For every room and user, the check
runs with Synapse's real contexts (the `UnpersistedEventContext` that
`/make_join` builds, the persisted `EventContext` that `/send_join` computes,
and an `UnpersistedEventContext` holding its state map itself) and through
`on_make_join_request`: once as patched, once with the context handing back
the whole state whatever is asked for (Synapse before the patch). The verdicts
must be equal, and equal to what the rules say; and as patched, the state
group's whole map must not have been loaded (Synapse's state group caches,
emptied before, hold no full entry for it afterwards).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from synapse.api.errors import Codes, SynapseError
from synapse.app.homeserver import SynapseHomeServer
from synapse.events import EventBase
from synapse.events.snapshot import UnpersistedEventContextBase
from synapse.types import StateMap

from tests.harness.inprocess import homeserver_on_fresh_database
from tests.harness.rooms import CREATOR, REMOTE, Room
from tests.harness.rooms import persist as _persist

JOINER = "joiner.example"
OTHER = "other.example"

ALLOWED = "allowed"
REFUSED = ("refused", 403, Codes.FORBIDDEN)
UNABLE = ("refused", 400, Codes.UNABLE_AUTHORISE_JOIN)


@pytest.fixture
def homeserver(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[SynapseHomeServer]:
    # Named as the creator's server: the creator and @l*:REMOTE are local.
    with homeserver_on_fresh_database("join_rules", REMOTE, db_backend, tmp_path_factory, request) as hs:
        yield hs


class WholeState:
    """Around a real context: its `get_prev_state_ids` ignores the filter and hands
    back the whole state, as Synapse's check asked for before the patch."""

    def __init__(self, context: UnpersistedEventContextBase) -> None:
        self.context = context

    async def get_prev_state_ids(self, state_filter: Any = None) -> StateMap[str]:
        return await self.context.get_prev_state_ids()


async def _rooms(hs: SynapseHomeServer, version: str) -> dict[str, Room]:
    allowed = Room(version, "allowed")
    allowed.add(CREATOR, "m.room.join_rules", {"join_rule": "public"}, "")
    allowed.member(f"@in:{JOINER}", "join")
    await _persist(hs, allowed)

    membership = {"type": "m.room_membership", "room_id": allowed.room_id}
    rules = {
        "restricted": {"join_rule": "restricted", "allow": [membership]},
        "unknown": {"join_rule": "restricted", "allow": [membership, {"type": "org.example.unknown"}]},
        # Allowed only through a room this server is not in.
        "elsewhere": {
            "join_rule": "restricted",
            "allow": [{"type": "m.room_membership", "room_id": f"!nowhere:{OTHER}"}],
        },
        "public": {"join_rule": "public"},
    }
    rooms = {}
    for tag, join_rules in rules.items():
        room = Room(version, tag)
        room.add(CREATOR, "m.room.power_levels", {"users": {CREATOR: 100}, "invite": 50}, "")
        room.add(CREATOR, "m.room.join_rules", join_rules, "")
        for i in range(1, 4):
            room.member(f"@l{i}:{REMOTE}", "join")
        for i in range(30):
            room.member(f"@m{i}:{OTHER}", "join")
        room.member(f"@invited:{JOINER}", "invite")
        room.member(f"@already:{JOINER}", "join")
        room.member(f"@left:{JOINER}", "join")
        room.member(f"@left:{JOINER}", "leave")
        await _persist(hs, room)
        rooms[tag] = room
    return rooms


def _expected(tag: str, user: str) -> Any:
    """What the restricted-join rules say (MSC3083), independently of Synapse."""
    name = user.split(":")[0]
    if tag == "public" or name in ("@invited", "@already"):
        return ALLOWED
    if tag == "restricted":
        return ALLOWED if name == "@in" else REFUSED
    if tag == "unknown":
        # The unknown rule may be met elsewhere: not refused for good.
        return ALLOWED if name == "@in" else UNABLE
    # elsewhere: a remote user may be in the room we are not in; a local one is not.
    return REFUSED if user.endswith(f":{REMOTE}") else UNABLE


async def _verdict(hs: SynapseHomeServer, context: UnpersistedEventContextBase, event: EventBase) -> Any:
    try:
        await hs.get_federation_event_handler().check_join_restrictions(context, event)
    except SynapseError as e:
        return ("refused", e.code, e.errcode)
    return ALLOWED


def _clear_state_group_caches(hs: SynapseHomeServer) -> None:
    state = hs.get_datastores().state
    state._state_group_cache.invalidate_all()
    state._state_group_members_cache.invalidate_all()


def _whole_group_loaded(hs: SynapseHomeServer, group: int) -> bool:
    state = hs.get_datastores().state
    return state._state_group_cache.get(group).full or state._state_group_members_cache.get(group).full


async def _contexts(
    hs: SynapseHomeServer, room: Room, user: str
) -> tuple[EventBase, dict[str, UnpersistedEventContextBase], int]:
    """A join of `user` to `room` built as `/make_join` builds it, and the
    three kinds of context Synapse checks it with."""
    builder = hs.get_event_builder_factory().for_room_version(
        room.version,
        {"type": "m.room.member", "content": {"membership": "join"}, "room_id": room.room_id,
         "sender": user, "state_key": user},
    )
    event, unpersisted = await hs.get_event_creation_handler().create_new_client_event(
        builder=builder, prev_event_ids=[room.tip]
    )
    group = unpersisted.state_group_before_event  # type: ignore[attr-defined]
    assert group is not None
    state_handler = hs.get_state_handler()
    persisted = await state_handler.compute_event_context(event)
    whole = await hs.get_storage_controllers().state.get_state_ids_for_group(group)
    holding_map = await state_handler.calculate_context_info(
        event, state_ids_before_event=whole, partial_state=False
    )
    assert holding_map.state_map_before_event == whole  # type: ignore[attr-defined]
    return event, {"make_join": unpersisted, "send_join": persisted, "state map": holding_map}, group


async def _make_join(hs: SynapseHomeServer, room_id: str, user: str) -> Any:
    try:
        await hs.get_federation_handler().on_make_join_request(user.split(":", 1)[1], room_id, user)
    except SynapseError as e:
        return ("refused", e.code, e.errcode)
    return ALLOWED


@pytest_twisted.ensureDeferred
async def test_restricted_join_verdicts_are_those_of_the_whole_state(homeserver: SynapseHomeServer) -> None:
    hs = homeserver
    users = [
        f"@in:{JOINER}",  # in the allowed room
        f"@out:{JOINER}",  # in no room
        f"@invited:{JOINER}",
        f"@already:{JOINER}",
        f"@left:{JOINER}",
        f"@lout:{REMOTE}",  # local, in no room
    ]
    seen = set()
    for version in ("10", "12"):
        rooms = await _rooms(hs, version)
        for tag, room in rooms.items():
            for user in users:
                case = (version, tag, user)
                expected = _expected(tag, user)
                seen.add(expected)
                event, contexts, group = await _contexts(hs, room, user)
                for kind, context in contexts.items():
                    before = await _verdict(hs, WholeState(context), event)  # type: ignore[arg-type]
                    _clear_state_group_caches(hs)
                    after = await _verdict(hs, context, event)
                    assert (after, before) == (expected, expected), (case, kind)
                    assert not _whole_group_loaded(hs, group), (case, kind)

                # The same through /make_join (a remote user's own server asks).
                if user.endswith(f":{JOINER}"):
                    handler = hs.get_federation_event_handler()
                    real = handler.check_join_restrictions

                    async def whole_state(context: UnpersistedEventContextBase, event: EventBase) -> None:
                        await real(WholeState(context), event)  # type: ignore[arg-type]

                    handler.check_join_restrictions = whole_state  # type: ignore[method-assign]
                    try:
                        before = await _make_join(hs, room.room_id, user)
                    finally:
                        del handler.check_join_restrictions
                    _clear_state_group_caches(hs)
                    after = await _make_join(hs, room.room_id, user)
                    assert (after, before) == (expected, expected), (case, "on_make_join_request")
                    assert not _whole_group_loaded(hs, group), (case, "on_make_join_request")
    assert seen == {ALLOWED, REFUSED, UNABLE}
