# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Turns at a room's events between Synapse's persistence queue and our
writers (`storage/room_turns.py`, patch 0034).

First the rules alone: who runs beside whom, first come first served, a
cancelled wait gives nothing away. Then Synapse's own queue class with the
patch: each task asks for its turn and gives it back, failed or not. Then the
argument the design rests on, on both databases: with the resync's outlier
write holding its turn, Synapse persists a room's new messages beside it and
its state events wait; the database ends up row for row as when the same
writes are done one after the other.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_twisted
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from synapse.app.homeserver import SynapseHomeServer
from synapse.events import EventBase, make_event_from_dict
from synapse.events.snapshot import EventContext
from synapse.logging.context import LoggingContext
from synapse.storage.controllers.persist_events import (
    _EventPeristenceQueue,
    _PersistEventsTask,
    _UpdateCurrentStateTask,
)
from twisted.internet import defer, reactor, task

from synapse_fastjoin.storage.bulk import persist_outliers
from synapse_fastjoin.storage.room_turns import RoomTurns, room_turns, task_kind
from tests.harness import inprocess
from tests.harness.endsteps import JoinScenario, join_scenario, prepare_partial_join
from tests.harness.outliers import dump_tables, name_chains_by_first_event
from tests.unit.test_staged_runs_parity import _canonical, _drain, _stage, _stream_order

SERVER = "joiner.test"
ROOM = "!room:example.org"


async def _tick() -> None:
    await task.deferLater(reactor, 0.01, lambda: None)


# ---------------------------------------------------------------- the rules


@pytest_twisted.ensureDeferred
async def test_outlier_writes_and_new_messages_run_side_by_side_and_nothing_else_does() -> None:
    turns = RoomTurns()
    release_outliers = await turns.acquire(ROOM, "outliers")
    # Synapse's batch of new messages: at once.
    release_plain = await turns.acquire(ROOM, "plain")
    assert sorted(turns.holders(ROOM)) == ["outliers", "plain"]
    # Anything else of Synapse's (state events, current state): waits for both.
    exclusive = defer.ensureDeferred(turns.acquire(ROOM, "exclusive"))
    # A second outlier write of ours (after the exclusive asked): waits too.
    second = defer.ensureDeferred(turns.acquire(ROOM, "outliers"))
    await _tick()
    assert not exclusive.called and not second.called and turns.waiting(ROOM) == 2
    release_plain()
    await _tick()
    assert not exclusive.called
    release_outliers()
    release_outliers()  # twice: harmless
    # First come first served: the exclusive task, then our write.
    assert exclusive.called and not second.called
    assert turns.holders(ROOM) == ["exclusive"]
    (await exclusive)()
    assert second.called
    (await second)()
    assert turns.holders(ROOM) == [] and turns.waiting(ROOM) == 0


@pytest_twisted.ensureDeferred
async def test_a_newcomer_waits_behind_anyone_waiting() -> None:
    """A batch of messages does not overtake our exclusive write (the end of
    a resync) that waits for an outlier write, though it could run beside
    that write: the exclusive writer would otherwise wait for the whole
    backlog of messages."""
    turns = RoomTurns()
    release = await turns.acquire(ROOM, "outliers")
    exclusive = defer.ensureDeferred(turns.acquire(ROOM, "exclusive"))
    plain = defer.ensureDeferred(turns.acquire(ROOM, "plain"))
    await _tick()
    assert not exclusive.called and not plain.called
    release()
    assert exclusive.called and not plain.called
    (await exclusive)()
    assert plain.called
    (await plain)()


@pytest_twisted.ensureDeferred
async def test_a_cancelled_wait_gives_nothing_away() -> None:
    turns = RoomTurns()
    release = await turns.acquire(ROOM, "exclusive")
    cancelled = defer.ensureDeferred(turns.acquire(ROOM, "outliers"))
    behind = defer.ensureDeferred(turns.acquire(ROOM, "plain"))
    await _tick()
    cancelled.cancel()
    with pytest.raises(defer.CancelledError):
        await cancelled
    assert turns.waiting(ROOM) == 1 and turns.holders(ROOM) == ["exclusive"]
    release()
    assert behind.called and turns.holders(ROOM) == ["plain"]
    (await behind)()
    assert turns.holders(ROOM) == [] and turns.waiting(ROOM) == 0


def _event(etype: str, state_key: str | None = None, outlier: bool = False) -> EventBase:
    d: dict[str, Any] = {
        "room_id": ROOM, "type": etype, "sender": "@a:example.org", "content": {},
        "auth_events": [], "prev_events": [], "depth": 5, "origin_server_ts": 1,
        "hashes": {"sha256": "AAAA"}, "signatures": {},
    }
    if state_key is not None:
        d["state_key"] = state_key
    if etype == "m.room.redaction":
        d["content"] = {"redacts": "$x"}
    event = make_event_from_dict(d, KNOWN_ROOM_VERSIONS["10"])
    event.internal_metadata.outlier = outlier
    return event


def test_which_of_synapse_s_tasks_run_beside_our_outlier_writes() -> None:
    def batch(*events: EventBase, backfilled: bool = False) -> _PersistEventsTask:
        return _PersistEventsTask(events_and_contexts=[(e, None) for e in events], backfilled=backfilled)  # type: ignore[misc]

    messages = [_event("m.room.message"), _event("m.reaction")]
    assert task_kind(batch(*messages)) == "plain"
    assert task_kind(batch(*messages, _event("m.room.topic", ""))) == "exclusive"
    assert task_kind(batch(*messages, _event("m.room.member", "@b:example.org"))) == "exclusive"
    assert task_kind(batch(_event("m.room.message", outlier=True))) == "exclusive"
    assert task_kind(batch(_event("m.room.redaction"))) == "exclusive"
    assert task_kind(batch(*messages, backfilled=True)) == "exclusive"
    assert task_kind(_UpdateCurrentStateTask()) == "exclusive"


# ------------------------------------------------- Synapse's queue, patched


@pytest.fixture
def homeservers(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict[str, SynapseHomeServer]]:
    with inprocess.homeservers_for_fixture(
        ("apart", "beside"), SERVER, db_backend, tmp_path_factory, request, inprocess.QUIET_BACKGROUND
    ) as made:
        yield made


@pytest_twisted.ensureDeferred
async def test_synapse_s_queue_asks_for_each_task_s_turn_and_gives_it_back(
    homeservers: dict[str, SynapseHomeServer],
) -> None:
    hs = homeservers["beside"]
    turns = room_turns(hs)
    hs.get_module_api_callbacks().fastjoin.register_callbacks(persistence_turn=turns.synapse_turn)
    seen: list[list[str]] = []

    async def per_item(room_id: str, item: Any) -> str:
        seen.append(turns.holders(room_id))
        if getattr(item, "backfilled", False):
            raise RuntimeError("this one fails")
        return "done"

    queue: _EventPeristenceQueue[str] = _EventPeristenceQueue(hs, hs.hostname, per_item)
    # Our outlier write holds the room: the messages go ahead, the state
    # event and the failing batch wait for it.
    release = await turns.acquire(ROOM, "outliers")
    messages = defer.ensureDeferred(queue.add_to_queue(ROOM, _PersistEventsTask([(_event("m.room.message"), None)], False)))  # type: ignore[list-item]
    await _tick()
    assert messages.called and await messages == "done"
    state = defer.ensureDeferred(queue.add_to_queue(ROOM, _PersistEventsTask([(_event("m.room.topic", ""), None)], False)))  # type: ignore[list-item]
    failing = defer.ensureDeferred(queue.add_to_queue(ROOM, _PersistEventsTask([(_event("m.room.message"), None)], True)))  # type: ignore[list-item]
    await _tick()
    assert not state.called and not failing.called
    release()
    assert await state == "done"
    with pytest.raises(RuntimeError):
        await failing
    # Each task held its turn while it ran, and gave it back, failed or not.
    assert seen == [["outliers", "plain"], ["exclusive"], ["exclusive"]]
    assert turns.holders(ROOM) == [] and turns.waiting(ROOM) == 0


# ------------------------------------------------------ the whole argument


def _messages(scenario: JoinScenario, n: int, first_ts: int) -> list[tuple[str, dict[str, Any]]]:
    room = scenario.room
    out = []
    for i in range(n):
        sender = room.spec.member(1 + i % 7)
        stored = room.create_event(sender, "m.room.message", {"msgtype": "m.text", "body": f"beside {i}"}, None, first_ts + i)
        out.append((sender.split(":", 1)[1], stored.as_dict()))
    return out


def _left_out(scenario: JoinScenario) -> list[str]:
    """Memberships of the full state no stored event needs (the resync's
    share to write): members who send nothing here and whose joins are no
    other event's auth event."""
    room = scenario.room
    needed = {a for e in room.by_id.values() for a in e.as_dict()["auth_events"]}
    return [
        room.current_state[("m.room.member", room.spec.member(i))]
        for i in range(20, 50)
        if room.current_state[("m.room.member", room.spec.member(i))] not in needed
    ]


@contextlib.asynccontextmanager
async def _writer_gated(hs: SynapseHomeServer) -> AsyncIterator[defer.Deferred[None]]:
    """Make the bulk writer wait, once it holds its turn, until the yielded
    Deferred fires (before its stream orderings and its transaction); it is
    fired on the way out if the test did not (a failed check)."""
    id_gen = hs.get_datastores().persist_events._backfill_id_gen  # type: ignore[union-attr]
    real = id_gen.get_next_mult
    gate: defer.Deferred[None] = defer.Deferred()

    @contextlib.asynccontextmanager
    async def gated(n: int) -> AsyncIterator[Any]:
        await gate
        async with real(n) as ids:
            yield ids

    id_gen.get_next_mult = gated  # type: ignore[method-assign]
    try:
        yield gate
    finally:
        id_gen.get_next_mult = real  # type: ignore[method-assign]
        if not gate.called:
            gate.callback(None)


@pytest_twisted.ensureDeferred
async def test_messages_persisted_beside_an_outlier_write_leave_what_one_after_the_other_leaves(
    homeservers: dict[str, SynapseHomeServer],
) -> None:
    scenario = join_scenario("12", members=60, servers=5, local_server=SERVER)
    left_out = _left_out(scenario)
    assert len(left_out) >= 10
    room = scenario.room
    first = _messages(scenario, 12, 1_700_000_300_000)
    topic = room.create_event(room.spec.creator, "m.room.topic", {"topic": "meanwhile"}, "", 1_700_000_350_000)
    second = [(room.spec.creator.split(":", 1)[1], topic.as_dict()), *_messages(scenario, 6, 1_700_000_360_000)]
    dumps: dict[str, dict[str, list[Any]]] = {}
    orders: dict[str, list[Any]] = {}
    for name, hs in homeservers.items():
        hs.get_federation_handler()
        await hs.get_datastores().main.get_partial_state_room_resync_info()
        await task.deferLater(reactor, 0.1)
        await prepare_partial_join(hs, scenario, leave_out=set(left_out))
        turns = room_turns(hs)
        hs.get_module_api_callbacks().fastjoin.register_callbacks(persistence_turn=turns.synapse_turn)
        storage = hs.get_storage_controllers()
        pairs = []
        for event_id in left_out:
            event = make_event_from_dict(copy.deepcopy(room.by_id[event_id].as_dict()), scenario.version)
            event.internal_metadata.outlier = True
            pairs.append((event, EventContext.for_outlier(storage)))

        with LoggingContext(name=f"room-turns-{name}", server_name=SERVER):
            if name == "apart":
                # One after the other: the messages, the outliers, the topic
                # and what follows it.
                await _stage(hs, scenario, first)
                await _drain(hs, scenario)
                await persist_outliers(hs, scenario.room_id, pairs)
                await _stage(hs, scenario, second)
                await _drain(hs, scenario)
            else:
                async with _writer_gated(hs) as gate:
                    write = defer.ensureDeferred(persist_outliers(hs, scenario.room_id, pairs))
                    # Until the write has asked for its turn (one tick was too
                    # short on a loaded machine).
                    for _ in range(1000):
                        if turns.holders(scenario.room_id) or write.called:
                            break
                        await _tick()
                    assert turns.holders(scenario.room_id) == ["outliers"], "the write does not hold its turn"
                    # The messages are persisted while the write holds its turn.
                    await _stage(hs, scenario, first)
                    drained = defer.ensureDeferred(_drain(hs, scenario))
                    for _ in range(200):
                        if drained.called:
                            break
                        await task.deferLater(reactor, 0.1, lambda: None)
                    assert drained.called, "the messages waited for the outlier write"
                    await drained
                    assert not write.called
                    # The topic waits for the write (and the messages after
                    # it for the topic).
                    await _stage(hs, scenario, second)
                    drained = defer.ensureDeferred(_drain(hs, scenario))
                    for _ in range(1000):
                        if turns.waiting(scenario.room_id) or drained.called:
                            break
                        await _tick()
                    assert not drained.called, "a state event was persisted beside the outlier write"
                    assert turns.waiting(scenario.room_id) == 1
                    gate.callback(None)
                    await write
                    await drained
        dumps[name] = _canonical(name_chains_by_first_event(await dump_tables(hs)))
        orders[name] = await _stream_order(hs, scenario.room_id)
        assert turns.holders(scenario.room_id) == [] and turns.waiting(scenario.room_id) == 0

    stored = await homeservers["beside"].get_datastores().main.have_seen_events(
        scenario.room_id, left_out + [make_event_from_dict(d, scenario.version).event_id for _, d in first + second]
    )
    assert len(stored) == len(left_out) + len(first) + len(second)
    assert orders["apart"] == orders["beside"]
    differing = sorted(t for t in set(dumps["apart"]) | set(dumps["beside"]) if dumps["apart"].get(t) != dumps["beside"].get(t))
    assert differing == [], {
        t: (sorted(set(dumps["apart"].get(t, [])) - set(dumps["beside"].get(t, [])), key=repr)[:5],
            sorted(set(dumps["beside"].get(t, [])) - set(dumps["apart"].get(t, [])), key=repr)[:5])
        for t in differing[:3]
    }
