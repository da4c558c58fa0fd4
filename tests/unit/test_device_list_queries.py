"""Device-list queries around a partial-state room, by query plan (issue 12,
item 5), on SQLite and PostgreSQL databases with Synapse's schema.

What an incoming device-list EDU costs while a room is partial: Synapse used to
read all of `partial_state_rooms` and `partial_state_rooms_servers` per EDU
(patch 0012 asks its cache instead; tests/e2e/test_msc3902_completeness.py
counts the transactions), then upserts one row of `device_lists_remote_pending`
by its unique (user_id, device_id) index. When a resync ends, Synapse reads the
room's pending rows and deletes those no partial room needs any more; both
bound `stream_id`, the table's primary key. Those statements are taken from
Synapse's own source here and their plans checked, with their results against
the rows they were run on.

The replay of our own device changes (patch 0013, the module's
`hosts_with_device_change_txn`) read Synapse's `device_lists_outbound_pokes`
(one row per change per destination: the biggest of the device-list tables)
with a query that SQLite answered by scanning the whole table; its plans and
results against that earlier query are checked too.
"""

import inspect
import re
from typing import Any

import pytest

from synapse.storage.database import LoggingTransaction
from synapse.storage.databases.main.devices import DeviceWorkerStore
from synapse.storage.databases.main import room as room_store_module
from synapse.storage.engines import PostgresEngine

from synapse_fastjoin.storage.device_lists import hosts_with_device_change_txn, joined_among_txn
from tests.unit.test_storage import Database, database  # noqa: F401 (fixture)

ROOM_OLD = "!stuck:remote.test"  # partial since stream position 1
ROOM = "!room:remote.test"  # joined recently
JOINED_AT = 9_950  # ROOM's device_lists_stream_id
PENDING = 10_000  # rows in device_lists_remote_pending, stream ids 1..PENDING
MEMBERS = 400  # of ROOM; every 7th has left
POKES = 30_000
DESTINATIONS = 300

# The query patch 0013's replay used first, kept to show what the plans check
# catches (SQLite scanned the whole of device_lists_outbound_pokes for it).
EARLIER_QUEUED = (
    "SELECT DISTINCT destination FROM device_lists_outbound_pokes"
    " WHERE stream_id >= ? AND user_id = ? AND device_id = ?"
)
EARLIER_SENT = (
    "SELECT destination FROM device_lists_outbound_last_success"
    " WHERE user_id = ? AND stream_id >= ? AND destination IN ({})"
)


def _synapse_sql(source: Any, pattern: str) -> str:
    """A statement as written in Synapse's source of `source`."""
    match = re.search(pattern, inspect.getsource(source), re.S)
    assert match, f"{pattern!r} not in {source.__name__}: Synapse changed, check this test"
    return match.group(1)


PENDING_FOR_ROOM = _synapse_sql(
    DeviceWorkerStore.get_pending_remote_device_list_updates_for_room, r'sql = """(.*?)"""'
)
DELETE_PENDING = _synapse_sql(
    room_store_module,  # RoomStore._clear_partial_state_room_txn
    r'sql = """\s*(DELETE FROM device_lists_remote_pending\s+WHERE stream_id <= \?)\s*"""',
)


def member(i: int) -> str:
    return f"@m{i}:s{i % 40}.test"


def other_user(i: int) -> str:
    return f"@o{i}:t{i % 90}.test"


def populate(db: Database) -> None:
    def txn_fn(txn: LoggingTransaction) -> None:
        for room_id, since in ((ROOM_OLD, 1), (ROOM, JOINED_AT)):
            txn.execute(
                "INSERT INTO rooms (room_id, is_public, room_version) VALUES (?, ?, ?)",
                (room_id, False, "10"),
            )
            txn.execute(
                "INSERT INTO partial_state_rooms (room_id, device_lists_stream_id, joined_via)"
                " VALUES (?, ?, ?)",
                (room_id, since, "remote.test"),
            )
        txn.execute_batch(
            "INSERT INTO partial_state_rooms_servers (room_id, server_name) VALUES (?, ?)",
            [(ROOM_OLD, f"s{i}.test") for i in range(2000)],
        )
        txn.execute_batch(
            "INSERT INTO current_state_events (event_id, room_id, type, state_key, membership)"
            " VALUES (?, ?, 'm.room.member', ?, ?)",
            [(f"$m{i}", ROOM, member(i), "leave" if i % 7 == 0 else "join") for i in range(MEMBERS)]
            + [(f"$o{i}", f"!other{i % 50}:x.test", other_user(i), "join") for i in range(20_000)],
        )
        # One pending row per (user, device); a third of them the room's members.
        txn.execute_batch(
            "INSERT INTO device_lists_remote_pending (stream_id, user_id, device_id, instance_name)"
            " VALUES (?, ?, ?, 'master')",
            [
                (n, member(n % MEMBERS) if n % 3 == 0 else other_user(n), f"D{n}")
                for n in range(1, PENDING + 1)
            ],
        )
        # Our own users' device changes and what was queued / acknowledged.
        txn.execute_batch(
            "INSERT INTO device_lists_stream (stream_id, user_id, device_id, instance_name)"
            " VALUES (?, ?, ?, 'master')",
            [(n, f"@local{n % 100}:here.test", f"L{n % 7}", ) for n in range(1, 5000)],
        )
        txn.execute_batch(
            "INSERT INTO device_lists_outbound_pokes (destination, stream_id, user_id, device_id,"
            " sent, ts, instance_name) VALUES (?, ?, ?, ?, ?, 0, 'master')",
            [
                (f"d{n % DESTINATIONS}.test", n // 6, f"@local{n % 100}:here.test", f"L{n % 7}", n % 2 == 0)
                for n in range(POKES)
            ]
            # @local3's L3 (latest change 4903): queued for d2, not for d0.
            + [("d2.test", 4950, "@local3:here.test", "L3", False), ("d0.test", 4000, "@local3:here.test", "L3", True)],
        )
        txn.execute_batch(
            "INSERT INTO device_lists_outbound_last_success (destination, user_id, stream_id)"
            " VALUES (?, ?, ?)",
            [
                (f"d{d}.test", f"@local{u}:here.test", 4000 + (d * 7 + u) % 1000)
                for d in range(DESTINATIONS)
                for u in range(0, 100, 3)
                if (d, u) != (4, 3)
            ]
            + [("d4.test", "@local3:here.test", 4990)],  # d4 acknowledged it
        )

    db.run_sync("populate", txn_fn)
    if isinstance(db.engine, PostgresEngine):
        # What autovacuum does on a live server: the planner's statistics.
        db.conn.conn.autocommit = True
        try:
            db.conn.conn.cursor().execute("ANALYZE")
        finally:
            db.conn.conn.autocommit = False


def plan(db: Database, sql: str, args: tuple[Any, ...]) -> list[str]:
    """The statement's plan. On PostgreSQL with sequential scans priced out
    (`enable_seqscan = off`): the plan a table gets when it is too big to read
    whole, which the test's tables are not (at their size the planner rightly
    reads a few pages whole); a statement no index can serve still gets a
    sequential scan."""
    postgres = isinstance(db.engine, PostgresEngine)
    prefix = "EXPLAIN " if postgres else "EXPLAIN QUERY PLAN "

    def txn_fn(txn: LoggingTransaction) -> list[str]:
        if postgres:
            txn.execute("SET LOCAL enable_seqscan = off")
        txn.execute(prefix + sql, args)
        return [str(row[0] if isinstance(db.engine, PostgresEngine) else row[3]) for row in txn.fetchall()]

    return db.run_sync("explain", txn_fn)  # SET LOCAL ends with the transaction


def full_scans(lines: list[str], tables: tuple[str, ...]) -> list[str]:
    """Plan lines that read one of `tables` (names or the query's aliases for
    them: SQLite names the alias) whole: SQLite's `SCAN t` (also `SCAN t
    USING [COVERING] INDEX i`: every entry of the index), PostgreSQL's `Seq
    Scan on t`."""
    found = []
    for line in lines:
        for table in tables:
            if re.search(rf"^SCAN {table}\b|Seq Scan on {table}\b", line.strip()):
                found.append(line)
    return found


def uses_index(lines: list[str], table: str, alias: str | None = None) -> bool:
    """Whether the plan reads `table` through one of its indexes."""
    return any(
        re.search(rf"SEARCH ({table}|{alias or table})\b.*USING (COVERING |INTEGER PRIMARY KEY|INDEX)", line)
        or re.search(rf"Index (Only )?Scan using \S+ on {table}\b", line)
        or re.search(rf"Bitmap Heap Scan on {table}\b", line)
        for line in lines
    )


class Recording:
    """A transaction that keeps every statement run through it."""

    def __init__(self, txn: LoggingTransaction) -> None:
        self._txn = txn
        self.statements: list[tuple[str, tuple[Any, ...]]] = []

    def execute(self, sql: str, args: Any = ()) -> None:
        self.statements.append((sql, tuple(args)))
        self._txn.execute(sql, args)

    def __iter__(self) -> Any:
        return iter(self._txn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)


def test_synapse_pending_device_list_statements_are_indexed(database: Database) -> None:  # noqa: F811
    populate(database)
    pending = ("device_lists_remote_pending",)

    # The end of ROOM's resync: its members' pending updates since its join.
    args = (ROOM, JOINED_AT)
    lines = plan(database, PENDING_FOR_ROOM, args)
    # (Synapse's query calls them d and c.)
    assert not full_scans(lines, pending + ("d", "current_state_events", "c")), lines
    assert uses_index(lines, "device_lists_remote_pending", "d"), lines
    rows = database.execute(PENDING_FOR_ROOM, *args)
    expected = {
        (member(n % MEMBERS), f"D{n}")
        for n in range(JOINED_AT + 1, PENDING + 1)
        if n % 3 == 0 and (n % MEMBERS) % 7 != 0
    }
    assert expected and set(rows) == expected and len(rows) == len(expected)

    # ... and ROOM_OLD's, where every pending row is since its join: SQLite
    # goes through the room's members and the (user_id, device_id) index, as
    # PostgreSQL does for a big table (for a small one it reads it whole).
    args_old = (ROOM_OLD, 1)
    lines = plan(database, PENDING_FOR_ROOM, args_old)
    assert not full_scans(lines, pending + ("d",)), lines
    assert database.execute(PENDING_FOR_ROOM, *args_old) == []  # ROOM_OLD has no member rows

    # ROOM's resync ends while ROOM_OLD stays partial: rows no partial room
    # needs any more are deleted by the primary key.
    lines = plan(database, DELETE_PENDING, (1,))
    assert not full_scans(lines, pending), lines
    assert uses_index(lines, "device_lists_remote_pending") or "stream_id<" in " ".join(lines), lines
    database.execute(DELETE_PENDING, 1)
    assert database.execute("SELECT MIN(stream_id), COUNT(*) FROM device_lists_remote_pending") == [
        (2, PENDING - 1)
    ]


@pytest.mark.parametrize("hosts", [5, 120, 700])
def test_device_list_replay_statements_are_indexed_and_answer_as_before(
    database: Database, hosts: int  # noqa: F811
) -> None:
    populate(database)
    tables = ("device_lists_outbound_pokes", "device_lists_outbound_last_success", "device_lists_stream")
    destinations = [f"d{d}.test" for d in range(0, 2 * hosts, 2)]  # some unknown beyond 300
    found_some = False
    for user, device, since in (
        ("@local3:here.test", "L3", 1),
        ("@local42:here.test", "L0", 4700),
        ("@local99:here.test", "L1", 100),
        ("@nobody:here.test", "L1", 1),
    ):
        def run(txn: LoggingTransaction) -> tuple[set[str], list[tuple[str, tuple[Any, ...]]]]:
            rec = Recording(txn)
            return hosts_with_device_change_txn(rec, user, device, since, destinations), rec.statements  # type: ignore[arg-type]

        got, statements = database.run_sync("replay", run)
        assert statements
        for sql, args in statements:
            lines = plan(database, sql, args)
            assert not full_scans(lines, tables), (sql, lines)

        # The earlier query's answer on the same rows.
        [(latest,)] = database.execute(
            "SELECT MAX(stream_id) FROM device_lists_stream WHERE user_id = ? AND device_id = ?", user, device
        )
        if latest is None:
            assert got == set()
            continue
        change = max(latest, since)
        before = {r[0] for r in database.execute(EARLIER_QUEUED, change, user, device)}
        for i in range(0, len(destinations), 500):
            batch = destinations[i : i + 500]
            before |= {
                r[0]
                for r in database.execute(EARLIER_SENT.format(",".join("?" * len(batch))), user, change, *batch)
            }
        assert got == before & set(destinations)
        found_some |= bool(got)
    assert found_some, "the rows must give some servers that already have a change"

    # What the check catches: SQLite read the whole pokes table for the
    # earlier query.
    if not isinstance(database.engine, PostgresEngine):
        lines = plan(database, EARLIER_QUEUED, (4000, "@local3:here.test", "L3"))
        assert full_scans(lines, ("device_lists_outbound_pokes",)), lines


def test_joined_among_is_answered_by_index(database: Database) -> None:  # noqa: F811
    """The end-of-resync device-list check looks up only the users that were
    joined while partial, by `current_state_events`' (room_id, type,
    state_key) index, not the room's whole member list."""
    populate(database)
    wanted = {member(i) for i in range(0, 30)} | {"@nobody:x.test", other_user(3)}
    recording: list[Recording] = []

    def txn_fn(txn: LoggingTransaction) -> set[str]:
        recording.append(Recording(txn))
        return joined_among_txn(recording[0], ROOM, wanted)  # type: ignore[arg-type]

    joined = database.run_sync("joined_among", txn_fn)
    # Every 7th member left; other rooms' users and strangers are not joined here.
    assert joined == {member(i) for i in range(0, 30) if i % 7 != 0}
    for sql, args in recording[0].statements:
        lines = plan(database, sql, args)
        assert not full_scans(lines, ("current_state_events",)), lines
        assert uses_index(lines, "current_state_events"), lines
