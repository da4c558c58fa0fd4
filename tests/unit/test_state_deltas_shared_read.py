# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""The handlers that follow the current-state delta stream share one read of
a range (patch 0033), on SQLite and PostgreSQL (`--db`).

A real in-process HomeServer holds a generated room's partial-state join,
then gets the room's full current state as the end of a resync writes it
(all its memberships under one stream id). Then:

- three concurrent `get_current_state_deltas` calls for that range make one
  read of the store and get the rows a read of their own gives; a call once
  the read is done reads again, and calls for other ranges read apart;
- a read that fails fails every caller waiting on it, and the next call
  reads again;
- stats, presence and the user directory, woken by the update as Synapse
  wakes them, read the update's stream id once between them (they read it
  three times without the patch).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from synapse.app.homeserver import SynapseHomeServer
from synapse.logging.context import make_deferred_yieldable
from twisted.internet import defer, reactor, task

from synapse_fastjoin.storage.current_state import update_current_state
from tests.harness.endsteps import join_scenario, prepare_partial_join, un_partial_join
from tests.harness.inprocess import homeserver_on_fresh_database

SERVER = "joiner.test"


@pytest.fixture
def homeserver(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[SynapseHomeServer]:
    with homeserver_on_fresh_database("deltas_shared", SERVER, db_backend, tmp_path_factory, request) as hs:
        yield hs


class CountedReads:
    """Wraps the store's `get_partial_current_state_deltas`: the ranges read."""

    def __init__(self, hs: SynapseHomeServer) -> None:
        self.store = hs.get_datastores().main
        self.original = self.store.get_partial_current_state_deltas
        self.ranges: list[tuple[int, int]] = []
        self.fail_next = False

        async def counted(prev_stream_id: int, max_stream_id: int, limit: int = 100) -> Any:
            self.ranges.append((prev_stream_id, max_stream_id))
            # Yield, as a database read does, so that callers can overlap.
            await task.deferLater(reactor, 0.01)
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("the read failed")
            return await self.original(prev_stream_id, max_stream_id, limit)

        self.store.get_partial_current_state_deltas = counted  # type: ignore[method-assign]


def _handler_positions(hs: SynapseHomeServer) -> dict[str, int]:
    return {
        "stats": hs.get_stats_handler().pos,
        "presence": hs.get_presence_handler()._event_pos,  # type: ignore[attr-defined]
        "user directory": hs.get_user_directory_handler().pos,
    }


async def _handlers_at(hs: SynapseHomeServer, position: int) -> None:
    for _ in range(600):
        if all(p is not None and p >= position for p in _handler_positions(hs).values()):
            return
        hs.get_notifier().notify_replication()
        await task.deferLater(reactor, 0.05)
    raise AssertionError(f"handlers not at {position}: {_handler_positions(hs)}")


async def _full_state_update(hs: SynapseHomeServer) -> tuple[str, int, int]:
    """The room's full current state written; (room, position before, after)."""
    scenario = join_scenario("12", members=300, servers=20, local_server=SERVER)
    await prepare_partial_join(hs, scenario)
    await un_partial_join(hs, scenario)
    store = hs.get_datastores().main
    before = store.get_room_max_stream_ordering()
    await _handlers_at(hs, before)
    chunks = await update_current_state(hs, scenario.room_id, chunk_size=100)
    assert chunks > 1
    return scenario.room_id, before, store.get_room_max_stream_ordering()


@pytest_twisted.ensureDeferred
async def test_concurrent_reads_of_a_range_share_one(homeserver: SynapseHomeServer) -> None:
    hs = homeserver
    storage = hs.get_storage_controllers().state
    room_id, before, after = await _full_state_update(hs)
    # The handlers' own reads of the update are done (ours would share them).
    await _handlers_at(hs, after)
    await task.deferLater(reactor, 0)
    reads = CountedReads(hs)

    def call(prev: int, until: int) -> "defer.Deferred[Any]":
        return defer.ensureDeferred(storage.get_current_state_deltas(prev, until))

    results = await make_deferred_yieldable(defer.gatherResults([call(before, after) for _ in range(3)], consumeErrors=True))
    assert reads.ranges == [(before, after)]
    own = await reads.original(before, after, 100)
    assert len(own[1]) > 300 and {d.room_id for d in own[1]} == {room_id}
    for result in results:
        assert result == own
    # Nothing kept once the read is done (the entry goes once its waiters
    # have had the result).
    await task.deferLater(reactor, 0)
    assert await storage.get_current_state_deltas(before, after) == own
    assert reads.ranges == [(before, after)] * 2
    # Other ranges are read apart.
    await task.deferLater(reactor, 0)
    reads.ranges.clear()
    await make_deferred_yieldable(defer.gatherResults([call(before, after), call(before - 1, after)], consumeErrors=True))
    assert sorted(reads.ranges) == sorted([(before, after), (before - 1, after)])

    # A failed read fails its waiters; the next call reads again.
    await task.deferLater(reactor, 0)
    reads.ranges.clear()
    reads.fail_next = True
    failed = await defer.DeferredList([call(before, after) for _ in range(3)], consumeErrors=True)
    assert [ok for ok, _ in failed] == [False] * 3
    assert all(isinstance(f.value, RuntimeError) for _, f in failed)
    await task.deferLater(reactor, 0)
    assert await storage.get_current_state_deltas(before, after) == own
    assert reads.ranges == [(before, after)] * 2


@pytest_twisted.ensureDeferred
async def test_the_handlers_read_a_resyncs_update_once(homeserver: SynapseHomeServer) -> None:
    hs = homeserver
    reads = CountedReads(hs)
    room_id, before, after = await _full_state_update(hs)
    await _handlers_at(hs, after)
    # Every read that returned the update's stream id: the ranges that
    # contain it (it is the only stream id written in between).
    covering = [r for r in reads.ranges if r[0] < after <= r[1]]
    assert len(covering) == 1, reads.ranges
