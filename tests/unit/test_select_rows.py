# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""`select_rows_txn` (storage/sql.py) gives the rows of the plain statement,
in its order, with the same values, on SQLite and PostgreSQL; on SQLite as one
row of JSON from SQLite (one step of Python's `sqlite3` instead of one a row)."""

from typing import Any

from synapse.storage.database import LoggingTransaction
from synapse.storage.engines import Sqlite3Engine

from synapse_fastjoin.storage import sql
from synapse_fastjoin.storage.sql import select_rows_txn
from tests.unit.test_sqlite_batch import _Trace
from tests.unit.test_storage import Database, database  # noqa: F401 (fixture)

TEXTS = [
    "",
    "plain",
    'quotes " and \' and \\ backslashes \\u0000 as text',
    "événement \u2603 \U0001f600",
    "tab\tnewline\ncontrol\x01",
    '{"looks": ["like", "json"]}',
    "[1, 2]",
    "null",
    "12",
]


def _fill(db: Database) -> None:
    db.execute("CREATE TABLE t (id BIGINT PRIMARY KEY, grp INTEGER, name TEXT, big BIGINT, note TEXT)")
    texts = TEXTS + (["nul\x00inside"] if isinstance(db.engine, Sqlite3Engine) else [])  # PostgreSQL refuses NUL
    rows = []
    for i in range(1234):
        rows.append(
            (
                i,
                i % 3,
                texts[i % len(texts)] + (str(i) if i % 2 else ""),
                2**62 - i if i % 5 else -(2**62) + i,
                None if i % 3 else f"note {i}",
            )
        )

    def insert(txn: LoggingTransaction) -> None:
        txn.execute_batch("INSERT INTO t (id, grp, name, big, note) VALUES (?, ?, ?, ?, ?)", rows)

    db.run_sync("fill", insert)


CASES: list[tuple[tuple[str, ...], str, tuple[Any, ...]]] = [
    (("id", "grp", "name", "big", "note"), "FROM t ORDER BY id", ()),
    (("name", "id"), "FROM t WHERE grp = ? ORDER BY big DESC, id LIMIT ?", (1, 300)),
    (("t.id", "t.name || '!'", "t.note IS NULL"), "FROM t WHERE t.id IN (?, ?, ?) ORDER BY t.id DESC", (5, 500, 1000)),
    (("COUNT(*)", "MAX(big)"), "FROM t", ()),
    (("id",), "FROM t WHERE id < 0", ()),
]


def test_rows_as_the_plain_statement_gives_them(database: Database) -> None:  # noqa: F811
    _fill(database)
    sqlite = isinstance(database.engine, Sqlite3Engine)
    for columns, rest, args in CASES:
        expected = [tuple(r) for r in database.execute(f"SELECT {', '.join(columns)} {rest}", *args)]
        with _Trace(database) as trace:
            got = database.run_sync("select", select_rows_txn, columns, rest, args)
        assert got == expected, (columns, rest)
        # The same types, not only equal values (1 == 1.0 == True).
        assert [[type(v) for v in row] for row in got] == [[type(v) for v in row] for row in expected]
        if sqlite:
            assert len(trace.statements) == 1 and "json_group_array" in trace.statements[0], trace.statements
    if sqlite:
        # Not a trivial comparison: the texts came through JSON intact.
        names = {row[0] for row in database.run_sync("s", select_rows_txn, ("name",), "FROM t", ())}
        assert any(name.startswith("nul\x00inside") for name in names) and "[1, 2]" in names and 'quotes " and \' and \\ backslashes \\u0000 as text' in names


def test_reals_and_blobs_read_plainly(database: Database) -> None:  # noqa: F811
    """JSON would round a REAL and cannot hold a BLOB: an answer with either
    comes from the plain statement, exact."""
    sqlite = isinstance(database.engine, Sqlite3Engine)
    blob = "BLOB" if sqlite else "BYTEA"
    database.execute(f"CREATE TABLE r (id BIGINT PRIMARY KEY, ratio REAL, raw {blob}, name TEXT)")
    rows = [(i, i / 7, None, f"n{i}") for i in range(300)]
    # (Synapse's PostgreSQL engine refuses bytes.)
    rows += [(1000 + i, None, None if i % 2 or not sqlite else b"\x00\xff", f"m{i}") for i in range(300)]

    def insert(txn: LoggingTransaction) -> None:
        txn.execute_batch("INSERT INTO r (id, ratio, raw, name) VALUES (?, ?, ?, ?)", rows)

    database.run_sync("fill", insert)
    for columns, rest in (
        (("id", "ratio", "name"), "FROM r WHERE id < 1000 ORDER BY id"),
        (("id", "raw"), "FROM r WHERE id >= 1000 ORDER BY id DESC"),
        (("id", "name"), "FROM r WHERE id >= 1000 ORDER BY id"),  # no REAL, no BLOB: through JSON
    ):
        expected = [
            tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
            for r in database.execute(f"SELECT {', '.join(columns)} {rest}")
        ]
        with _Trace(database) as trace:
            got = database.run_sync("select", select_rows_txn, columns, rest, ())
        got = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in got]
        assert got == expected, columns
        if sqlite:
            plain = any(s.startswith(f"SELECT {', '.join(columns)} ") for s in trace.statements)
            assert plain == (columns != ("id", "name")), trace.statements
            assert len(trace.statements) == 1 + plain
    if sqlite:  # (PostgreSQL's REAL is four bytes)
        assert (1, 1 / 7, "n1") in database.run_sync("s", select_rows_txn, ("id", "ratio", "name"), "FROM r", ())


def test_sqlite_without_json_runs_the_plain_statement(database: Database, monkeypatch) -> None:  # noqa: F811
    _fill(database)
    monkeypatch.setattr(sql, "_SQLITE_JSON", False)
    columns, rest, args = CASES[1]
    expected = [tuple(r) for r in database.execute(f"SELECT {', '.join(columns)} {rest}", *args)]
    with _Trace(database) as trace:
        assert database.run_sync("select", select_rows_txn, columns, rest, args) == expected
    assert not any("json_group_array" in s for s in trace.statements)

