# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Small SQL helpers shared by the `_txn` functions."""

import json
import sqlite3
from typing import Any, Iterable, Iterator, Sequence, TypeVar

from synapse.storage.database import LoggingTransaction
from synapse.storage.engines import Sqlite3Engine
from synapse.util.iterutils import batch_iter

T = TypeVar("T")

# Values per IN list: well under SQLite's bound-variable limit (999 before
# 3.32), with room for a statement's other parameters.
IN_LIST_BATCH = 500


def in_list_batches(
    values: Iterable[T], size: int = IN_LIST_BATCH
) -> Iterator[tuple[tuple[T, ...], str]]:
    """`values` a batch at a time, each batch with its IN list of placeholders
    (`?,?,?`: Synapse's LoggingTransaction turns them into the database's own)."""
    for batch in batch_iter(values, size):
        yield batch, ",".join("?" * len(batch))


# SQLite has its JSON functions built in from 3.38 (before, only where built
# with them).
_SQLITE_JSON = sqlite3.sqlite_version_info >= (3, 38, 0)


def select_rows_txn(
    txn: LoggingTransaction, columns: Sequence[str], rest: str, args: Sequence[Any] = ()
) -> list[tuple[Any, ...]]:
    """The rows of `SELECT <columns> <rest>` (`rest`: FROM, WHERE, ORDER BY,
    LIMIT), as tuples, in the statement's order.

    On SQLite they come back as one value: the statement runs as a subquery
    whose rows `json_group_array` gathers into one JSON array, which is
    parsed here. Python's `sqlite3` gives up the GIL for every row it steps
    and must take it back before the next, waiting up to the interpreter's
    switch interval (5 ms) while the reactor thread runs Python: a read of
    500 rows beside a busy reactor took seconds where alone it takes
    milliseconds (`docs/benchmarks.md`, "The after-work reads rows"). One
    row is one step. TEXT, INTEGER and NULL values come back as the plain
    statement gives them. JSON cannot hold a BLOB and keeps 15 significant
    digits of a REAL: should any value of the answer be either, the same
    statement runs again plainly (the aggregate counts them). SQLite produces
    a subquery's rows in its ORDER BY for an aggregate over it (it does not
    flatten such a subquery), and the array keeps the order in which rows
    were produced.

    PostgreSQL, and SQLite without its JSON functions, run the plain
    statement (psycopg2 takes all the rows in one call)."""
    select = ", ".join(columns)
    if not (_SQLITE_JSON and isinstance(txn.database_engine, Sqlite3Engine)):
        return _plain_rows(txn, select, rest, args)
    aliased = ", ".join(f"{column} AS c{i}" for i, column in enumerate(columns))
    values = ", ".join(f"CASE typeof(c{i}) WHEN 'blob' THEN NULL ELSE c{i} END" for i in range(len(columns)))
    inexact = " OR ".join(f"typeof(c{i}) IN ('real', 'blob')" for i in range(len(columns)))
    txn.execute(
        f"SELECT json_group_array(json_array({values})), SUM({inexact}) FROM (SELECT {aliased} {rest})",
        args,
    )
    row = txn.fetchone()
    if row is None or row[0] is None:
        return []
    if row[1]:
        return _plain_rows(txn, select, rest, args)
    return [tuple(r) for r in json.loads(row[0])]


def _plain_rows(txn: LoggingTransaction, select: str, rest: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
    txn.execute(f"SELECT {select} {rest}", args)
    return [tuple(row) for row in txn.fetchall()]
