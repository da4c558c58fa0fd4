"""Multi-row INSERTs (storage/sqlite_batch.py) on real SQLite and PostgreSQL
databases: the same rows as Synapse's row-by-row `executemany`, in fewer
statements on SQLite, and every other statement run exactly as Synapse runs
it."""

import math
import sqlite3

import pytest
from synapse.storage.database import DatabasePool, LoggingTransaction
from synapse.storage.engines import Sqlite3Engine

from synapse_fastjoin.storage.sqlite_batch import MAX_ROWS_PER_STATEMENT, MultiRowTransaction
from tests.unit.test_storage import Database, database  # noqa: F401 (fixture)

COLUMNS = ("id", "name", "blob", "flag", "big", "note")


def _rows(n: int, binary: bool = True) -> list[tuple]:
    """Rows of every type Synapse stores (bytes only where the engine takes
    them: Synapse's PostgreSQL engine refuses them)."""
    return [
        (
            i,
            f"événement {i} \u2603" if i % 7 else "",
            bytes([i % 256, 0, 255]) if binary else None,
            bool(i % 2),
            2**62 - i,
            None,
        )
        for i in range(n)
    ]


def _create(db: Database, *tables: str) -> None:
    blob = "BYTEA" if not isinstance(db.engine, Sqlite3Engine) else "BLOB"
    for table in tables:
        db.execute(
            f"CREATE TABLE {table} (id BIGINT PRIMARY KEY, name TEXT NOT NULL, blob {blob},"
            " flag BOOLEAN, big BIGINT, note TEXT)"
        )


def _contents(db: Database, table: str) -> list[tuple]:
    return [
        tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
        for row in db.execute(f"SELECT {', '.join(COLUMNS)} FROM {table} ORDER BY id")
    ]


def _insert(txn: LoggingTransaction, table: str, rows: list[tuple]) -> None:
    DatabasePool.simple_insert_many_txn(MultiRowTransaction.wrap(txn), table, COLUMNS, rows)


class _Trace:
    """Every statement SQLite starts on the connection (one a row for
    `executemany`)."""

    def __init__(self, db: Database) -> None:
        self.conn = db.conn.conn if isinstance(db.engine, Sqlite3Engine) else None
        self.statements: list[str] = []

    def __enter__(self) -> "_Trace":
        if self.conn is not None:
            self.conn.set_trace_callback(self.statements.append)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.conn.set_trace_callback(None)

    def inserts_into(self, table: str) -> int:
        return sum(1 for s in self.statements if s.lstrip().upper().startswith(f"INSERT INTO {table.upper()}"))


def test_the_rows_are_those_executemany_writes(database: Database):  # noqa: F811
    _create(database, "by_row", "by_chunk", "by_generator")
    rows = _rows(1234, binary=isinstance(database.engine, Sqlite3Engine))  # more than two statements' worth

    with _Trace(database) as trace:
        database.run_sync("by_row", lambda txn: DatabasePool.simple_insert_many_txn(txn, "by_row", COLUMNS, rows))
        database.run_sync(
            "by_chunk",
            lambda txn: DatabasePool.simple_insert_many_txn(MultiRowTransaction.wrap(txn), "by_chunk", COLUMNS, rows),
        )
        database.run_sync(
            "by_generator",
            lambda txn: MultiRowTransaction.wrap(txn).execute_batch(
                f"INSERT INTO by_generator ({', '.join(COLUMNS)}) VALUES({', '.join('?' * len(COLUMNS))})",
                (list(row) for row in rows),
            ),
        )

    expected = _contents(database, "by_row")
    assert expected == rows  # (SQLite's booleans are 0 and 1, equal to False and True)
    assert _contents(database, "by_chunk") == expected
    assert _contents(database, "by_generator") == expected
    if isinstance(database.engine, Sqlite3Engine):
        assert trace.inserts_into("by_row") == 1234
        statements = math.ceil(1234 / MAX_ROWS_PER_STATEMENT)
        assert trace.inserts_into("by_chunk") == statements
        assert trace.inserts_into("by_generator") == statements


def test_postgres_transactions_are_not_wrapped(database: Database):  # noqa: F811
    def check(txn: LoggingTransaction) -> None:
        wrapped = MultiRowTransaction.wrap(txn)
        if isinstance(database.engine, Sqlite3Engine):
            assert isinstance(wrapped, MultiRowTransaction) and wrapped.txn is txn.txn
            assert MultiRowTransaction.wrap(wrapped) is wrapped
        else:
            assert wrapped is txn

    database.run_sync("wrap", check)


def test_statements_respect_the_connections_variable_limit(database: Database):  # noqa: F811
    if not isinstance(database.engine, Sqlite3Engine):
        pytest.skip("SQLite's limit")
    _create(database, "t")
    conn = database.conn.conn
    before = conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 20)
    try:
        with _Trace(database) as trace:
            database.run_sync("t", lambda txn: _insert(txn, "t", _rows(20)))
    finally:
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, before)
    # 20 variables, six columns: three rows a statement.
    assert trace.inserts_into("t") == math.ceil(20 / 3)
    assert _contents(database, "t") == _rows(20)


def test_other_statements_run_row_by_row_as_synapse_runs_them(database: Database):  # noqa: F811
    if not isinstance(database.engine, Sqlite3Engine):
        pytest.skip("the wrapper only exists on SQLite")
    _create(database, "t")
    rows = _rows(10)

    def txn_fn(txn: LoggingTransaction) -> None:
        multi = MultiRowTransaction.wrap(txn)
        # Named parameters: not a sequence of values to flatten.
        multi.execute_batch(
            "INSERT INTO t (id, name, blob, flag, big, note) VALUES (:id, :n, :b, :f, :g, NULL)",
            ({"id": r[0], "n": r[1], "b": r[2], "f": r[3], "g": r[4]} for r in rows[:4]),
        )
        # A mapping for positional placeholders: Synapse's path, and its error.
        with pytest.raises(sqlite3.ProgrammingError):
            multi.execute_batch("INSERT INTO t (id, name) VALUES (?, ?)", [{"id": 99, "name": "y"}])
        multi.execute_batch("INSERT INTO t (id, name) VALUES (?, ?)", [(100, "x")])
        # Not a plain insert or upsert: an upsert setting an expression, an
        # expression, an update.
        multi.execute_batch(
            "INSERT INTO t (id, name) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET name = name || excluded.name",
            [(0, "first"), (0, "second"), (4, "four")],
        )
        multi.execute_batch("INSERT INTO t (id, name, big) VALUES (?, ?, 7 * ?)", [(5, "five", 6), (6, "six", 1)])
        multi.execute_batch("UPDATE t SET flag = ? WHERE id = ?", [(True, 1), (True, 2)])

    with _Trace(database) as trace:
        database.run_sync("t", txn_fn)

    assert trace.inserts_into("t") == 4 + 1 + 3 + 2
    got = {row[0]: row for row in _contents(database, "t")}
    assert got[0][1] == "firstsecond" and got[4][1] == "four" and got[5][4] == 42
    assert got[1][3] and got[2][3] and got[100][1] == "x"
    assert sorted(got) == [0, 1, 2, 3, 4, 5, 6, 100]


def test_a_row_of_the_wrong_width_is_refused_before_anything_is_written(database: Database):  # noqa: F811
    if not isinstance(database.engine, Sqlite3Engine):
        pytest.skip("SQLite's path")
    _create(database, "t")
    rows = _rows(700)
    short = rows[650][:-1]  # in the second statement's worth

    def txn_fn(txn: LoggingTransaction) -> int:
        with pytest.raises(sqlite3.ProgrammingError, match="Incorrect number of bindings"):
            DatabasePool.simple_insert_many_txn(
                MultiRowTransaction.wrap(txn), "t", COLUMNS, rows[:650] + [short] + rows[651:]
            )
        txn.execute("SELECT COUNT(*) FROM t")
        return txn.fetchone()[0]

    # Flattened, the short row would have shifted every later value.
    assert database.run_sync("t", txn_fn) == 0


def test_a_duplicate_key_fails_as_it_does_row_by_row(database: Database):  # noqa: F811
    _create(database, "t")
    rows = _rows(5) + [_rows(3)[2]]
    error = sqlite3.IntegrityError if isinstance(database.engine, Sqlite3Engine) else Exception

    with pytest.raises(error):
        database.run_sync("t", lambda txn: _insert(txn, "t", rows))
    assert _contents(database, "t") == []  # rolled back with the transaction


def test_callbacks_registered_on_the_wrapper_run_with_the_transaction(database: Database):  # noqa: F811
    if not isinstance(database.engine, Sqlite3Engine):
        pytest.skip("the wrapper only exists on SQLite")
    after: list = []
    on_error: list = []
    txn = LoggingTransaction(
        txn=database.conn.conn.cursor(),
        name="t",
        server_name="test",
        database_engine=database.engine,
        after_callbacks=after,
        async_after_callbacks=[],
        exception_callbacks=on_error,
    )
    multi = MultiRowTransaction.wrap(txn)
    multi.call_after(print, "after")
    multi.call_on_exception(print, "error")
    assert [entry[0] for entry in after] == [print] and [entry[0] for entry in on_error] == [print]
    database.conn.conn.rollback()


def test_installed_as_the_engines_hook_it_runs_every_transactions_batches(database: Database):  # noqa: F811
    """Patch 0035: with the hook installed, Synapse's own
    `simple_insert_many_txn` on a plain transaction sends multi-row
    statements; without it, one statement a row, as before."""
    from types import SimpleNamespace

    from synapse_fastjoin.storage.sqlite_batch import execute_batch, install

    _create(database, "hooked", "plain")
    hs = SimpleNamespace(
        get_datastores=lambda: SimpleNamespace(databases=[SimpleNamespace(engine=database.engine)])
    )
    sqlite = isinstance(database.engine, Sqlite3Engine)
    rows = _rows(600, binary=sqlite)
    assert install(hs) == (1 if sqlite else 0)
    try:
        if sqlite:
            assert database.engine.execute_batch_hook is execute_batch
        with _Trace(database) as trace:
            database.run_sync(
                "hooked", lambda txn: DatabasePool.simple_insert_many_txn(txn, "hooked", COLUMNS, rows)
            )
    finally:
        if sqlite:
            database.engine.execute_batch_hook = None
    with _Trace(database) as untraced:
        database.run_sync("plain", lambda txn: DatabasePool.simple_insert_many_txn(txn, "plain", COLUMNS, rows))
    assert _contents(database, "hooked") == _contents(database, "plain") == rows
    if sqlite:
        assert trace.inserts_into("hooked") == 2
        assert untraced.inserts_into("plain") == 600


def _upsert_table(db: Database, table: str) -> None:
    db.execute(f"CREATE TABLE {table} (k BIGINT NOT NULL, k2 TEXT NOT NULL, v TEXT, w BIGINT)")
    db.execute(f"CREATE UNIQUE INDEX {table}_key ON {table} (k, k2)")
    db.execute(f"INSERT INTO {table} (k, k2, v, w) VALUES (1, 'a', 'before', 0), (7, 'b', 'before', 0)")


def test_upserts_write_the_rows_executemany_writes(database: Database):  # noqa: F811
    """`simple_upsert_many_txn` on a table with a unique index (Synapse's
    native upsert, `ON CONFLICT ... DO NOTHING` or `DO UPDATE SET
    v=EXCLUDED.v, ...`): the same rows, rowids included, as row by row, with
    keys repeated within the batch and keys already in the table."""
    if not isinstance(database.engine, Sqlite3Engine):
        pytest.skip("SQLite's path (on PostgreSQL Synapse sends upserts with execute_values)")
    keys = [(i % 41, "ab"[(i // 41) % 2]) for i in range(1100)]  # every key several times
    values = [(f"v{i}", i) for i in range(1100)]
    for names in (("v", "w"), ()):
        tag = "upd" if names else "nothing"
        _upsert_table(database, f"by_row_{tag}")
        _upsert_table(database, f"by_chunk_{tag}")

        def write(txn: LoggingTransaction, table: str, names=names) -> None:
            DatabasePool.simple_upsert_many_txn_native_upsert(
                txn, table, ("k", "k2"), keys, names, [v[: len(names)] for v in values]
            )

        with _Trace(database) as trace:
            database.run_sync("by_row", lambda txn, t=f"by_row_{tag}": write(txn, t))
            database.run_sync("by_chunk", lambda txn, t=f"by_chunk_{tag}": write(MultiRowTransaction.wrap(txn), t))
        expected = database.execute(f"SELECT rowid, k, k2, v, w FROM by_row_{tag} ORDER BY rowid")
        got = database.execute(f"SELECT rowid, k, k2, v, w FROM by_chunk_{tag} ORDER BY rowid")
        assert got == expected, tag
        assert len(expected) == len(set(keys) | {(1, "a"), (7, "b")}) == 82
        if names:
            assert "v1099" in {row[-2] for row in expected}
        else:
            assert {row[-2] for row in expected} == {"before", None}
        assert trace.inserts_into(f"by_row_{tag}") == 1100
        assert trace.inserts_into(f"by_chunk_{tag}") == math.ceil(1100 / rows_per_statement_for(database, 4))


def rows_per_statement_for(db: Database, columns: int) -> int:
    from synapse_fastjoin.storage.sqlite_batch import rows_per_statement

    return db.run_sync("limit", lambda txn: rows_per_statement(txn, columns))
