"""Bounded staging (storage/inbound.py) on real SQLite and PostgreSQL
databases carrying Synapse's schema: what leaves a room's queue of staged
inbound events past the bound, in which order it comes back, and what the
admin API counts."""

from synapse.storage.engines import Sqlite3Engine

from synapse_fastjoin.storage import inbound
from synapse_fastjoin.storage.schema import prepare_schema_txn
from tests.unit.test_storage import Database, database  # noqa: F401 (fixture)

ROOM = "!r:example.org"
OTHER = "!other:example.org"


def _stage(db: Database, event_id: str, ts: int, room: str = ROOM, origin: str = "a.org") -> None:
    db.execute(
        "INSERT INTO federation_inbound_events_staging"
        " (origin, room_id, event_id, received_ts, event_json, internal_metadata)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        origin,
        room,
        event_id,
        ts,
        "{}",
        "{}",
    )


def _staged(db: Database, room: str = ROOM) -> list[str]:
    return [
        r[0]
        for r in db.execute(
            "SELECT event_id FROM federation_inbound_events_staging WHERE room_id = ?"
            " ORDER BY received_ts",
            room,
        )
    ]


def _bound(db: Database, limit: int, now: int = 10_000) -> tuple[int, int, int]:
    return db.run_sync("bound", inbound.bound_queue_txn, ROOM, limit, now)


def _pending(db: Database) -> list[str]:
    return [e for e, _, _ in db.run_sync("p", inbound.get_pending_txn, ROOM, 1000, 10**12)]


def test_queue_past_its_bound_keeps_its_oldest_and_remembers_the_rest(database: Database):  # noqa: F811
    database.run_sync("prepare", prepare_schema_txn)
    for i in range(150):
        _stage(database, f"$e{i:03}", 1000 + i)
    _stage(database, "$x", 1000, room=OTHER)
    assert _bound(database, 200) == (0, 150, 0)  # within the bound: untouched
    assert _bound(database, 0) == (0, 150, 0)  # no bound

    assert _bound(database, 100) == (50, 100, 50)
    assert _staged(database) == [f"$e{i:03}" for i in range(100)]
    assert _pending(database) == [f"$e{i:03}" for i in range(100, 150)]
    assert _staged(database, OTHER) == ["$x"], "another room's queue was touched"

    # Arrivals while dropped events wait go behind them, even within the bound.
    _stage(database, "$late", 5000)
    assert _bound(database, 100) == (1, 100, 51)
    assert _pending(database)[-1] == "$late"

    stats = database.run_sync("s", inbound.queue_stats_txn, ROOM)
    assert stats == {"queued": 100, "dropped": 51, "refetched": 0, "pending": 51, "failed": 0}


def test_the_event_synapse_processes_next_is_never_dropped(database: Database):  # noqa: F811
    database.run_sync("prepare", prepare_schema_txn)
    _stage(database, "$p", 1)
    database.run_sync("d", inbound._drop_txn, ROOM, [("$p", "a.org", 1)], 2)
    # Only arrivals after a pending event are queued: the oldest of them is
    # the one Synapse holds in memory now.
    _stage(database, "$head", 10)
    _stage(database, "$next", 11)
    assert _bound(database, 100) == (1, 1, 2)
    assert _staged(database) == ["$head"]
    assert _pending(database) == ["$p", "$next"]


def test_events_fetched_again_stay_queued_and_are_counted(database: Database):  # noqa: F811
    database.run_sync("prepare", prepare_schema_txn)
    for i in range(120):
        _stage(database, f"$e{i:03}", 1000 + i)
    assert _bound(database, 100) == (20, 100, 20)
    # The queue drains; the dropped events are fetched again and queued
    # (later received_ts), oldest first.
    database.execute("DELETE FROM federation_inbound_events_staging WHERE room_id = ?", ROOM)
    first = _pending(database)[:10]
    for n, event_id in enumerate(first):
        _stage(database, event_id, 9000 + n)
    assert database.run_sync("m", inbound.mark_restaged_txn, ROOM, first, 9100) == (10, 0)
    # Still ten pending: the refetched ones, newer than them, stay queued.
    assert _bound(database, 100) == (0, 10, 10)
    assert _staged(database) == first

    # One of the rest was stored meanwhile (get_missing_events): arrived.
    rest = _pending(database)
    database.run_sync("a", inbound.mark_arrived_txn, ROOM, rest[:1], 9200)
    # One no server serves: given up after its attempts, and counted.
    database.run_sync("f", inbound.mark_failed_txn, ROOM, rest[1], "404", True, 9300)
    stats = database.run_sync("s", inbound.queue_stats_txn, ROOM)
    assert stats == {"queued": 10, "dropped": 20, "refetched": 11, "pending": 8, "failed": 1}
    assert database.run_sync("r", inbound.rooms_with_pending_txn) == [ROOM]

    # A queued event dropped again is pending again, and not marked restaged.
    database.execute(
        "DELETE FROM federation_inbound_events_staging WHERE event_id = ?", first[0]
    )
    database.execute(
        "UPDATE fastjoin_inbound_dropped SET state = 'pending' WHERE event_id = ?", first[0]
    )
    assert database.run_sync("m", inbound.mark_restaged_txn, ROOM, [first[0]], 9400) == (0, 0)
    assert first[0] in _pending(database)


def test_retry_backoff_hides_an_event_until_its_next_attempt(database: Database):  # noqa: F811
    database.run_sync("prepare", prepare_schema_txn)
    for i in range(101):
        _stage(database, f"$e{i:03}", 1000 + i)
    assert _bound(database, 100) == (1, 100, 1)
    database.run_sync("b", inbound.begin_attempts_txn, ROOM, [("$e100", 50_000)])
    assert database.run_sync("p", inbound.get_pending_txn, ROOM, 10, 49_999) == []
    assert database.run_sync("p", inbound.get_pending_txn, ROOM, 10, 50_000) == [
        ("$e100", "a.org", 1)
    ]


def test_quick_check_at_arrival_touches_nothing_within_the_bound(database: Database):  # noqa: F811
    database.run_sync("prepare", prepare_schema_txn)
    for i in range(100):
        _stage(database, f"$e{i:03}", 1000 + i)
    quick = lambda limit: database.run_sync(  # noqa: E731
        "q", inbound.bound_queue_txn, ROOM, limit, 10_000, True
    )
    assert quick(100) == (0, 100, 0)
    assert quick(0) == (0, 100, 0)
    _stage(database, "$e100", 1100)
    assert quick(100) == (1, 100, 1)  # past the bound: the full check
    # Within the bound, but a dropped event waits: a later arrival goes behind it.
    database.execute("DELETE FROM federation_inbound_events_staging WHERE event_id = ?", "$e000")
    _stage(database, "$late", 2000)
    assert quick(100) == (1, 99, 2)
    assert _pending(database) == ["$e100", "$late"]


def test_staged_events_removed_by_origin_and_id(database: Database):  # noqa: F811
    """A run's staged events leave the staging area together (a hundred a
    statement): exactly the (origin, event id) pairs given, each
    row's received_ts returned once; a pair not staged is no error."""
    for i in range(250):
        _stage(database, f"$e{i:03}", 1000 + i)
    # The same event from a second server: its own row.
    _stage(database, "$e000", 2000, origin="b.org")
    _stage(database, "$x", 3000, room=OTHER)
    gone = [("a.org", f"$e{i:03}") for i in range(0, 250, 2)] + [("a.org", "$missing"), ("c.org", "$e001")]
    received = database.run_sync("remove", inbound.remove_staged_events_txn, gone)
    assert sorted(received) == [1000 + i for i in range(0, 250, 2)]
    rows = database.execute(
        "SELECT origin, event_id FROM federation_inbound_events_staging WHERE room_id = ? ORDER BY received_ts", ROOM
    )
    assert [tuple(r) for r in rows] == [("a.org", f"$e{i:03}") for i in range(1, 250, 2)] + [("b.org", "$e000")]
    assert _staged(database, OTHER) == ["$x"]
    assert database.run_sync("remove again", inbound.remove_staged_events_txn, gone) == []
    if isinstance(database.engine, Sqlite3Engine):
        # Each row found by the (origin, event_id) index, not by a scan.
        plan = " / ".join(
            str(row[-1])
            for row in database.execute(
                "EXPLAIN QUERY PLAN " + inbound.remove_staged_events_sql(2, postgres=False), "a", "b", "c", "d"
            )
        )
        assert "federation_inbound_events_staging_instance_event" in plan, plan
        assert "SCAN federation_inbound_events_staging" not in plan and "SCAN s" not in plan, plan
