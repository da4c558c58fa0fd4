# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""The memberships of a batch of state deltas read together
(`handlers/state_deltas.py`, patch 0026) give the stats and presence handlers
exactly what their own per-delta `get_event` calls give, on SQLite and
PostgreSQL (`--db`).

A real in-process HomeServer persists rooms (versions 10 and 12) through
Synapse's own event persistence: local and remote joins, a profile change,
leaves, a kick, bans, an unban, invites, knocks, rejected membership events,
a redacted membership, outlier memberships. Their current-state deltas, and
made-up deltas pointing at a missing event, a rejected one, a redacted one, an
outlier, a non-member event, a deleted state entry and non-member state, go
through `StatsHandler._handle_deltas` (the room and user stats deltas it
returns) and `PresenceHandler._newly_joined_users` (the users it finds newly
joined; and, through `_handle_state_delta`, the presence it would send where),
once with no callback registered and once with the module's, from a
cold event cache each time; the answers must be equal. A callback that fails
must leave the answers as with none, read one event at a time. With the module,
1,000 member deltas (2,000 distinct events) must take a few database
transactions per chunk of events instead of one per event.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from synapse.app.homeserver import SynapseHomeServer
from synapse.storage.databases.main.state_deltas import StateDelta

from synapse_fastjoin.handlers.state_deltas import CHUNK, StateDeltaMemberships
from tests.harness.inprocess import homeserver_on_fresh_database
from tests.harness.rooms import CREATOR, MEMBER, REMOTE, Room
from tests.harness.rooms import persist as _persist

SERVER = "deltas.test"


@pytest.fixture
def homeserver(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[SynapseHomeServer]:
    with homeserver_on_fresh_database("state_deltas", SERVER, db_backend, tmp_path_factory, request) as hs:
        yield hs


class Counting:
    """Counts the database transactions (`new_transaction`: every
    `runInteraction`, and every batch of the event fetcher, which on
    PostgreSQL serves many requests on one connection) and the connections
    taken (`runWithConnection`)."""

    def __init__(self, hs: SynapseHomeServer) -> None:
        self.pool = hs.get_datastores().main.db_pool
        self.lock = threading.Lock()
        self.transactions = 0
        self.connections = 0
        new_transaction = self.pool.new_transaction
        run_with_connection = self.pool.runWithConnection

        def counted_transaction(*args: Any, **kwargs: Any) -> Any:
            with self.lock:  # in the database threads
                self.transactions += 1
            return new_transaction(*args, **kwargs)

        def counted_connection(*args: Any, **kwargs: Any) -> Any:
            self.connections += 1
            return run_with_connection(*args, **kwargs)

        self.pool.new_transaction = counted_transaction  # type: ignore[method-assign]
        self.pool.runWithConnection = counted_connection  # type: ignore[method-assign]

    def reset(self) -> tuple[int, int]:
        with self.lock:
            counts = (self.transactions, self.connections)
            self.transactions = self.connections = 0
        return counts


def _cold_event_cache(hs: SynapseHomeServer) -> None:
    store = hs.get_datastores().main
    store._get_event_cache.clear()
    store._event_ref.clear()


def _plain(stats: tuple[dict[str, Counter[str]], dict[str, Counter[str]]]) -> Any:
    # Counters compare missing keys as zero: compare plain dicts.
    return tuple({k: dict(v) for k, v in part.items()} for part in stats)


async def _run(hs: SynapseHomeServer, deltas: list[StateDelta], counting: Counting) -> dict[str, Any]:
    """The stats and presence handlers' answers for `deltas`, from a cold
    event cache, and the database work each took."""
    stats = hs.get_stats_handler()
    presence = hs.get_presence_handler()
    _cold_event_cache(hs)
    counting.reset()
    stats_answer = _plain(await stats._handle_deltas(deltas))
    stats_work = counting.reset()
    _cold_event_cache(hs)
    by_room: dict[str, list[StateDelta]] = {}
    for delta in deltas:
        by_room.setdefault(delta.room_id, []).append(delta)
    joined = {room_id: await presence._newly_joined_users(room_id, ds) for room_id, ds in by_room.items()}  # type: ignore[attr-defined]
    presence_work = counting.reset()

    # And the whole of `_handle_state_delta`: what it would send where
    # (recorded, not sent).
    sent: list[tuple[list[str], list[str]]] = []

    async def record(destinations: Any, states: Any) -> None:
        sent.append((sorted(destinations), sorted(state.user_id for state in states)))

    queue = presence._federation_queue  # type: ignore[attr-defined]
    queue.send_presence_to_destinations = record
    try:
        _cold_event_cache(hs)
        for room_id, ds in by_room.items():
            await presence._handle_state_delta(room_id, ds)  # type: ignore[attr-defined]
    finally:
        del queue.send_presence_to_destinations
    counting.reset()
    return {
        "stats": stats_answer,
        "presence": joined,
        "sent": sent,
        "stats_work": stats_work,
        "presence_work": presence_work,
    }


def _callbacks(hs: SynapseHomeServer) -> Any:
    return hs.get_module_api_callbacks().fastjoin  # type: ignore[attr-defined]


async def _drain(hs: SynapseHomeServer) -> None:
    """Let the handlers' own background loops finish what persisting started."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    stats = hs.get_stats_handler()
    presence = hs.get_presence_handler()
    for _ in range(200):
        if not stats._is_processing and not getattr(presence, "_event_processing", False):
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("background delta processing did not finish")


@pytest_twisted.ensureDeferred
async def test_memberships_equal_get_event(homeserver: SynapseHomeServer) -> None:
    hs = homeserver
    store = hs.get_datastores().main
    hs.get_stats_handler()  # its loop runs from here on, as in a running server
    deltas: list[StateDelta] = []
    special: dict[str, str] = {}
    for version in ("10", "12"):
        room = Room(version, "churn")
        room.member(f"@resident:{SERVER}", "join")  # keeps this server in the room
        users = [f"@u{i}:{SERVER if i % 3 == 0 else (REMOTE if i % 3 == 1 else 'other.example')}" for i in range(24)]
        for i, user in enumerate(users):
            if i % 5 == 0:
                room.member(user, "invite")
            if i % 7 == 0:
                room.member(user, "knock")
            room.member(user, "join", displayname=f"User {i}")
        room.member(users[1], "join", displayname="Renamed")  # join -> join
        room.member(users[2], "leave")
        room.member(users[3], "leave", by=CREATOR)  # kick
        room.member(users[4], "ban", by=CREATOR)
        room.member(users[5], "ban", by=CREATOR)
        room.member(users[5], "leave", by=CREATOR)  # unban
        room.member(users[2], "join")  # back
        special[f"rejected-{version}"] = room.member(users[6], "leave", kind="rejected")
        room.member(f"@never:{REMOTE}", "join", kind="rejected")
        redacted = room.member(users[7], "join", displayname="To be redacted")
        room.add(CREATOR, "m.room.redaction", {"reason": "test"}, None, redacts=redacted)
        special[f"redacted-{version}"] = redacted
        special[f"outlier-{version}"] = room.member(f"@outlier:{REMOTE}", "join", kind="outlier")
        special[f"outlier-ban-{version}"] = room.member(f"@outlier2:{REMOTE}", "ban", kind="outlier")
        special[f"join_rules-{version}"] = room.state[("m.room.join_rules", "")]
        special[f"member-{version}"] = room.state[(MEMBER, users[0])]
        special[f"room-{version}"] = room.room_id
        await _persist(hs, room)

    await _drain(hs)
    max_pos = store.get_room_max_stream_ordering()
    _, real = await hs.get_storage_controllers().state.get_current_state_deltas(0, max_pos)
    real = [d for d in real if d.room_id in (special["room-10"], special["room-12"])]
    assert sum(d.event_type == MEMBER for d in real) > 50
    assert any(d.prev_event_id for d in real if d.event_type == MEMBER)
    deltas.extend(real)

    # The cases of interest are really what they are meant to be.
    for version in ("10", "12"):
        assert await store.get_event(special[f"rejected-{version}"], allow_none=True) is None
        redacted_event = await store.get_event(special[f"redacted-{version}"])
        assert redacted_event.internal_metadata.is_redacted()
        assert dict(redacted_event.content) == {"membership": "join"}
        assert (await store.get_event(special[f"outlier-{version}"])).internal_metadata.is_outlier()

    # Made-up deltas for every kind of event a delta may point at.
    stream = max_pos + 1
    for version in ("10", "12"):
        room_id = special[f"room-{version}"]
        cases = [
            ("@m1:" + REMOTE, "$missing-event-id", special[f"member-{version}"]),
            ("@m2:" + REMOTE, special[f"rejected-{version}"], special[f"member-{version}"]),
            ("@m3:" + SERVER, special[f"member-{version}"], special[f"rejected-{version}"]),
            ("@m4:" + REMOTE, special[f"redacted-{version}"], "$missing-prev-id"),
            ("@m5:" + SERVER, special[f"outlier-{version}"], special[f"redacted-{version}"]),
            ("@m6:" + REMOTE, special[f"outlier-ban-{version}"], special[f"outlier-{version}"]),
            ("@m7:" + SERVER, special[f"join_rules-{version}"], None),  # no membership in content
            ("@m8:" + REMOTE, special[f"member-{version}"], special[f"join_rules-{version}"]),
            ("@m9:" + SERVER, None, special[f"member-{version}"]),  # state deleted
            ("@m10:" + SERVER, special[f"outlier-{version}"], None),
            ("@m11:" + REMOTE, special[f"redacted-{version}"], special[f"outlier-ban-{version}"]),
        ]
        for state_key, event_id, prev_event_id in cases:
            deltas.append(StateDelta(stream, room_id, MEMBER, state_key, event_id, prev_event_id))
            stream += 1
        # Non-member state goes through Synapse's own reads either way.
        deltas.append(StateDelta(stream, room_id, "m.room.name", "", special[f"redacted-{version}"], None))
        deltas.append(StateDelta(stream + 1, room_id, "m.room.join_rules", "", special[f"join_rules-{version}"], None))
        stream += 2

    counting = Counting(hs)
    stock = await _run(hs, deltas, counting)
    # Nothing trivial: stats counted members both ways, presence found joins.
    room_stats = stock["stats"][0]
    assert any(c.get("joined_members", 0) > 10 for c in room_stats.values()), room_stats
    assert any(c.get("banned_members", 0) for c in room_stats.values()), room_stats
    assert stock["stats"][1], "no local user's joined rooms changed"
    assert all(len(users) > 10 for users in stock["presence"].values()), stock["presence"]
    assert stock["sent"] and any(f"@u3:{SERVER}" in users for _, users in stock["sent"]), stock["sent"]
    # An outlier's join counts, a redacted join is still a join (before and
    # after), a missing or rejected event is none.
    joined_10 = stock["presence"][special["room-10"]]
    assert {f"@m10:{SERVER}", f"@m4:{REMOTE}"} <= joined_10, joined_10
    assert not {f"@m5:{SERVER}", f"@m1:{REMOTE}", f"@m2:{REMOTE}"} & joined_10, joined_10

    module = StateDeltaMemberships(hs)
    _callbacks(hs).register_callbacks(state_delta_memberships=module.memberships)
    ours = await _run(hs, deltas, counting)
    assert ours["stats"] == stock["stats"]
    assert ours["presence"] == stock["presence"]
    assert ours["sent"] == stock["sent"]
    assert module.answered > 50
    # Most from `room_memberships`; the redacted and rejected events as events.
    assert 50 < module.from_rows < module.answered, (module.from_rows, module.answered)
    # Far fewer transactions.
    assert ours["stats_work"][0] * 4 < stock["stats_work"][0], (ours["stats_work"], stock["stats_work"])
    assert ours["presence_work"][0] * 4 < stock["presence_work"][0], (ours["presence_work"], stock["presence_work"])

    # A failing callback: logged, and everything as with none.
    async def broken(event_ids: Any) -> Any:
        raise RuntimeError("broken on purpose")

    _callbacks(hs)._state_delta_memberships = broken
    failed = await _run(hs, deltas, counting)
    assert failed["stats"] == stock["stats"] and failed["presence"] == stock["presence"]
    assert failed["sent"] == stock["sent"]
    # ... read one event at a time again (the counts vary by a few between
    # runs: caches other than the event cache stay warm).
    assert failed["stats_work"][0] > 4 * ours["stats_work"][0], (failed, ours)
    assert failed["presence_work"][0] > 4 * ours["presence_work"][0], (failed, ours)


@pytest_twisted.ensureDeferred
async def test_transactions_per_thousand_deltas(homeserver: SynapseHomeServer) -> None:
    """1,000 member deltas, each with its own event and previous event (2,000
    outlier memberships): one fetch per event on Synapse's path, a few per
    chunk of CHUNK events with the module."""
    hs = homeserver
    store = hs.get_datastores().main
    hs.get_stats_handler()
    room = Room("10", "big")
    room.member(f"@resident:{SERVER}", "join")
    await _persist(hs, room)
    memberships = ("join", "leave", "invite", "ban", "knock")
    pairs = []
    for i in range(1000):
        user = f"@big{i}:{SERVER if i % 10 == 0 else REMOTE}"
        prev = room.member(user, memberships[(i + 1) % 5], kind="outlier")
        new = room.member(user, memberships[i % 5], kind="outlier")
        pairs.append((user, new, prev))
    await _persist(hs, room)
    await _drain(hs)
    stream = store.get_room_max_stream_ordering() + 1
    deltas = [StateDelta(stream + i, room.room_id, MEMBER, user, new, prev) for i, (user, new, prev) in enumerate(pairs)]

    counting = Counting(hs)
    stock = await _run(hs, deltas, counting)
    module = StateDeltaMemberships(hs)
    _callbacks(hs).register_callbacks(state_delta_memberships=module.memberships)
    ours = await _run(hs, deltas, counting)
    assert ours["stats"] == stock["stats"] and ours["presence"] == stock["presence"]
    assert len(stock["presence"][room.room_id]) == 200
    print(
        f"\n1,000 member deltas: stats (transactions, connections) {stock['stats_work']} -> {ours['stats_work']};"
        f" presence {stock['presence_work']} -> {ours['presence_work']}"
    )
    chunks = -(-2000 // CHUNK)
    # Synapse's path: a transaction for every event read (2,000 for stats,
    # 1,000 + the 200 joins' previous events for presence).
    assert stock["stats_work"][0] >= 2000, stock["stats_work"]
    assert stock["presence_work"][0] >= 1200, stock["presence_work"]
    # The module: a few per chunk of events, none per delta.
    assert ours["stats_work"][0] <= 2 * chunks + 2, ours["stats_work"]
    assert ours["presence_work"][0] <= 2 * chunks + 2, ours["presence_work"]


@pytest_twisted.ensureDeferred
async def test_module_registers_the_callback(homeserver: SynapseHomeServer) -> None:
    """The module, as Synapse loads it, registers its answer with the patch's hook."""
    from synapse_fastjoin.module import FastJoinModule

    hs = homeserver
    module = FastJoinModule(FastJoinModule.parse_config({}), hs.get_module_api())
    registered = _callbacks(hs)._state_delta_memberships
    assert registered == module.state_delta_memberships.memberships
    room = Room("12", "registered")
    room.member(f"@resident:{SERVER}", "join")
    joined = room.member(f"@a:{REMOTE}", "join")
    rejected = room.member(f"@b:{REMOTE}", "join", kind="rejected")
    await _persist(hs, room)
    assert await _callbacks(hs).state_delta_memberships([joined, rejected, "$missing"]) == {
        joined: "join",
        rejected: None,
        "$missing": None,
    }
