"""SQLite's row-by-row inserts beside a busy thread, against multi-row ones.

    .venvs/patched/bin/python scripts/lib/sqlite_gil_bench.py [--events 2000] [--busy-events 200]

Writes the rows Synapse writes for a state's membership events (events,
event_json, state_events, room_memberships, event_auth, event_auth_chains)
into a fresh database with Synapse's schema, in transactions of 500 events,
four ways: row by row (Synapse's `executemany`) and as multi-row statements
(`storage/sqlite_batch.py`), each alone and beside a thread that runs
Python without pause, as a homeserver's reactor does while it resyncs a big
room. Prints microseconds per event for each. Python's sqlite3 module lets
go of the GIL for every statement it steps; the busy thread makes each of
those cost up to the interpreter's switch interval (5 ms) to take back.
"""

import argparse
import json
import os
import random
import sqlite3
import string
import sys
import tempfile
import threading
import time

from synapse.storage.database import LoggingDatabaseConnection, LoggingTransaction
from synapse.storage.engines import create_engine
from synapse.storage.prepare_database import prepare_database

from synapse_fastjoin.storage.sqlite_batch import MultiRowTransaction

ROOM = "!bench:example.org"
BATCH = 500
TABLES = {
    "events": (
        "topological_ordering", "event_id", "type", "room_id", "processed", "outlier", "depth",
        "origin_server_ts", "received_ts", "sender", "contains_url", "instance_name", "stream_ordering",
        "state_key", "rejection_reason",
    ),
    "event_json": ("event_id", "room_id", "internal_metadata", "json", "format_version"),
    "state_events": ("event_id", "room_id", "type", "state_key", "prev_state"),
    "room_memberships": (
        "event_id", "user_id", "sender", "room_id", "membership", "display_name", "avatar_url",
        "event_stream_ordering",
    ),
    "event_auth": ("event_id", "auth_id", "room_id"),
    "event_auth_chains": ("event_id", "chain_id", "sequence_number"),
}  # fmt: skip


def _id(rng: random.Random) -> str:
    return "$" + "".join(rng.choices(string.ascii_letters + string.digits, k=43))


def _batch(rng: random.Random, first_ordering: int) -> dict[str, list[tuple]]:
    rows: dict[str, list[tuple]] = {table: [] for table in TABLES}
    for i in range(BATCH):
        event_id, ordering = _id(rng), first_ordering - i
        user = f"@u{rng.randrange(10**9)}:s{rng.randrange(1000)}.example.org"
        auth = [_id(rng) for _ in range(3)]
        body = {
            "type": "m.room.member", "state_key": user, "sender": user, "room_id": ROOM,
            "content": {"membership": "join", "displayname": user}, "auth_events": auth,
            "prev_events": auth[:1], "depth": 5, "origin_server_ts": 1, "hashes": {"sha256": "h" * 43},
            "signatures": {"s.example.org": {"ed25519:a": "s" * 86}},
        }  # fmt: skip
        rows["events"].append(
            (5, event_id, "m.room.member", ROOM, True, True, 5, 1, 2, user, False, "master", ordering, user, None)
        )
        rows["event_json"].append((event_id, ROOM, "{}", json.dumps(body), 3))
        rows["state_events"].append((event_id, ROOM, "m.room.member", user, None))
        rows["room_memberships"].append((event_id, user, user, ROOM, "join", user, None, ordering))
        rows["event_auth"].extend((event_id, a, ROOM) for a in auth)
        rows["event_auth_chains"].append((event_id, -ordering, 1))
    return rows


def _run(path: str, events: int, multi_row: bool, busy: bool, seed: int) -> float:
    """Seconds spent in the inserts and commits of `events` events."""
    engine = create_engine({"name": "sqlite3", "args": {"database": path}})
    conn = LoggingDatabaseConnection(
        conn=sqlite3.connect(path), engine=engine, default_txn_name="bench", server_name="bench"
    )
    engine.on_new_connection(conn)
    prepare_database(conn, engine, None)
    conn.commit()
    rng = random.Random(seed)
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            for i in range(1000):
                n += i

    spinner = threading.Thread(target=spin, daemon=True)
    if busy:
        spinner.start()
    spent = 0.0
    try:
        for b in range(events // BATCH):
            batch = _batch(rng, -1 - b * BATCH)  # made outside the timing
            start = time.perf_counter()
            txn: LoggingTransaction = conn.cursor(txn_name="bench")
            if multi_row:
                txn = MultiRowTransaction.wrap(txn)
            for table, columns in TABLES.items():
                txn.execute_batch(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES({', '.join('?' * len(columns))})",
                    batch[table],
                )
            conn.commit()
            spent += time.perf_counter() - start
    finally:
        stop.set()
        conn.close()
    return spent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2000, help="events for each of the fast ways")
    parser.add_argument("--busy-events", type=int, default=500, help="events for row by row beside the busy thread")
    args = parser.parse_args()
    print(f"SQLite {sqlite3.sqlite_version}, Python {sys.version.split()[0]}, switch interval {sys.getswitchinterval() * 1000:g} ms")
    with tempfile.TemporaryDirectory() as tmp:
        for name, multi_row, busy, events in (
            ("row by row, alone", False, False, args.events),
            ("multi-row, alone", True, False, args.events),
            ("multi-row, beside a busy thread", True, True, args.events),
            ("row by row, beside a busy thread", False, True, args.busy_events),
        ):
            events = max(BATCH, events - events % BATCH)
            path = os.path.join(tmp, f"{name.replace(' ', '_').replace(',', '')}.db")
            seconds = _run(path, events, multi_row, busy, seed=1)
            print(f"  {name:34} {events:6} events  {seconds:7.2f} s  {seconds / events * 1e6:9.0f} µs/event")
    return 0


if __name__ == "__main__":
    sys.exit(main())
