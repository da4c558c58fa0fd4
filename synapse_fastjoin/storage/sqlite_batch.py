# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Multi-row INSERTs (and upserts) on SQLite: one statement for hundreds of rows.

Synapse's `simple_insert_many_txn` (and `LoggingTransaction.execute_batch`)
insert rows on SQLite with the driver's `executemany`: one `sqlite3_step`
per row, and Python's `sqlite3` module lets go of the GIL around every one
of them. Each step is a few microseconds of SQLite; getting the GIL back
afterwards is not, while another thread of the process holds it: a thread
that asks for the GIL waits up to the switch interval (5 ms by default)
before the holder is made to give it up. In a homeserver that is resyncing a
big room the reactor thread is busy much of the time (checks, parsing, live
events), so the database thread's row-by-row inserts queue behind it, a few
milliseconds a row. Measured beside a thread running Python
(`scripts/lib/sqlite_gil_bench.py`, `docs/benchmarks.md`), the rows of a
state's events took hundreds of times as long row by row as alone, and
multi-row statements about as long as alone.

`execute_batch` writes the rows of the statements `simple_insert_many_txn`
builds (`INSERT INTO t (a, b) VALUES(?, ?)`) with one `INSERT ... VALUES
(...), (...), ...` per chunk of up to 500 rows (fewer where the connection's
limit on bound variables says so): one step per chunk. Patch
0035 lets the module install it as the SQLite engine's way to run
`LoggingTransaction.execute_batch`, so that every transaction of the server
writes its rows that way (`resync.sqlite_multi_row_inserts`).
`MultiRowTransaction` does it for one transaction whatever the setting: the
bulk writer's, where Synapse's own `_txn` functions write a big room's state.
Anything else (other statements, PostgreSQL, rows given as mappings) runs as
Synapse runs it.

A multi-row INSERT writes exactly the rows `executemany` writes, in the same
order, in the same transaction, with the same constraints checked: SQLite
inserts the rows of a VALUES list one after the other. What differs is only
the cursor's `rowcount` and `lastrowid` afterwards, which `execute_batch`
documents as not meaningful.
"""

import re
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from synapse.storage.database import LoggingTransaction
from synapse.storage.engines import Sqlite3Engine

if TYPE_CHECKING:
    from synapse.server import HomeServer

# Rows per statement: past a few hundred, a longer statement saves nothing.
MAX_ROWS_PER_STATEMENT = 500

# SQLite's bound-variable limit before 3.32, if the connection does not say.
_DEFAULT_VARIABLE_LIMIT = 999

# The statement `simple_insert_many_txn` builds on SQLite (and ours):
# `INSERT INTO table (a, b, c) VALUES(?, ?, ?)`, placeholders only; and the
# one `simple_upsert_many_txn` builds where the table has a unique index
# (`simple_upsert_many_txn_native_upsert`): the same with `ON CONFLICT (a) DO
# NOTHING` or `DO UPDATE SET b=EXCLUDED.b, c=EXCLUDED.c` after it. SQLite
# applies a multi-row upsert's conflict clause row by row, in order, rows of
# the same statement included: the rows (rowids too) of `executemany`
# (tests/unit/test_sqlite_batch.py compares them, duplicates included).
_WORDS = r"\s*\w+(?:\s*,\s*\w+)*\s*"
_SET = r"\w+\s*=\s*EXCLUDED\.\w+"
_SIMPLE_INSERT = re.compile(
    rf"\s*INSERT\s+INTO\s+(?P<table>\w+)\s*\((?P<columns>{_WORDS})\)"
    r"\s*VALUES\s*\((?P<group>\s*\?(?:\s*,\s*\?)*\s*)\)"
    rf"(?P<conflict>\s+ON\s+CONFLICT\s*\({_WORDS}\)\s*DO\s+(?:NOTHING|UPDATE\s+SET\s+{_SET}(?:\s*,\s*{_SET})*))?"
    r"\s*;?\s*",
    re.IGNORECASE,
)


def _variable_limit(txn: LoggingTransaction) -> int:
    connection = getattr(txn.txn, "connection", None)
    getlimit = getattr(connection, "getlimit", None)  # Python 3.11+
    if getlimit is None:
        return _DEFAULT_VARIABLE_LIMIT
    try:
        return int(getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
    except (sqlite3.Error, AttributeError):
        return _DEFAULT_VARIABLE_LIMIT


def rows_per_statement(txn: LoggingTransaction, columns: int) -> int:
    """How many rows of `columns` values one statement may carry."""
    return max(1, min(MAX_ROWS_PER_STATEMENT, _variable_limit(txn) // max(1, columns)))


def _multi_row_insert(
    txn: LoggingTransaction, head: str, group: str, rows: Sequence[Sequence[Any]], tail: str = ""
) -> None:
    """`head VALUES group, group, ... tail` a chunk of rows at a time."""
    width = group.count("?")
    for row in rows:
        if len(row) != width:
            # Flattened, a short or long row would shift every value after it.
            raise sqlite3.ProgrammingError(
                f"Incorrect number of bindings supplied. The statement uses {width}, and there are {len(row)} supplied."
            )
    per = rows_per_statement(txn, width)
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        txn.execute(
            f"{head} VALUES {', '.join([group] * len(chunk))}{tail}",
            [value for row in chunk for value in row],
        )


def _as_rows(args: list[Any]) -> list[Sequence[Any]] | None:
    """The rows as sequences; None when one is a mapping (named parameters)."""
    if any(isinstance(row, Mapping) for row in args):
        return None
    return [row if isinstance(row, (tuple, list)) else tuple(row) for row in args]


def execute_batch(txn: LoggingTransaction, sql: str, args: Iterable[Iterable[Any]]) -> None:
    """`txn.execute_batch(sql, args)` on SQLite: a plain INSERT of positional
    placeholders as multi-row statements, anything else with `executemany`
    as Synapse runs it. Installed as the SQLite engine's `execute_batch_hook`
    (patch 0035), so that it runs for every transaction of the server."""
    match = _SIMPLE_INSERT.fullmatch(sql)
    if match is None:
        txn.executemany(sql, args)
        return
    args = list(args)
    rows = _as_rows(args)
    columns = [c.strip() for c in match.group("columns").split(",")]
    if rows is None or match.group("group").count("?") != len(columns):
        txn.executemany(sql, args)  # Synapse's path, and its error if any
        return
    if rows:
        group = "(" + ", ".join("?" for _ in columns) + ")"
        _multi_row_insert(
            txn,
            f"INSERT INTO {match.group('table')} ({', '.join(columns)})",
            group,
            rows,
            match.group("conflict") or "",
        )


def install(hs: "HomeServer") -> int:
    """Make every SQLite database of `hs` run `execute_batch` this way;
    returns how many it did (0 on PostgreSQL, or without patch 0035)."""
    installed = 0
    for database in hs.get_datastores().databases:
        engine = database.engine
        if isinstance(engine, Sqlite3Engine) and hasattr(engine, "execute_batch_hook"):
            engine.execute_batch_hook = execute_batch
            installed += 1
    return installed


class MultiRowTransaction(LoggingTransaction):
    """A `LoggingTransaction` on another one's cursor and callbacks, whose
    `execute_batch` sends plain INSERTs as multi-row statements on SQLite
    (for our own transactions, whether or not the hook is installed)."""

    __slots__: list[str] = []

    @classmethod
    def wrap(cls, txn: LoggingTransaction) -> LoggingTransaction:
        """`txn` itself on PostgreSQL; on SQLite a transaction sharing its
        cursor and its after/exception callbacks (what is registered on
        either runs when the transaction ends)."""
        if not isinstance(txn.database_engine, Sqlite3Engine) or isinstance(txn, cls):
            return txn
        return cls(
            txn=txn.txn,
            name=txn.name,
            server_name=txn.server_name,
            database_engine=txn.database_engine,
            after_callbacks=txn.after_callbacks,
            async_after_callbacks=txn.async_after_callbacks,
            exception_callbacks=txn.exception_callbacks,
        )

    def execute_batch(self, sql: str, args: Iterable[Iterable[Any]]) -> None:
        execute_batch(self, sql, args)
