# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""`/make_join` with the module's part of the current state
(`handlers/make_join.py`, patch 0023) answers exactly as with Synapse's whole
current state.

A real in-process HomeServer (SQLite or PostgreSQL, `--db`) named after the
rooms' creator, so that the creator and some members are local, holds rooms of
versions 10 and 12: a public one and a restricted one (allowed through another
room), with local and remote members of every power level (a remote member
powerful enough to invite, local ones not), an invited user, a joined one.
Synapse's `on_make_join_request` runs first with no callback, then with the
module's: the events it builds must be the same (content with the authorising
user, auth and prev events, everything but the time and signatures), and so
must its refusals. The module reads only its keys when Synapse's cache of the
whole map is cold, and leaves Synapse the whole map when it is warm.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from synapse.api.errors import SynapseError
from synapse.app.homeserver import SynapseHomeServer

from synapse_fastjoin.handlers.make_join import MakeJoinState
from tests.harness.inprocess import homeserver_on_fresh_database
from tests.harness.rooms import CREATOR, REMOTE, Room
from tests.harness.rooms import persist as _persist

JOINER = "joiner.example"
OTHER = "other.example"


@pytest.fixture
def homeserver(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[SynapseHomeServer]:
    # Named as the creator's server: the creator and @l*:REMOTE are local.
    with homeserver_on_fresh_database("make_join", REMOTE, db_backend, tmp_path_factory, request) as hs:
        yield hs


async def _rooms(hs: SynapseHomeServer, version: str) -> tuple[Room, Room]:
    allowed = Room(version, "allowed")
    allowed.add(CREATOR, "m.room.join_rules", {"join_rule": "public"}, "")
    allowed.member(f"@in:{JOINER}", "join")
    await _persist(hs, allowed)

    rooms = []
    for tag, join_rules in (
        ("restricted", {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": allowed.room_id}]}),
        ("public", {"join_rule": "public"}),
    ):
        room = Room(version, tag)
        # Inviting takes 50: the creator (100; in version 12 a creator anyway)
        # and a remote member may invite, the other local members may not.
        room.add(
            CREATOR,
            "m.room.power_levels",
            {"users": {CREATOR: 100, f"@rp:{OTHER}": 100, f"@l1:{REMOTE}": 10}, "invite": 50},
            "",
        )
        room.add(CREATOR, "m.room.join_rules", join_rules, "")
        for i in range(1, 4):
            room.member(f"@l{i}:{REMOTE}", "join")
        room.member(f"@rp:{OTHER}", "join")
        for i in range(40):
            room.member(f"@m{i}:{OTHER}", "join")
        room.member(f"@invited:{JOINER}", "invite")
        room.member(f"@already:{JOINER}", "join")
        room.member(f"@left:{JOINER}", "join")
        room.member(f"@left:{JOINER}", "leave")
        await _persist(hs, room)
        rooms.append(room)
    return rooms[0], rooms[1]


def _comparable(event: Any) -> dict[str, Any]:
    pdu = event.get_pdu_json()
    for key in ("origin_server_ts", "hashes", "signatures", "unsigned"):
        pdu.pop(key, None)
    return pdu


async def _make_join(hs: SynapseHomeServer, room_id: str, user_id: str) -> Any:
    try:
        event = await hs.get_federation_handler().on_make_join_request(
            user_id.split(":", 1)[1], room_id, user_id
        )
    except SynapseError as e:
        return ("refused", e.code, e.errcode, e.msg)
    return _comparable(event)


@pytest_twisted.ensureDeferred
async def test_make_join_answers_as_with_the_whole_state(homeserver: SynapseHomeServer) -> None:
    hs = homeserver
    store = hs.get_datastores().main
    users = [
        f"@in:{JOINER}",  # in the allowed room: the creator authorises
        f"@out:{JOINER}",  # in no allowed room: refused in the restricted room
        f"@invited:{JOINER}",  # invited: no authoriser needed
        f"@already:{JOINER}",  # joined already
        f"@left:{JOINER}",  # left: needs one again
    ]
    cases = []
    for version in ("10", "12"):
        restricted, public = await _rooms(hs, version)
        cases += [(room.room_id, user) for room in (restricted, public) for user in users]

    theirs = {case: await _make_join(hs, *case) for case in cases}

    handler = MakeJoinState(hs)
    reads: list[Any] = []

    async def callback(room_id: str, user_id: str) -> Any:
        answer = await handler.state_ids(room_id, user_id)
        reads.append(answer)
        return answer

    hs.get_module_api().register_fastjoin_callbacks(make_join_state_ids=callback)  # type: ignore[attr-defined]
    for i, case in enumerate(cases):
        # Cold: the module reads its keys only (every other case with Synapse's
        # per-key cache cold too, so that they are all read from the database).
        store.get_partial_current_state_ids.invalidate((case[0],))
        if i % 2:
            store._get_current_state_event_id.invalidate((case[0],))
        reads.clear()
        ours = await _make_join(hs, *case)
        assert ours == theirs[case], case
        assert reads and reads[0] is not None and len(reads[0]) <= 4 + 4, (case, reads)
        # Warm: Synapse's cached whole map is used.
        await store.get_partial_current_state_ids(case[0])
        reads.clear()
        assert await _make_join(hs, *case) == theirs[case], case
        assert reads == [None]

    # The answers cover every branch: an authoriser named, none needed, refused.
    authorised = [a for a in theirs.values() if isinstance(a, dict) and "join_authorised_via_users_server" in a["content"]]
    assert authorised and all(a["content"]["join_authorised_via_users_server"] == CREATOR for a in authorised)
    assert any(isinstance(a, tuple) for a in theirs.values())
    assert any(isinstance(a, dict) and "join_authorised_via_users_server" not in a["content"] for a in theirs.values())
