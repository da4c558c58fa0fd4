# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Runs of staged events (handlers/staged_runs.py) and the end of a resync
(resync/finish_gate.py), on a real in-process HomeServer (SQLite or
PostgreSQL, `--db`) holding a partial-state room with a chain of live
messages staged:

- without the gate, a run whose room is un-partial-stated between its
  checks and its write is refused by Synapse and given back whole (what the
  gate is there to avoid: at 200,000 members Synapse took two minutes to
  refuse it);
- with the gate closed (the resync's end under way), the run waits, and once
  the room is full and the gate reopened it is checked against the full
  state and stored, nothing given back;
- a run already past the gate when the end begins is waited for, and its
  events are stored with partial state (for the catch-up to bring up);
- a run whose write fails, for any reason (here an error raised at it),
  is given back whole, its push actions removed, and Synapse's path takes
  its events: none is lost.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from synapse.app.homeserver import SynapseHomeServer
from synapse.logging.context import LoggingContext
from twisted.internet import defer, reactor, task

from synapse_fastjoin.handlers.staged_runs import StagedRuns
from synapse_fastjoin.resync.finish_gate import FinishGate
from synapse_fastjoin.storage.store import FastJoinStore
from tests.harness import inprocess
from tests.harness.endsteps import (
    JoinScenario,
    join_scenario,
    prepare_partial_join,
    un_partial_join,
)
from tests.unit.test_staged_runs_parity import _drain, _stage

SERVER = "joiner.test"


@pytest.fixture
def homeserver(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[SynapseHomeServer]:
    with inprocess.homeservers_for_fixture(
        ("runs",), SERVER, db_backend, tmp_path_factory, request, inprocess.QUIET_BACKGROUND
    ) as made:
        yield made["runs"]


def _messages(scenario: JoinScenario, count: int) -> list[tuple[str, dict[str, Any]]]:
    room = scenario.room
    spec = room.spec
    out = []
    for i in range(count):
        sender = spec.member(1 + i % 5)
        stored = room.create_event(
            sender, "m.room.message", {"msgtype": "m.text", "body": f"live {i}"}, None, 1_700_000_300_000 + i
        )
        out.append((sender.split(":", 1)[1], stored.as_dict()))
    return out


async def _un_partial_room(hs: SynapseHomeServer, scenario: JoinScenario) -> None:
    """What the resync's end does: the join's full state, the current state,
    the room's partial flag cleared."""
    await un_partial_join(hs, scenario)
    await hs.get_state_handler().update_current_state(scenario.room_id)
    assert await hs.get_datastores().main.clear_partial_state_room(scenario.room_id) is not None


async def _stored(hs: SynapseHomeServer, ids: list[str]) -> dict[str, bool]:
    """Of the events stored: whether each has partial state."""
    store = hs.get_datastores().main
    have = await store.have_events_in_timeline(ids)
    return dict(await store.get_partial_state_events(list(have))) if have else {}


@pytest.mark.parametrize("case", ["no gate", "gate closed", "in flight", "error in run"])
@pytest_twisted.ensureDeferred
async def test_runs_and_the_end_of_a_resync(homeserver: SynapseHomeServer, case: str) -> None:
    hs = homeserver
    scenario = join_scenario("12", members=40, servers=4, local_server=SERVER)
    # See test_staged_runs_parity: Synapse's own resume of partial rooms must
    # find none before the room is made.
    hs.get_federation_handler()
    await hs.get_datastores().main.get_partial_state_room_resync_info()
    await task.deferLater(reactor, 0.1)
    await prepare_partial_join(hs, scenario)
    fed = hs.get_federation_server()

    async def keep_queue(room_id: str) -> bool:
        return False

    fed._fastjoin_callbacks.may_prune_staged_events = keep_queue
    fastjoin_store = FastJoinStore(hs.get_datastores().main.db_pool.runInteraction, may_migrate=True)
    await fastjoin_store.ensure_schema()
    gate = FinishGate(reactor) if case in ("gate closed", "in flight") else None
    runs = StagedRuns(hs, fastjoin_store, 100, gate)
    fed._fastjoin_callbacks.register_callbacks(process_staged_run=runs.process_staged_run)

    room_id = scenario.room_id
    ids = await _stage(hs, scenario, _messages(scenario, 8))
    handler = hs.get_federation_event_handler()
    persist = handler.persist_events_and_notify
    finished: list[Any] = []
    stored_when_finished: list[dict[str, bool]] = []
    # Per run reaching its write: whether it was checked against partial state.
    checked_partial: list[bool] = []

    async def between_checks_and_write(room: str, pairs: Any, backfilled: bool = False) -> int:
        if len(pairs) > 1 and not any(ev.internal_metadata.is_outlier() for ev, _ in pairs):
            checked_partial.append(all(context.partial_state for _, context in pairs))
        if not finished and len(pairs) > 1 and checked_partial[-1]:
            finished.append("checked")
            if case == "error in run":
                raise RuntimeError("the write failed")
            if case == "no gate":
                await _un_partial_room(hs, scenario)
            elif case == "in flight":
                # The resync's end begins while this run is past the gate.
                assert gate is not None and gate.in_flight(room_id) == 1
                gate.close(room_id)

                async def finish() -> None:
                    done = await gate.wait_for_runs(room_id)
                    stored_when_finished.append(await _stored(hs, ids))
                    finished.append(done)

                defer.ensureDeferred(finish())
        return await persist(room, pairs, backfilled=backfilled)

    handler.persist_events_and_notify = between_checks_and_write  # type: ignore[method-assign]

    if case == "gate closed":
        assert gate is not None
        gate.close(room_id)
    with LoggingContext(name="finish-gate-runs", server_name=SERVER):
        drained = defer.ensureDeferred(_drain(hs, scenario))
        if case == "gate closed":
            assert gate is not None
            # Until the first run reaches the gate (a fixed wait was too short
            # on a loaded machine).
            for _ in range(200):
                if gate.runs_waited or drained.called:
                    break
                await task.deferLater(reactor, 0.05)
            assert not drained.called and gate.runs_waited == 1
            assert await _stored(hs, ids) == {}  # nothing checked against the partial state
            await _un_partial_room(hs, scenario)
            gate.reopen(room_id)
        await drained

    stored = await _stored(hs, ids)
    assert set(stored) == set(ids), "a live event was not stored"
    for event_id in ids:
        assert await hs.get_datastores().main.get_rejection_reason(event_id) is None, event_id
    if case == "error in run":
        # Given back, not lost.
        assert runs.stats.given_back == 1 and runs.stats.runs >= 1
        assert all(stored.values())
    elif case == "no gate":
        assert runs.stats.given_back == 1
        assert checked_partial[0] is True
        # Checked again (by runs and Synapse's path) with full state.
        assert not any(stored.values())
    elif case == "gate closed":
        assert runs.stats.given_back == 0 and runs.stats.runs >= 1
        assert checked_partial and not any(checked_partial), "a run was checked against the partial state"
        assert not any(stored.values())
    else:
        assert runs.stats.given_back == 0 and runs.stats.runs == 1
        assert checked_partial == [True]
        assert finished == ["checked", True]
        # The end went on only once the run's events were stored, with
        # partial state (the catch-up's to bring up).
        assert set(stored_when_finished[0]) == set(ids) and all(stored_when_finished[0].values())
        assert gate is not None
        gate.reopen(room_id)
        assert gate._rooms == {}
