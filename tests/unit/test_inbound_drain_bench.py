"""What draining a room's inbound queue costs: live events staged by `/send`,
processed by Synapse's `_process_incoming_pdus_in_room_inner` (run with
FASTJOIN_INBOUND_BENCH=MEMBERS,EVENTS[,partial][,runs]; prints a line).

A real in-process HomeServer (SQLite) joins a generated room of MEMBERS
members over 1,000 servers (`tests/harness/endsteps.py`), with full state
unless `partial` is given. EVENTS live messages from members all over the
room, a chain as one resident sends them, are staged as `/send` stages them
(`insert_received_event_to_staging`, after the checks `/send` does), then the
room's queue is drained by Synapse's loop, as after a `/send`; with `runs`,
the module's runs (handlers/staged_runs.py, patch 0027) take what they can. Timed: the
drain alone, with Synapse's transactions counted by name. Checked: every
event is stored, none rejected or soft-failed, the queue is empty.

Nothing else runs beside it: this is the per-event path's own rate, the bound
on how fast a backlog left at T_full can drain.
"""

import os
import random
import time

import pytest
import pytest_twisted
import synapse.server  # noqa: F401  (imports Synapse in the order the module does)
from synapse.events import make_event_from_dict
from synapse.federation.federation_server import _INBOUND_EVENT_HANDLING_LOCK_NAME
from synapse.logging.context import LoggingContext

from synapse_fastjoin.handlers.staged_runs import StagedRuns
from synapse_fastjoin.storage.store import FastJoinStore
from tests.harness.endsteps import join_scenario, prepare_partial_join, un_partial_join
from tests.harness.inprocess import make_homeserver
from tests.unit.test_catchup_bench import _txn_times

pytestmark = pytest.mark.skipif(
    not os.environ.get("FASTJOIN_INBOUND_BENCH"), reason="set FASTJOIN_INBOUND_BENCH=MEMBERS,EVENTS[,partial]"
)

SERVER = "joiner.test"


@pytest_twisted.ensureDeferred
async def test_inbound_drain_rate(tmp_path) -> None:
    parts = os.environ["FASTJOIN_INBOUND_BENCH"].split(",")
    members, count = int(parts[0]), int(parts[1])
    partial = "partial" in parts[2:]
    runs = "runs" in parts[2:]
    hs = make_homeserver(str(tmp_path), SERVER)
    hs.get_federation_handler()
    scenario = join_scenario("10", members, 1000, SERVER, variety=False)
    started = time.monotonic()
    join = await prepare_partial_join(hs, scenario)
    if not partial:
        await un_partial_join(hs, scenario)
        await hs.get_state_handler().update_current_state(scenario.room_id)
        await hs.get_datastores().main.clear_partial_state_room(scenario.room_id)
    prepared = time.monotonic() - started

    room = scenario.room
    store = hs.get_datastores().main
    rng = random.Random(10)
    # The join is the room's tip: the live chain grows from it.
    origin = room.spec.server_name(1)
    live_ids = []
    for i in range(count):
        sender = room.spec.member(rng.randrange(1, members))
        stored = room.create_event(sender, "m.room.message", {"msgtype": "m.text", "body": f"live {i}"}, None, 1_700_000_300_000 + i)
        event = make_event_from_dict(stored.as_dict(), scenario.version)
        if i == 0:
            assert join.event_id in event.prev_event_ids()
        await store.insert_received_event_to_staging(origin, event)
        live_ids.append(event.event_id)

    def in_order(txn) -> None:
        # Staged in one millisecond they would tie: the queue is taken by
        # the time received, so give each its own, in the order sent.
        txn.execute_batch(
            "UPDATE federation_inbound_events_staging SET received_ts = ? WHERE event_id = ?",
            [(1_700_000_400_000 + i, e) for i, e in enumerate(live_ids)],
        )

    await store.db_pool.runInteraction("inbound_bench_order", in_order)
    fed = hs.get_federation_server()

    async def keep_queue(room_id: str) -> bool:
        return False

    # As the module does in the weeks around a resync: Synapse would prune a
    # queue of over 100 events down to its newest.
    fed._fastjoin_callbacks.may_prune_staged_events = keep_queue
    staged_runs = None
    if runs:
        fastjoin_store = FastJoinStore(store.db_pool.runInteraction, may_migrate=True)
        await fastjoin_store.ensure_schema()
        staged_runs = StagedRuns(hs, fastjoin_store, 100)
        fed._fastjoin_callbacks.register_callbacks(process_staged_run=staged_runs.process_staged_run)
    txn_before = _txn_times()
    started = time.monotonic()
    with LoggingContext(name="inbound-bench", server_name=SERVER):
        lock = await store.try_acquire_lock(_INBOUND_EVENT_HANDLING_LOCK_NAME, scenario.room_id)
        assert lock is not None
        await fed._process_incoming_pdus_in_room_inner(scenario.room_id, scenario.version, lock)
    elapsed = time.monotonic() - started
    txns = _txn_times()
    spent = sorted(
        ((d, n - txn_before.get(d, (0, 0.0))[0], t - txn_before.get(d, (0, 0.0))[1]) for d, (n, t) in txns.items()),
        key=lambda x: -x[2],
    )
    total_txns = sum(n for _, n, _ in spent)
    txn_lines = "; ".join(f"{d} {n}x {t:.2f}s" for d, n, t in spent[:12] if n)

    def counts(txn) -> tuple[int, int, int]:
        marks = ",".join("?" * len(live_ids))
        txn.execute(f"SELECT COUNT(*) FROM events WHERE event_id IN ({marks}) AND NOT outlier", live_ids)
        stored = txn.fetchone()[0]
        txn.execute(f"SELECT COUNT(*) FROM rejections WHERE event_id IN ({marks})", live_ids)
        rejected = txn.fetchone()[0]
        txn.execute("SELECT COUNT(*) FROM federation_inbound_events_staging WHERE room_id = ?", (scenario.room_id,))
        return stored, rejected, txn.fetchone()[0]

    stored, rejected, staged = await store.db_pool.runInteraction("inbound_bench_counts", counts)
    print(
        f"\ninbound drain: {members:,} members, {'partial' if partial else 'full'} state,"
        f" {'runs' if runs else 'one at a time'}"
        f"{f' ({staged_runs.stats.events} events in {staged_runs.stats.runs} runs)' if staged_runs else ''},"
        f" {count:,} staged events:"
        f" {count / elapsed:,.1f} events/s ({elapsed:.2f} s, {total_txns / count:.1f} transactions an event;"
        f" prepared in {prepared:.0f} s)\n  transactions: {txn_lines}"
    )
    assert (stored, rejected, staged) == (count, 0, 0)
