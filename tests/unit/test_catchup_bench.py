"""What the catch-up costs: events that arrived while a room was partial,
brought to full state by the engine once the state at the join is there
(run with FASTJOIN_CATCHUP_BENCH=MEMBERS,EVENTS[,STATE_EVERY]; prints a line).

A real in-process HomeServer (SQLite) joins a generated room of MEMBERS
members over 1,000 servers (`tests/harness/endsteps.py`: the room's events
stored as outliers, the join with the non-member state as its partial
state). EVENTS live messages from members all over the room follow the join,
each persisted as Synapse persists an event received while partial (its
context computed from its parent's partial state); every STATE_EVERY-th is a
topic change instead. Then the join gets its full state (as the engine does
after fetching it) and the engine's catch-up loop (`_one_pass` without the
end steps: `_catch_up_run`, and `_un_partial_event` where a run cannot go on)
brings every live event up to full state, each re-checked with Synapse's
`_check_event_auth`. Timed: that loop alone. Checked: no partial-state event
is left and none was rejected.

The same file run from a checkout of the engine before a change measures the
change: each run is a fresh process and database.
"""

import os
import random
import time
import types

import pytest
import pytest_twisted

import synapse.server  # noqa: F401  (imports Synapse in the order the module does)
from synapse.events import make_event_from_dict
from synapse.logging.context import LoggingContext

from synapse_fastjoin.resync import engine as engine_module
from synapse_fastjoin.resync.engine import _RoomResync
from synapse_fastjoin.resync.progress import ResyncProgress
from tests.harness.endsteps import join_scenario, prepare_partial_join, un_partial_join
from tests.harness.inprocess import make_homeserver

pytestmark = pytest.mark.skipif(
    not os.environ.get("FASTJOIN_CATCHUP_BENCH"), reason="set FASTJOIN_CATCHUP_BENCH=MEMBERS,EVENTS[,STATE_EVERY]"
)

SERVER = "joiner.test"


def _params() -> tuple[int, int, int]:
    parts = [int(p) for p in os.environ.get("FASTJOIN_CATCHUP_BENCH", "0,0").split(",")]
    members, events = parts[0], parts[1]
    state_every = parts[2] if len(parts) > 2 else 0
    return members, events, state_every


def _txn_times() -> dict[str, tuple[int, float]]:
    """Synapse's count and time of database transactions so far, by name."""
    from synapse.storage.database import sql_txn_count, sql_txn_duration

    counts = {
        s.labels["desc"]: s.value for m in sql_txn_count.collect() for s in m.samples if s.name.endswith("_total")
    }
    return {
        s.labels["desc"]: (int(counts.get(s.labels["desc"], 0)), s.value)
        for m in sql_txn_duration.collect()
        for s in m.samples
        if s.name.endswith("_total")
    }


def _resync(hs, room_id: str) -> _RoomResync:
    r = object.__new__(_RoomResync)
    r._hs = hs
    r._room_id = room_id
    r._config = types.SimpleNamespace(catchup_batch_size=500)
    r._main = hs.get_datastores().main
    r._state_groups = hs.get_datastores().state
    r._storage = hs.get_storage_controllers()
    r._clock = hs.get_clock()
    r._federation_handler = hs.get_federation_handler()
    r._federation_event_handler = hs.get_federation_event_handler()
    r._state_handler = hs.get_state_handler()
    r._notifier = hs.get_notifier()
    r._progress = ResyncProgress(room_id)
    r._membership_flipped = set()
    r._aborted = False
    return r


async def _catch_up(r: _RoomResync) -> None:
    """The catch-up part of `_RoomResync._one_pass`."""
    while True:
        batch = await r._partial_state_events_in_order()
        if not batch:
            return
        i = 0
        progressed = False
        while i < len(batch):
            done = await r._catch_up_run(batch[i : i + engine_module._RUN_LENGTH])
            if done == 0:
                done = 1 if await r._un_partial_event(batch[i]) else 0
                i += 1
            else:
                i += done
            progressed = progressed or bool(done)
        assert progressed, "no partial-state event could be caught up"


@pytest_twisted.ensureDeferred
async def test_catch_up_rate(tmp_path) -> None:
    members, count, state_every = _params()
    hs = make_homeserver(str(tmp_path), SERVER)
    # Made now, while no room is partial: made later, it would resume
    # Synapse's own resync of the room (its constructor does), which would
    # un-partial the live events beside the engine.
    hs.get_federation_handler()
    scenario = join_scenario("10", members, 1000, SERVER, variety=False)
    started = time.monotonic()
    await prepare_partial_join(hs, scenario)
    prepared = time.monotonic() - started

    room = scenario.room
    rng = random.Random(10)
    senders = [room.spec.member(rng.randrange(1, members)) for _ in range(count)]
    storage = hs.get_storage_controllers()
    state_handler = hs.get_state_handler()
    live_ids = []
    started = time.monotonic()
    for i, sender in enumerate(senders):
        ts = 1_700_000_300_000 + i
        if state_every and i % state_every == state_every - 1:
            stored = room.create_event(room.spec.creator, "m.room.topic", {"topic": f"topic {i}"}, "", ts)
        else:
            stored = room.create_event(sender, "m.room.message", {"msgtype": "m.text", "body": f"live {i}"}, None, ts)
        event = make_event_from_dict(stored.as_dict(), scenario.version)
        context = await state_handler.compute_event_context(event)
        assert context.partial_state
        await storage.persistence.persist_event(event, context)
        live_ids.append(event.event_id)
    persisted = time.monotonic() - started

    await un_partial_join(hs, scenario)
    r = _resync(hs, scenario.room_id)
    txn_before = _txn_times()
    profile = None
    if os.environ.get("FASTJOIN_CATCHUP_PROFILE"):
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    started = time.monotonic()
    # In a logging context, as the engine's background process runs (outside
    # one, every transaction logs a warning, which costs time of its own).
    with LoggingContext(name="catchup-bench", server_name=SERVER):
        await _catch_up(r)
    elapsed = time.monotonic() - started
    if profile is not None:
        profile.disable()
        profile.dump_stats(os.environ["FASTJOIN_CATCHUP_PROFILE"])
    txns = _txn_times()
    spent = sorted(
        ((desc, n - txn_before.get(desc, (0, 0.0))[0], t - txn_before.get(desc, (0, 0.0))[1]) for desc, (n, t) in txns.items()),
        key=lambda x: -x[2],
    )
    txn_lines = "; ".join(f"{desc} {n}x {t:.2f}s" for desc, n, t in spent[:6] if n)

    main = hs.get_datastores().main

    def counts(txn) -> tuple[int, int]:
        txn.execute("SELECT COUNT(*) FROM partial_state_events WHERE room_id = ?", (scenario.room_id,))
        left = txn.fetchone()[0]
        txn.execute(
            "SELECT COUNT(*) FROM rejections WHERE event_id IN (%s)" % ",".join("?" * len(live_ids)),
            live_ids,
        )
        return left, txn.fetchone()[0]

    left, rejected = await main.db_pool.runInteraction("catchup_bench_counts", counts)
    print(
        f"\ncatch-up: {members:,} members, {count:,} live events (state every {state_every or '-'}):"
        f" {count / elapsed:,.0f} events/s ({elapsed:.2f} s; {r._progress.catchup_done} in runs;"
        f" prepared in {prepared:.0f} s, live events persisted in {persisted:.0f} s)"
        f"\n  database transactions of the catch-up: {txn_lines}"
    )
    assert left == 0
    assert rejected == 0
