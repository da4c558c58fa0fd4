# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""`room_memberships` rows answer for a membership event only where they say
what Synapse's `get_events` gives for it (`storage/member_rows.py`), on SQLite
and PostgreSQL (`--db`).

A real in-process HomeServer persists rooms (versions 10 and 12) through
Synapse's own persistence: joins with display names and avatar URLs of every
kind (none, not a string, with a NUL), invites, leaves, bans, outliers, a
membership rejected when stored, one rejected after it was stored (as a
resync does), one redacted, and the joins of a user whose ban redacts their
events (MSC4293). For every one of them, and an id with no event, the rows
the module reads must give exactly the membership, and the display name and
avatar URL as `_UserDirProfile` keeps them, of the event `get_event` returns;
the events that `get_events` changes or leaves out since they were stored
must be left out of the answer, for the callers to read them as Synapse does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from synapse.app.homeserver import SynapseHomeServer
from synapse.util.stringutils import non_null_str_or_none

from synapse_fastjoin.storage.member_rows import MemberRow, plain_member_rows_txn
from tests.harness.inprocess import homeserver_on_fresh_database
from tests.harness.rooms import CREATOR, REMOTE, Room
from tests.harness.rooms import persist as _persist

SERVER = "rows.test"


@pytest.fixture
def homeserver(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[SynapseHomeServer]:
    with homeserver_on_fresh_database("member_rows", SERVER, db_backend, tmp_path_factory, request) as hs:
        yield hs


def _as_row(event: Any) -> MemberRow:
    return MemberRow(
        event.content["membership"],
        non_null_str_or_none(event.content.get("displayname")),
        non_null_str_or_none(event.content.get("avatar_url")),
    )


@pytest_twisted.ensureDeferred
async def test_rows_say_what_get_events_gives(homeserver: SynapseHomeServer) -> None:
    hs = homeserver
    store = hs.get_datastores().main
    # Synapse writes `room_ban_redactions` only with MSC4293 enabled.
    hs.config.experimental.msc4293_enabled = True
    plain: list[str] = []
    left_out: dict[str, str] = {}
    for version in ("10", "12"):
        room = Room(version, "rows")
        room.member(f"@resident:{SERVER}", "join")  # keeps this server in the room (its current state)
        profiles: list[dict[str, Any]] = [
            {},
            {"displayname": "Plain"},
            {"displayname": "Plain", "avatar_url": f"mxc://{REMOTE}/a"},
            {"displayname": 42, "avatar_url": ["no"]},
            {"displayname": "nul\u0000inside", "avatar_url": f"mxc://{REMOTE}/b\u0000"},
        ]
        for i, profile in enumerate(profiles):
            plain.append(room.member(f"@p{i}:{REMOTE}", "join", **profile))
        plain.append(room.member(f"@p0:{REMOTE}", "join", displayname="Renamed"))
        plain.append(room.member(f"@inv:{SERVER}", "invite"))
        plain.append(room.member(f"@p1:{REMOTE}", "leave"))
        plain.append(room.member(f"@p2:{REMOTE}", "ban", by=CREATOR))
        plain.append(room.member(f"@out:{REMOTE}", "join", kind="outlier", displayname="Outlier"))
        left_out[room.member(f"@rej:{REMOTE}", "join", kind="rejected", displayname="Rejected")] = "rejected when stored"
        later = room.member(f"@later:{REMOTE}", "join", displayname="Rejected later")
        left_out[later] = "rejected after it was stored"
        redacted = room.member(f"@red:{REMOTE}", "join", displayname="To be redacted", avatar_url=f"mxc://{REMOTE}/r")
        room.add(CREATOR, "m.room.redaction", {"reason": "test"}, None, redacts=redacted)
        left_out[redacted] = "redacted"
        banned_join = room.member(f"@spam:{REMOTE}", "join", displayname="Spammer", avatar_url=f"mxc://{REMOTE}/s")
        left_out[banned_join] = "its sender's ban redacts it (MSC4293)"
        room.member(f"@spam:{REMOTE}", "ban", by=CREATOR, **{"org.matrix.msc4293.redact_events": True})
        await _persist(hs, room)
        await store.db_pool.runInteraction("reject_later", store.mark_event_rejected_txn, later, "auth_error")
        store._invalidate_local_get_event_cache(later)
        # The ban's own event is the ban: its sender is not the banned user.
        plain.append(room.state[("m.room.member", f"@spam:{REMOTE}")])

    # The cases are what they are meant to be.
    for event_id, why in left_out.items():
        event = await store.get_event(event_id, allow_none=True)
        if why.startswith("rejected"):
            assert event is None, why
        else:
            assert event is not None and event.internal_metadata.is_redacted(), why
            assert "displayname" not in event.content, why
    assert await store.db_pool.simple_select_list("room_ban_redactions", None, ["user_id"]), "no MSC4293 ban stored"

    asked = plain + list(left_out) + ["$no-such-event"]
    rows = await store.db_pool.runInteraction("rows", plain_member_rows_txn, asked)
    assert set(rows) == set(plain), {left_out.get(e, e) for e in set(rows) ^ set(plain)}
    events = await store.get_events(plain)
    for event_id in plain:
        assert rows[event_id] == _as_row(events[event_id]), event_id
    # Not a trivial comparison: the profiles were read as Synapse keeps them.
    values = set(rows.values())
    assert MemberRow("join", "Plain", f"mxc://{REMOTE}/a") in values
    assert MemberRow("join", None, None) in values  # not strings, NULs
    assert {row.membership for row in values} == {"join", "invite", "leave", "ban"}


@pytest_twisted.ensureDeferred
async def test_many_ids_in_batches(homeserver: SynapseHomeServer) -> None:
    """More ids than one IN list holds."""
    hs = homeserver
    store = hs.get_datastores().main
    room = Room("12", "many")
    ids = [room.member(f"@m{i}:{REMOTE}", "join", kind="outlier", displayname=f"M {i}") for i in range(1200)]
    await _persist(hs, room)
    rows = await store.db_pool.runInteraction("rows", plain_member_rows_txn, ids)
    assert len(rows) == 1200
    assert rows[ids[1100]] == MemberRow("join", "M 1100", None)
