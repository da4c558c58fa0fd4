# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Each room's number of joined members, and each (room, server)'s, kept by
the database itself.

Synapse's `get_number_joined_users_in_room` (read by the push rule evaluator
for every event, and by `/joined_members`) is a `COUNT(*)` over the room's
rows of `current_state_events` with `membership = 'join'`, cached until the
next membership change of the room: every join of a big room counts the room
again (45 to 100 ms at 100,000 members on SQLite).

`fastjoin_room_joined_counts` holds that count for every room, kept by
triggers on `current_state_events` in the same transaction as each write to
it, whoever writes it (Synapse's event persister, the module's resync, a purge,
a background update). Reading it is one primary-key lookup, and at every
committed state of the database it equals what the `COUNT(*)` would return
then; Synapse's cache and its invalidation (replication included) are left as
they are, so the count is read back exactly when Synapse would have counted.

`fastjoin_room_server_joined_counts` (schema version 6) holds the same count
per room and server (the user id's part after its first colon, Synapse's
`get_domain_from_id`), for the presence handler's fan-out of a join (patch
0030: which servers were already in the room, without reading the room's whole
member list for every join; `handlers/presence.py`) and for the servers of a
room (patch 0031, `get_current_hosts_in_room`).

- SQLite: row triggers (`WHEN` the row is or was a join).
- PostgreSQL: statement triggers with transition tables, one upsert per
  statement: a row trigger updating the same count row once per inserted member
  makes the resync's bulk insert of 100,000 members take minutes (every update
  of one row in one transaction leaves a dead version to skip).

The table is created and filled from `current_state_events` in the schema
step that creates the triggers (one transaction; on PostgreSQL `CREATE
TRIGGER` locks out writers to `current_state_events` until it commits, so no
write falls between the fill and the triggers). `TRUNCATE` of
`current_state_events` would bypass them; neither Synapse nor the module
truncates it. Should a trigger be dropped, the main process restores them all
and fills the table again at its next start, and until then no process answers
from the table (`counts_kept_txn`): Synapse counts.
"""

from dataclasses import dataclass

from synapse.storage.database import LoggingTransaction
from synapse.storage.engines import PostgresEngine

TABLE = "fastjoin_room_joined_counts"
SERVER_TABLE = "fastjoin_room_server_joined_counts"

# A user id's server name (`get_domain_from_id`: after the first colon), from a
# row `r` of current_state_events, on each engine.
_SQLITE_SERVER = "substr({r}.state_key, instr({r}.state_key, ':') + 1)"
_POSTGRES_SERVER = "substring({r}.state_key FROM position(':' IN {r}.state_key) + 1)"


@dataclass(frozen=True)
class KeptCount:
    """A count of joined rows of `current_state_events` per `keys`, in
    `table`, kept by triggers named `prefix` + `_insert` etc."""

    table: str
    prefix: str
    # Key columns after room_id, each with its expression over a row `{r}` on
    # SQLite and on PostgreSQL.
    extra_keys: tuple[tuple[str, str, str], ...]
    # Rows counted besides `membership = 'join'` (over a row `{r}`).
    extra_filter: str

    @property
    def _column_list(self) -> list[str]:
        return ["room_id", *(k[0] for k in self.extra_keys)]

    @property
    def _columns(self) -> str:
        return ", ".join(self._column_list)

    def _value_list(self, r: str, postgres: bool) -> list[str]:
        exprs = [k[2] if postgres else k[1] for k in self.extra_keys]
        return [f"{r}.room_id", *(e.format(r=r) for e in exprs)]

    def _values(self, r: str, postgres: bool) -> str:
        return ", ".join(self._value_list(r, postgres))

    def _where(self, r: str) -> str:
        return f"{r}.membership = 'join'" + self.extra_filter.format(r=r)

    def _match(self, r: str) -> str:
        """`WHERE` of an UPDATE of the count row that row `r` counts in (SQLite)."""
        pairs = zip(self._column_list, self._value_list(r, postgres=False))
        return " AND ".join(f"{c} = {v}" for c, v in pairs)

    def create_table_sql(self) -> str:
        keys = "".join(f"{k[0]} TEXT NOT NULL, " for k in self.extra_keys)
        return f"""
            CREATE TABLE {self.table} (
                room_id TEXT NOT NULL, {keys}
                joined BIGINT NOT NULL,
                PRIMARY KEY ({self._columns})
            )
        """

    def fill_sql(self, postgres: bool) -> str:
        return f"""
            INSERT INTO {self.table} ({self._columns}, joined)
            SELECT {self._values("c", postgres)}, COUNT(*) FROM current_state_events AS c
            WHERE {self._where("c")}
            GROUP BY {self._values("c", postgres)}
        """

    @property
    def sqlite_trigger_names(self) -> tuple[str, ...]:
        return tuple(f"{self.prefix}_{n}" for n in ("insert", "delete", "update_old", "update_new"))

    @property
    def postgres_trigger_names(self) -> tuple[str, ...]:
        return tuple(f"{self.prefix}_{n}" for n in ("insert", "delete", "update"))

    def sqlite_triggers(self) -> list[str]:
        add = f"""
            INSERT INTO {self.table} ({self._columns}, joined)
            VALUES ({self._values("NEW", postgres=False)}, 1)
            ON CONFLICT ({self._columns}) DO UPDATE SET joined = joined + 1;
        """
        remove = f"UPDATE {self.table} SET joined = joined - 1 WHERE {self._match('OLD')};"
        insert, delete, update_old, update_new = self.sqlite_trigger_names
        # An update takes the old row out and puts the new one in (Synapse's
        # background update that fills the membership column is one).
        def trigger(name: str, when: str, row: str, body: str) -> str:
            return (
                f"CREATE TRIGGER {name} AFTER {when} ON current_state_events"
                f" WHEN {self._where(row)} BEGIN {body} END"
            )

        return [
            trigger(insert, "INSERT", "NEW", add),
            trigger(delete, "DELETE", "OLD", remove),
            trigger(update_old, "UPDATE", "OLD", remove),
            trigger(update_new, "UPDATE", "NEW", add),
        ]

    def _postgres_function(self, name: str, deltas: str) -> str:
        """A trigger function adding, per key, the sum of `deltas` (a query of
        key and `d` rows over the statement's transition tables)."""
        return f"""
        CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO {self.table} AS c ({self._columns}, joined)
            SELECT {self._columns}, SUM(d) FROM ({deltas}) AS deltas
            GROUP BY {self._columns} HAVING SUM(d) <> 0
            ON CONFLICT ({self._columns}) DO UPDATE SET joined = c.joined + EXCLUDED.joined;
            RETURN NULL;
        END
        $$
        """

    def _postgres_deltas(self, transition: str, d: int) -> str:
        pairs = zip(self._column_list, self._value_list("t", postgres=True))
        select = ", ".join(f"{v} AS {c}" for c, v in pairs)
        return f"SELECT {select}, {d} AS d FROM {transition} AS t WHERE {self._where('t')}"

    def postgres_triggers(self) -> list[str]:
        insert, delete, update = self.postgres_trigger_names
        new = self._postgres_deltas("fastjoin_new", 1)
        old = self._postgres_deltas("fastjoin_old", -1)
        return [
            self._postgres_function(insert, new),
            self._postgres_function(delete, old),
            self._postgres_function(update, f"{new} UNION ALL {old}"),
            f"""
            CREATE TRIGGER {insert}
            AFTER INSERT ON current_state_events
            REFERENCING NEW TABLE AS fastjoin_new
            FOR EACH STATEMENT EXECUTE FUNCTION {insert}()
            """,
            f"""
            CREATE TRIGGER {delete}
            AFTER DELETE ON current_state_events
            REFERENCING OLD TABLE AS fastjoin_old
            FOR EACH STATEMENT EXECUTE FUNCTION {delete}()
            """,
            f"""
            CREATE TRIGGER {update}
            AFTER UPDATE ON current_state_events
            REFERENCING OLD TABLE AS fastjoin_old NEW TABLE AS fastjoin_new
            FOR EACH STATEMENT EXECUTE FUNCTION {update}()
            """,
        ]


ROOM_COUNTS = KeptCount(TABLE, "fastjoin_joined_counts", (), "")
SERVER_COUNTS = KeptCount(
    SERVER_TABLE,
    "fastjoin_server_counts",
    (("server_name", _SQLITE_SERVER, _POSTGRES_SERVER),),
    " AND {r}.type = 'm.room.member'",
)


def _create_txn(txn: LoggingTransaction, kept: KeptCount) -> None:
    txn.execute(kept.create_table_sql())
    postgres = isinstance(txn.database_engine, PostgresEngine)
    if postgres:
        # Writers of current_state_events wait from here to the commit, so the
        # fill below and the triggers see the same rows.
        txn.execute("LOCK TABLE current_state_events IN SHARE ROW EXCLUSIVE MODE")
    for statement in kept.postgres_triggers() if postgres else kept.sqlite_triggers():
        txn.execute(statement)
    txn.execute(kept.fill_sql(postgres))


def counts_kept_txn(txn: LoggingTransaction, kept: KeptCount) -> bool:
    """Whether every trigger that keeps `kept` is on `current_state_events`
    (if one was dropped, the counts may be stale)."""
    if isinstance(txn.database_engine, PostgresEngine):
        names = kept.postgres_trigger_names
        txn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'current_state_events'::regclass"
            " AND tgenabled <> 'D'"
        )
    else:
        names = kept.sqlite_trigger_names
        txn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger'"
            " AND tbl_name = 'current_state_events'"
        )
    present = {row[0] for row in txn}
    return all(name in present for name in names)


def restore_counts_txn(txn: LoggingTransaction, kept: KeptCount) -> None:
    """Create `kept`'s table and triggers again from scratch (the caller found
    a trigger missing): what is left of them is dropped, the counts filled
    anew."""
    postgres = isinstance(txn.database_engine, PostgresEngine)
    for name in kept.postgres_trigger_names if postgres else kept.sqlite_trigger_names:
        if postgres:
            txn.execute(f"DROP TRIGGER IF EXISTS {name} ON current_state_events")
        else:
            txn.execute(f"DROP TRIGGER IF EXISTS {name}")
    txn.execute(f"DROP TABLE IF EXISTS {kept.table}")
    _create_txn(txn, kept)


def create_joined_counts_txn(txn: LoggingTransaction) -> None:
    """Schema step: the per-room table, filled from `current_state_events`,
    and the triggers that keep it (in the caller's transaction)."""
    _create_txn(txn, ROOM_COUNTS)


def create_server_counts_txn(txn: LoggingTransaction) -> None:
    """Schema step: the per-(room, server) table, filled, and its triggers."""
    _create_txn(txn, SERVER_COUNTS)


def joined_member_count_txn(txn: LoggingTransaction, room_id: str) -> int:
    """The number of members of `room_id` whose current membership is join:
    what Synapse's `COUNT(*)` over `current_state_events` returns."""
    txn.execute(f"SELECT joined FROM {TABLE} WHERE room_id = ?", (room_id,))
    row = txn.fetchone()
    return int(row[0]) if row else 0


def joined_servers_txn(txn: LoggingTransaction, room_id: str) -> dict[str, int]:
    """Each server with members of `room_id` whose current membership is
    join, with how many: what counting Synapse's `get_users_in_room` by
    `get_domain_from_id` gives."""
    txn.execute(
        f"SELECT server_name, joined FROM {SERVER_TABLE} WHERE room_id = ? AND joined > 0",
        (room_id,),
    )
    return {str(server): int(joined) for server, joined in txn}


def join_fanout_txn(
    txn: LoggingTransaction, room_id: str, newly_joined: list[str]
) -> tuple[list[str], dict[str, int], set[str]]:
    """What the presence handler's fan-out of a join reads, in one snapshot:
    the local users joined to `room_id` (`local_current_membership`, which
    Synapse writes for local members with their current-state rows), each
    server's joined count, and which of `newly_joined` are joined now."""
    txn.execute(
        "SELECT user_id FROM local_current_membership WHERE room_id = ? AND membership = 'join'",
        (room_id,),
    )
    local = [str(row[0]) for row in txn]
    servers = joined_servers_txn(txn, room_id)
    joined_now: set[str] = set()
    for start in range(0, len(newly_joined), 500):
        chunk = newly_joined[start : start + 500]
        txn.execute(
            "SELECT state_key FROM current_state_events WHERE room_id = ?"
            " AND type = 'm.room.member' AND membership = 'join'"
            f" AND state_key IN ({', '.join('?' for _ in chunk)})",
            (room_id, *chunk),
        )
        joined_now.update(str(row[0]) for row in txn)
    return local, servers, joined_now
