# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Runs of staged inbound events (handlers/staged_runs.py, patch 0027) leave
the database as Synapse's one-at-a-time path does.

Two real in-process HomeServers on fresh databases (SQLite or PostgreSQL,
`--db`) join the same generated room (room versions 10 and 12), with full
state or with partial state (the resync not yet run), and get the same
inbound events staged, in the same order, as `/send` stages them. The
events mix what runs take with what must end a run:

- chains of messages (runs), one mentioning the local users (push actions),
  one encrypted with a device id (Synapse's device check after persisting);
- a topic change and a ban (state events: Synapse's path), and a message of
  the banned member sent from before the ban (soft-failed with full state);
- a message from a server's user who never joined (rejected), and the
  message after it, whose prev event is the rejected one;
- a fork (two messages on one prev event) and the message that merges it;
- a reaction to a message of the same run (a relation inside the run);
- the same event staged again from a second server (already seen);
- on room version 12, a redaction.

Once more with the first run's persistence failing (given back whole to
Synapse's path, which then processes its events one at a time); with a ban
stored by another path while the first run is checked; with the first
senders' memberships not stored (their auth chains fetched with
`/event_auth`), in runs of a hundred and in runs of three (the next run's
chains fetched while a run is written); and with sending servers whose
answers hold staged events (left to Synapse's path).

One server drains the queue with Synapse's loop alone, the other with the
module's runs. Every table is compared row by row (stream orderings and
times aside), and the events' order in the stream must be the same. The
runs must have taken most of the events: with none taken the test fails.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from synapse.api.errors import PartialStateConflictError
from synapse.app.homeserver import SynapseHomeServer
from synapse.events import EventBase, make_event_from_dict
from synapse.federation.federation_server import _INBOUND_EVENT_HANDLING_LOCK_NAME
from synapse.logging.context import LoggingContext
from synapse.types import get_domain_from_id
from twisted.internet import defer, reactor, task

from synapse_fastjoin.handlers.staged_runs import StagedRuns
from synapse_fastjoin.storage.store import FastJoinStore
from tests.harness import inprocess
from tests.harness.inprocess import store_fake_server_keys
from tests.harness.endsteps import (
    JoinScenario,
    join_scenario,
    prepare_partial_join,
    un_partial_join,
)
from tests.harness.outliers import dump_tables

SERVER = "joiner.test"
JOINER = f"@joiner:{SERVER}"

# Stream orderings and times: the only columns allowed to differ.
VOLATILE_COLUMNS = {
    "stream_ordering",
    "event_stream_ordering",
    "received_ts",
    "last_check",
    "invalidation_ts",
    "inserted_ts",
    "added_ts",
    "ts",
}
# Bookkeeping of processes, locks and streams, not of the events.
SKIPPED_TABLES = {
    "worker_locks",
    "worker_read_write_locks",
    "worker_read_write_locks_mode",
    "stream_positions",
    "event_push_summary_last_receipt_stream_id",
    "event_push_summary_stream_ordering",
    "cache_invalidation_stream_by_instance",
    "federation_stream_position",
    "user_directory_stream_pos",
    "stats_incremental_position",
    "timeline_gaps",
    "scheduled_tasks",
    # SQLite's full-text index: its b-tree pages depend on how the rows were
    # batched; the rows themselves are in event_search_content.
    "event_search_segdir",
    "event_search_segments",
}


@pytest.fixture
def homeservers(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict[str, SynapseHomeServer]]:
    with inprocess.homeservers_for_fixture(
        ("synapse", "runs"), SERVER, db_backend, tmp_path_factory, request, inprocess.QUIET_BACKGROUND
    ) as made:
        yield made


def _live_events(scenario: JoinScenario, long_chain: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """(origin, event dict) in the order they are staged; `long_chain` more
    messages in the first chain."""
    room = scenario.room
    spec = room.spec
    ts = iter(range(1_700_000_300_000, 1_700_000_400_000))
    out: list[tuple[str, dict[str, Any]]] = []

    def add(sender: str, etype: str, content: dict[str, Any], state_key: str | None = None, prev: list[str] | None = None, origin: str | None = None) -> str:
        stored = room.create_event(sender, etype, content, state_key, next(ts), prev_events=prev)
        out.append((origin or sender.split(":", 1)[1], stored.as_dict()))
        return stored.event_id

    def text(i: int, body: str, **extra: Any) -> dict[str, Any]:
        return {"msgtype": "m.text", "body": f"{body} {i}", **extra}

    # A chain of messages from members all over the room.
    first = None
    for i in range(6):
        event_id = add(spec.member(1 + i % 5), "m.room.message", text(i, "hello"))
        first = first or event_id
    for i in range(long_chain):
        add(spec.member(1 + i % 14), "m.room.message", text(i, "a long chain"))
    add(spec.member(2), "m.room.message", text(0, "hi joiner", **{"m.mentions": {"user_ids": [JOINER]}}))
    add(
        spec.member(3),
        "m.room.encrypted",
        {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AAAA", "device_id": "DEVICE", "sender_key": "KEY", "session_id": "S"},
    )
    # A reaction to a message of the same run.
    target = add(spec.member(4), "m.room.message", text(1, "react to me"))
    add(spec.member(5), "m.reaction", {"m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": "+1"}})
    for i in range(4):
        add(spec.member(6 + i), "m.room.message", text(i, "after the reaction"))
    # State events: Synapse's path.
    add(spec.creator, "m.room.topic", {"topic": "a new topic"}, "")
    for i in range(5):
        add(spec.member(9 + i), "m.room.message", text(i, "after the topic"))
    # A fork, and the message that merges it.
    tip = room.forward_extremities()
    add(spec.member(3), "m.room.message", text(0, "fork a"), prev=list(tip))
    add(spec.member(4), "m.room.message", text(0, "fork b"), prev=list(tip))
    for i in range(4):
        add(spec.member(5 + i), "m.room.message", text(i, "merged"))
    # The same event again, from a second server: already seen.
    again = next(spec.server_name(j) for j in range(5) if spec.server_name(j) != out[2][0])
    out.append((again, copy.deepcopy(out[2][1])))
    if room.version.updated_redaction_rules:
        add(spec.creator, "m.room.redaction", {"redacts": first})
    for i in range(5):
        add(spec.member(10 + i), "m.room.message", text(i, "the end"))
    # A sender who never joined: rejected; then the messages after it (their
    # prev event is the rejected one, so the room keeps two extremities and
    # runs start no more: Synapse's path from here on).
    stranger = f"@stranger:{spec.server_name(2)}"
    add(stranger, "m.room.message", text(0, "let me in"))
    for i in range(3):
        add(spec.member(2 + i), "m.room.message", text(i, "after the stranger"))
    before_ban = add(spec.member(7), "m.room.message", text(0, "before the ban"))
    add(spec.creator, "m.room.member", {"membership": "ban"}, spec.member(8))
    # The banned member, from before the ban: soft-failed with full state.
    add(spec.member(8), "m.room.message", text(0, "from before my ban"), prev=[before_ban])
    for i in range(3):
        add(spec.member(9 + i), "m.room.message", text(i, "after the ban"))
    return out


async def _stage(hs: SynapseHomeServer, scenario: JoinScenario, live: list[tuple[str, dict[str, Any]]]) -> list[str]:
    store = hs.get_datastores().main
    ids = []
    for origin, event_dict in live:
        event: EventBase = make_event_from_dict(copy.deepcopy(event_dict), scenario.version)
        await store.insert_received_event_to_staging(origin, event)
        ids.append((origin, event.event_id))

    def in_order(txn: Any) -> None:
        # One millisecond each, in the order sent (staged in one they would tie).
        for i, (origin, event_id) in enumerate(ids):
            txn.execute(
                "UPDATE federation_inbound_events_staging SET received_ts = ? WHERE origin = ? AND event_id = ?",
                (1_700_000_500_000 + i, origin, event_id),
            )

    await store.db_pool.runInteraction("staged_runs_test_order", in_order)
    return [event_id for _, event_id in ids]


async def _hold_notification_rotation(hs: SynapseHomeServer) -> None:
    """Keeps Synapse's own rotation of push actions (every 30 s) from running
    until `_rotate_notifications`.

    On PostgreSQL a rotation reads its upper bound (the events stream's
    current token) after its transaction's snapshot is taken: one that runs
    while events are written can pass over an event committed in between and
    never count it. That race is Synapse's, on either path; it made one
    server of a pair count one notification fewer now and then. The test
    rotates once, after the drain, with nothing being written."""
    store = hs.get_datastores().main
    while store._doing_notif_rotation:
        await task.deferLater(reactor, 0.05)
    # Synapse's rotation returns at once while this is set.
    store._doing_notif_rotation = True


async def _rotate_notifications(hs: SynapseHomeServer) -> None:
    """Synapse's rotation of push actions into `event_push_summary`, up to
    now, once the drain is over (after `_hold_notification_rotation`)."""
    store = hs.get_datastores().main
    assert store._doing_notif_rotation
    await store._find_stream_orderings_for_times()
    # No await between these two: nothing else can start a rotation first.
    store._doing_notif_rotation = False
    await store._rotate_notifs()


async def _drain(hs: SynapseHomeServer, scenario: JoinScenario) -> None:
    store = hs.get_datastores().main
    lock = await store.try_acquire_lock(_INBOUND_EVENT_HANDLING_LOCK_NAME, scenario.room_id)
    assert lock is not None
    await hs.get_federation_server()._process_incoming_pdus_in_room_inner(scenario.room_id, scenario.version, lock)


def _canonical(tables: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for table, (columns, *rows) in tables.items():
        if table in SKIPPED_TABLES or table.endswith("_sequence"):
            continue
        keep = [i for i, c in enumerate(columns) if c not in VOLATILE_COLUMNS]
        out[table] = [tuple(columns[i] for i in keep), *sorted((tuple(r[i] for i in keep) for r in rows), key=repr)]
    return out


def _added(before: list[Any] | None, after: list[Any] | None) -> list[Any]:
    """The rows of `after` not in `before` (as many times as they are added)."""
    left = list((before or [None])[1:])
    out = []
    for row in (after or [None])[1:]:
        if row in left:
            left.remove(row)
        else:
            out.append(row)
    return out


async def _stream_order(hs: SynapseHomeServer, room_id: str) -> list[Any]:
    """The room's events in stream order, and the forward-extremity history
    with each entry's stream ordering named by the event persisted at it."""

    def txn(t: Any) -> list[Any]:
        t.execute("SELECT event_id FROM events WHERE room_id = ? AND NOT outlier ORDER BY stream_ordering", (room_id,))
        order = [r[0] for r in t.fetchall()]
        t.execute(
            "SELECT x.event_id, e.event_id FROM stream_ordering_to_exterm AS x"
            " LEFT JOIN events AS e ON e.stream_ordering = x.stream_ordering WHERE x.room_id = ?",
            (room_id,),
        )
        return [order, sorted(t.fetchall())]

    return await hs.get_datastores().main.db_pool.runInteraction("staged_runs_test_stream_order", txn)


@pytest.mark.parametrize(
    ("room_version", "partial", "give_back"),
    [
        ("10", False, None),
        ("10", True, None),
        ("12", False, None),
        ("12", True, None),
        # The first run's persistence fails (as when the resync ends between
        # its contexts and its write): it is given back whole to Synapse.
        ("12", True, "persist fails"),
        # Another path stores an event in the room (a ban of a sender of
        # the first run) while the first run is checked: the run is given
        # back, and Synapse's path soft-fails that sender's events after it,
        # as on the other server, where the ban is stored before the first
        # event is processed.
        ("12", False, "ban meanwhile"),
        # The senders' memberships of the first messages are not stored yet
        # (the resync has not reached them): Synapse's `_check_event_auth`
        # fetches each one's auth chain from the sending server (/event_auth,
        # played here by the generated room); the runs fetch them for
        # several events at once first.
        ("12", True, "missing auth"),
        # The same with runs of three events: the chains a run needs are
        # fetched while the run before it is checked and written.
        ("12", True, "missing auth ahead"),
        # ... and the sending servers' answers hold the staged events just
        # before and just after the one asked about (a hostile server):
        # Synapse's path drops the one before (stored by then) and stores
        # the one after as an outlier before it comes up.
        ("12", True, "hostile answers"),
        # ... only the staged event just before: for the first event of the
        # next run, that is the last of the run being written.
        ("12", True, "hostile answers, earlier event"),
        # Runs longer than Synapse's persistence batch of 100 events: one
        # run's events are written in several of its transactions.
        ("12", True, "long runs"),
    ],
    ids=[
        "10-full", "10-partial", "12-full", "12-partial", "12-partial-given-back", "12-full-ban-meanwhile",
        "12-partial-missing-auth", "12-partial-missing-auth-ahead", "12-partial-hostile-answers",
        "12-partial-hostile-answers-earlier", "12-partial-long-runs",
    ],
)
@pytest_twisted.ensureDeferred
async def test_runs_write_what_synapse_writes(
    homeservers: dict[str, SynapseHomeServer], room_version: str, partial: bool, give_back: str | None
) -> None:
    scenario = join_scenario(room_version, members=60, servers=5, local_server=SERVER)
    room = scenario.room
    leave_out: set[str] = set()
    hostile = give_back is not None and give_back.startswith("hostile answers")
    missing_auth = hostile or give_back in ("missing auth", "missing auth ahead")
    long_runs = give_back == "long runs"
    run_length = 3 if hostile or give_back == "missing auth ahead" else 250 if long_runs else 100
    if missing_auth:
        # The joins of the senders of the first chain (not auth events of
        # anything stored).
        leave_out = {
            room.current_state[("m.room.member", room.spec.member(i))] for i in range(1, 7)
        }
    fetched: dict[str, list[str]] = {}
    for name, hs in homeservers.items():
        # Made while no room is partial, and given time to find none: its
        # constructor resumes Synapse's own resync of partial-state rooms in
        # the background, which would otherwise find the room half made
        # (on PostgreSQL its read can come after the room's first rows) and
        # clear its partial state.
        hs.get_federation_handler()
        await hs.get_datastores().main.get_partial_state_room_resync_info()
        await task.deferLater(reactor, 0.1)
        await prepare_partial_join(hs, scenario, leave_out=leave_out)
        if leave_out:
            # The sending server's /event_auth: the event's auth chain, as
            # the transport gives it (its signatures are checked, with the
            # servers' keys stored here, the same on both servers: the
            # tables are compared).
            await store_fake_server_keys(
                hs, {get_domain_from_id(e.sender) for e in room.by_id.values()}, 1_800_000_000_000
            )

            async def get_event_auth(
                destination: str, room_id: str, event_id: str, asked: list[str] = fetched.setdefault(name, [])
            ) -> dict[str, Any]:
                asked.append(event_id)
                answer = [room.by_id[e].as_dict() for e in room.auth_chain([event_id])]
                if hostile:
                    i = live_ids.index(event_id)
                    around = (i - 1,) if give_back == "hostile answers, earlier event" else (i - 1, i + 1)
                    answer += [live[j][1] for j in around if 0 <= j < len(live)]
                return {"auth_chain": answer}

            hs.get_federation_client().transport_layer.get_event_auth = get_event_auth  # type: ignore[method-assign]
        if not partial:
            await un_partial_join(hs, scenario)
            await hs.get_state_handler().update_current_state(scenario.room_id)
            await hs.get_datastores().main.clear_partial_state_room(scenario.room_id)
    # Made after the room is stored: they arrive after the join.
    tip = list(scenario.room.forward_extremities())
    live = _live_events(scenario, long_chain=240 if long_runs else 0)
    live_ids = [make_event_from_dict(copy.deepcopy(d), scenario.version).event_id for _, d in live]
    # Not staged: stored by another path (below), on the join's tip. Its
    # target sends the first run's second event.
    ban_origin = scenario.room.spec.creator.split(":", 1)[1]
    ban = make_event_from_dict(
        scenario.room.create_event(
            scenario.room.spec.creator, "m.room.member", {"membership": "ban"}, scenario.room.spec.member(2), 1_700_000_450_000, prev_events=tip
        ).as_dict(),
        scenario.version,
    )
    dumps: dict[str, tuple[dict[str, list[Any]], dict[str, list[Any]]]] = {}
    # Event ids of each persist_events_and_notify call on the runs' server.
    persisted_batches: list[list[str]] = []
    orders: dict[str, list[str]] = {}
    stats = None
    for name, hs in homeservers.items():
        fed = hs.get_federation_server()

        async def keep_queue(room_id: str) -> bool:
            return False

        fed._fastjoin_callbacks.may_prune_staged_events = keep_queue
        if name == "synapse" and give_back == "ban meanwhile":
            handler = hs.get_federation_event_handler()
            receive = handler.on_receive_pdu
            banned_first: list[bool] = []

            async def ban_before_first(
                origin: str, pdu: Any, banned: list[bool] = banned_first, receive: Any = receive
            ) -> None:
                if not banned:
                    banned.append(True)
                    await receive(ban_origin, ban)
                await receive(origin, pdu)

            handler.on_receive_pdu = ban_before_first  # type: ignore[method-assign]
        if name == "runs":
            fastjoin_store = FastJoinStore(hs.get_datastores().main.db_pool.runInteraction, may_migrate=True)
            await fastjoin_store.ensure_schema()
            runs = StagedRuns(hs, fastjoin_store, run_length)
            fed._fastjoin_callbacks.register_callbacks(process_staged_run=runs.process_staged_run)
            stats = runs.stats
            if missing_auth or long_runs:
                handler = hs.get_federation_event_handler()
                persist_and_notify = handler.persist_events_and_notify

                async def record(
                    room_id: str, pairs: Any, backfilled: bool = False, persist: Any = persist_and_notify
                ) -> int:
                    persisted_batches.append([ev.event_id for ev, _ in pairs])
                    return await persist(room_id, pairs, backfilled=backfilled)

                handler.persist_events_and_notify = record  # type: ignore[method-assign]
            if give_back == "ban meanwhile":
                evaluator = hs.get_bulk_push_rule_evaluator()
                push = evaluator.action_for_events_by_user
                banned: list[bool] = []

                async def ban_first(pairs: Any, banned: list[bool] = banned, push: Any = push, hs: Any = hs) -> None:
                    if not banned:
                        banned.append(True)
                        await hs.get_federation_event_handler().on_receive_pdu(ban_origin, ban)
                    await push(pairs)

                evaluator.action_for_events_by_user = ban_first  # type: ignore[method-assign]
            if give_back == "persist fails":
                handler = hs.get_federation_event_handler()
                persist = handler.persist_events_and_notify
                failed: list[int] = []

                async def fail_first_run(
                    room_id: str, pairs: Any, backfilled: bool = False, failed: list[int] = failed, persist: Any = persist
                ) -> int:
                    if len(pairs) > 1 and not failed:
                        failed.append(len(pairs))
                        raise PartialStateConflictError()
                    return await persist(room_id, pairs, backfilled=backfilled)

                handler.persist_events_and_notify = fail_first_run  # type: ignore[method-assign]
        await _hold_notification_rotation(hs)
        before = _canonical(await dump_tables(hs))
        await _stage(hs, scenario, live)
        with LoggingContext(name=f"staged-runs-{name}", server_name=SERVER):
            await _drain(hs, scenario)
            await _rotate_notifications(hs)
        dumps[name] = (before, _canonical(await dump_tables(hs)))
        orders[name] = await _stream_order(hs, scenario.room_id)

    assert stats is not None
    (s_before, s_after), (r_before, r_after) = dumps["synapse"], dumps["runs"]
    # The module's own tables exist only on one side.
    fastjoin = {t for t in r_after if t.startswith("fastjoin_")}
    changed = {t for t in s_after if s_after[t] != s_before.get(t)} | {
        t for t in r_after if t not in fastjoin and r_after[t] != r_before.get(t)
    }
    for table in ("events", "event_forward_extremities", "event_to_state_groups", "rejections", "event_push_actions"):
        assert table in changed, f"{table} was not written"
    # Every table was the same on both servers before, but for the chain
    # cover index of the room's stored state: Synapse numbers its chains in
    # an order of its own, from one persistence to the next. Only Synapse's
    # path writes those two tables here (for the state events; runs take
    # none), so they are compared by the events they got rows for.
    chain_tables = {"event_auth_chains", "event_auth_chain_links"}
    assert {t for t in s_before if s_before[t] != r_before.get(t)} <= chain_tables
    differences = []
    for t in sorted(changed):
        s_new = _added(s_before.get(t), s_after.get(t))
        r_new = _added(r_before.get(t), r_after.get(t))
        if t == "event_auth_chains":
            s_new, r_new = sorted(r[0] for r in s_new), sorted(r[0] for r in r_new)
        elif t == "event_auth_chain_links":
            s_new, r_new = len(s_new), len(r_new)
        if s_new != r_new or (t not in chain_tables and s_after.get(t) != r_after.get(t)):
            differences.append(f"{t}: Synapse's new rows {s_new!r:.600}, the runs' {r_new!r:.600}")
    assert not differences, "\n".join(differences)
    assert orders["synapse"] == orders["runs"]
    assert not s_after["federation_inbound_events_staging"][1:]
    # Most events went through runs, several runs (not one each).
    if hostile:
        # The events whose chains came with staged events went one at a
        # time; the others in runs.
        assert stats.runs >= 4, (stats.runs, stats.events, len(live))
    elif give_back != "ban meanwhile":
        # With the ban, the room keeps two extremities and runs start no more.
        assert stats.runs >= 4 and stats.events >= len(live) // 2, (stats.runs, stats.events, len(live))
    assert stats.given_back == (1 if give_back in ("persist fails", "ban meanwhile") else 0)
    if give_back == "missing auth ahead":
        # Chains fetched while the run before theirs was written.
        assert stats.chains_ahead > 0, stats.chains_ahead
    if missing_auth:
        # Both fetched; the runs no more often than Synapse's path.
        assert fetched["synapse"] and fetched["runs"], fetched
        if hostile:
            # An answer refused is asked for again by Synapse's path, once.
            assert len(fetched["runs"]) <= 2 * len(fetched["synapse"]), fetched
        else:
            assert len(fetched["runs"]) <= len(fetched["synapse"]), fetched
    if missing_auth and not hostile:
        # The first messages (whose senders' memberships were missing) went
        # as one run, not one at a time through Synapse's path.
        first_live = make_event_from_dict(copy.deepcopy(live[0][1]), scenario.version).event_id
        assert any(first_live in batch and len(batch) > 1 for batch in persisted_batches), persisted_batches
        # The fetched chains were persisted together: the first run's
        # senders' joins in one batch, not one batch for each event.
        assert any(len(leave_out & set(batch)) > 1 for batch in persisted_batches), [
            (len(b), len(leave_out & set(b))) for b in persisted_batches
        ]
    if long_runs:
        # The first run: the first chain whole, longer than one of Synapse's
        # persistence transactions.
        assert max(len(batch) for batch in persisted_batches) > 200, [len(b) for b in persisted_batches]
        # Such a run gave the reactor back as it went.
        assert stats.reactor_turns > 0
    if give_back == "ban meanwhile":
        soft_failed = [
            r for r in s_after["event_json"][1:] if '"soft_failed":true' in str(r).replace(" ", "")
        ]
        assert soft_failed, "the banned sender's events were not soft-failed"
        assert r_after["event_json"] == s_after["event_json"]


async def _settled(hs: SynapseHomeServer) -> None:
    """The federation handler made, and its start-up resync of partial-state
    rooms (none here) let run, before the test drives a run itself."""
    hs.get_federation_handler()
    await hs.get_datastores().main.get_partial_state_room_resync_info()
    await task.deferLater(reactor, 0.1)


@pytest_twisted.ensureDeferred
async def test_chains_fetched_ahead_leave_the_run_being_written_alone(
    homeservers: dict[str, SynapseHomeServer],
) -> None:
    """While a run is written, the chains of the next one are fetched ahead.
    A sending server whose answer for the next run's first event holds the
    last event of the run being written (a hostile server: auth chains hold
    state events only) gets nothing stored from that answer or the ones
    after it: not that event as an outlier beside its write (Synapse's path,
    having stored it first, drops it as stored), nor the chains the answers
    after it bring (Synapse's path would fetch them after the first one)."""
    hs = homeservers["runs"]
    scenario = join_scenario("12", members=60, servers=5, local_server=SERVER)
    room = scenario.room
    spec = room.spec
    await _settled(hs)
    # The senders of the next run (members 4 to 6): not stored yet.
    leave_out = {room.current_state[("m.room.member", spec.member(i))] for i in (4, 5, 6)}
    await prepare_partial_join(hs, scenario, leave_out=leave_out)
    await store_fake_server_keys(hs, {get_domain_from_id(e.sender) for e in room.by_id.values()}, 1_800_000_000_000)
    live = [
        (
            spec.member(i).split(":", 1)[1],
            room.create_event(
                spec.member(i), "m.room.message", {"msgtype": "m.text", "body": f"m {i}"}, None, 1_700_000_300_000 + i
            ).as_dict(),
        )
        for i in range(1, 7)
    ]
    live_ids = await _stage(hs, scenario, live)
    asked: list[str] = []

    async def get_event_auth(destination: str, room_id: str, event_id: str) -> dict[str, Any]:
        asked.append(event_id)
        answer = [room.by_id[e].as_dict() for e in room.auth_chain([event_id])]
        if event_id == live_ids[3]:
            answer.append(live[2][1])
        return {"auth_chain": answer}

    hs.get_federation_client().transport_layer.get_event_auth = get_event_auth  # type: ignore[method-assign]
    fastjoin_store = FastJoinStore(hs.get_datastores().main.db_pool.runInteraction, may_migrate=True)
    await fastjoin_store.ensure_schema()
    runs = StagedRuns(hs, fastjoin_store, 3)
    runs._setup()
    run = [(origin, make_event_from_dict(copy.deepcopy(d), scenario.version)) for origin, d in live[:3]]

    await runs._prefetch_auth_chains(scenario.room_id, scenario.version, run)

    store = hs.get_datastores().main
    assert asked == live_ids[3:], asked
    assert not await store.have_seen_events(scenario.room_id, [live_ids[2]]), "the run's event was stored"
    assert not await store.have_seen_events(scenario.room_id, leave_out), "chains of refused answers were stored"
    assert live_ids[3] in runs._refused
    assert runs.stats.chains_ahead == 0


async def _full_state_room_and_run(hs: SynapseHomeServer) -> tuple[list[tuple[str, EventBase]], StagedRuns]:
    """A room joined and resynced (full state), eight messages from its
    members after the join (origin, event), and a StagedRuns to check them."""
    scenario = join_scenario("12", members=40, servers=5, local_server=SERVER)
    room = scenario.room
    spec = room.spec
    await _settled(hs)
    await prepare_partial_join(hs, scenario)
    await un_partial_join(hs, scenario)
    store = hs.get_datastores().main
    await store.clear_partial_state_room(scenario.room_id)
    assert not await store.is_partial_state_room(scenario.room_id)
    run = [
        (
            spec.member(i).split(":", 1)[1],
            make_event_from_dict(
                room.create_event(
                    spec.member(i), "m.room.message", {"msgtype": "m.text", "body": f"m {i}"}, None, 1_700_000_300_000 + i
                ).as_dict(),
                scenario.version,
            ),
        )
        for i in range(1, 9)
    ]
    fastjoin_store = FastJoinStore(store.db_pool.runInteraction, may_migrate=True)
    await fastjoin_store.ensure_schema()
    runs = StagedRuns(hs, fastjoin_store, 100)
    runs._setup()
    return run, runs


@pytest_twisted.ensureDeferred
async def test_checks_find_their_auth_events_while_the_event_cache_churns(
    homeservers: dict[str, SynapseHomeServer],
) -> None:
    """A run's checks load the auth events its warm-up read, even once
    Synapse's event cache has let them go (as it does while a big room's
    `/members` reads the whole membership through it): the run holds them,
    and Synapse's fetches find a referenced event without the database."""
    hs = homeservers["runs"]
    run, runs = await _full_state_room_and_run(hs)
    store = hs.get_datastores().main
    handler = hs.get_federation_event_handler()
    check = handler._check_event_auth
    from_db: list[int] = []
    get_from_db = store._get_events_from_db

    async def counting_get_from_db(event_ids: Any, *args: Any, **kwargs: Any) -> Any:
        from_db.append(len(event_ids))
        return await get_from_db(event_ids, *args, **kwargs)

    async def churned_check(origin: str, event: EventBase, context: Any) -> None:
        store._get_event_cache.clear()  # what reading many other events does to it
        await check(origin, event, context)

    handler._check_event_auth = churned_check  # type: ignore[method-assign]
    store._get_events_from_db = counting_get_from_db  # type: ignore[method-assign]
    try:
        checked = await runs._authorised(run)
    finally:
        del handler._check_event_auth
        del store._get_events_from_db
    assert len(checked) == len(run)
    assert not any(context.rejected or context.partial_state for _, _, context in checked)
    # The warm-up read the auth events (one fetch); the checks read none.
    assert len(from_db) <= 1, from_db


@pytest_twisted.ensureDeferred
async def test_checks_do_not_wait_for_another_read_of_their_auth_events(
    homeservers: dict[str, SynapseHomeServer],
) -> None:
    """A run's checks do not wait for another caller's read of their auth
    events: Synapse shares reads in flight, and a big room's `/members`
    right after its resync reads (and builds, for seconds) the whole
    membership, the run's senders' memberships among it."""
    hs = homeservers["runs"]
    events, runs = await _full_state_room_and_run(hs)
    store = hs.get_datastores().main
    # (The run's senders' memberships, the create and power-level events.)
    member_ids = sorted({a for _, ev in events for a in ev.auth_event_ids()})

    # The other read: the same events and one more (which tells it apart),
    # held up in its database fetch until the test lets it go.
    unknown = "$not-stored-anywhere"
    enqueue = store._enqueue_events
    gate: defer.Deferred[None] = defer.Deferred()

    async def held_enqueue(event_ids: Any) -> Any:
        if unknown in event_ids:
            await gate
        return await enqueue(event_ids)

    store._get_event_cache.clear()
    gc.collect()  # (nothing else holds them: Synapse's map of events in memory lets them go)
    store._enqueue_events = held_enqueue  # type: ignore[method-assign]
    try:
        other = defer.ensureDeferred(store.get_events([*member_ids, unknown]))
        await task.deferLater(reactor, 0.05)
        assert all(event_id in store._current_event_fetches for event_id in member_ids)
        checking = defer.ensureDeferred(runs._authorised(events))
        for _ in range(100):
            if checking.called:
                break
            await task.deferLater(reactor, 0.05)
        done_before_the_other = checking.called
    finally:
        if not gate.called:
            gate.callback(None)
        del store._enqueue_events
    assert len(await other) == len(member_ids)
    checked = await checking
    assert done_before_the_other, "the checks waited for the other read"
    assert len(checked) == len(events)
    assert not any(context.rejected or context.partial_state for _, _, context in checked)
