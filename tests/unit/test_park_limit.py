"""resync.park_limit: the events that wait for auth events not received yet
are kept in memory up to the limit; past it the excess is dropped, counted
and logged, and stays missing, so that a later round fetches it again.

The StatePersister of a real in-process HomeServer, fed real Synapse event
objects, as `StateFetcher._take_chunk` hands them over after the checks."""

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from synapse.api.room_versions import RoomVersions
from synapse.app.homeserver import SynapseHomeServer
from synapse.events import EventBase, make_event_from_dict

from synapse_fastjoin.config import parse_config
from synapse_fastjoin.resync.persist import StatePersister
from synapse_fastjoin.resync.progress import ResyncProgress
from tests.harness.inprocess import make_homeserver, shut_down
from tests.harness.sync_run import run

ROOM = "!park:remote.test"
PARK_LIMIT = 3
WAITING = 7


@pytest.fixture
def homeserver(tmp_path) -> Iterator[SynapseHomeServer]:
    hs = make_homeserver(str(tmp_path), "joiner.test")
    try:
        yield hs
    finally:
        shut_down(hs)


def _event(
    event_type: str, state_key: str, content: dict[str, Any], auth: list[str], n: int
) -> EventBase:
    return make_event_from_dict(
        {
            "type": event_type,
            "room_id": ROOM,
            "sender": "@creator:remote.test",
            "state_key": state_key,
            "content": content,
            "auth_events": auth,
            "prev_events": [],
            "depth": n + 1,
            "origin_server_ts": 1_700_000_000_000 + n,
            "hashes": {"sha256": "x"},
            "signatures": {},
        },
        RoomVersions.V10,
    )


def test_events_past_the_park_limit_are_dropped_counted_logged_and_stay_missing(homeserver, caplog):
    config = parse_config({"resync": {"park_limit": PARK_LIMIT}}).resync
    progress = ResyncProgress(ROOM)
    create = _event(
        "m.room.create", "", {"creator": "@creator:remote.test", "room_version": "10"}, [], 0
    )
    # Promised by /state_ids, not received yet: every member below waits for it.
    join_rules = _event("m.room.join_rules", "", {"join_rule": "public"}, [create.event_id], 1)
    members = [
        _event(
            "m.room.member",
            f"@u{n}:remote.test",
            {"membership": "join"},
            [create.event_id, join_rules.event_id],
            2 + n,
        )
        for n in range(WAITING)
    ]
    member_ids = {ev.event_id for ev in members}
    # The round's state as fetch_state_after leaves it: the create event
    # stored (promised, not missing), the join rules and the members missing.
    persister = StatePersister(
        homeserver,
        config,
        ROOM,
        progress,
        promised=frozenset({create.event_id, join_rules.event_id} | member_ids),
        stored={create.event_id},
        rejected_ids=set(),
    )
    assert persister.missing == {join_rules.event_id} | member_ids
    persister.parked = {ev.event_id: ev for ev in members}

    caplog.set_level(logging.INFO, logger="synapse_fastjoin.resync.persist")
    run(persister.drain(final=False))

    parked = set(persister.parked)
    dropped = member_ids - parked
    # The limit holds: the excess is dropped from memory...
    assert len(parked) == PARK_LIMIT, parked
    assert len(dropped) == WAITING - PARK_LIMIT
    assert parked <= member_ids
    # ... counted ...
    assert progress.park_dropped == WAITING - PARK_LIMIT
    # ... logged at INFO ...
    [record] = [r for r in caplog.records if "resync.park_limit" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert (
        f"{WAITING} events wait for auth events not received yet; "
        f"{WAITING - PARK_LIMIT} over resync.park_limit dropped" in record.getMessage()
    ), record.getMessage()
    # ... and still missing: a later round asks for them again (what it
    # fetches, and what its checks admit, is `missing`).
    assert dropped <= persister.missing
    assert persister.missing == {join_rules.event_id} | member_ids
    assert progress.persisted == 0

    # Nothing more over the limit, nothing more dropped.
    caplog.clear()
    run(persister.drain(final=False))
    assert set(persister.parked) == parked
    assert progress.park_dropped == WAITING - PARK_LIMIT
    assert not [r for r in caplog.records if "resync.park_limit" in r.getMessage()]
