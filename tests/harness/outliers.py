# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Outlier batches for the bulk writer's parity test and benchmark.

- `make_homeserver`: a real in-process Synapse HomeServer (no listeners,
  federation closed) on SQLite or on a PostgreSQL database;
- `outlier_workload`: the state at the join of a generated room, as the
  engine hands it to persistence: batches of outliers in auth order, some
  rejected, some stored redacted (a bad content hash), a few already stored
  or repeated, plus the rarer kinds of rows (labels, a relation, a retention
  policy, a redaction and the event it redacts, name and topic search rows);
- `event_pairs`: fresh `EventBase`/`EventContext` pairs of a workload for one
  homeserver (persistence mutates the events);
- `dump_tables`: every table of a database, rows sorted, for comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attr

from synapse.api.constants import RejectedReason
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS, RoomVersion
from synapse.app.homeserver import SynapseHomeServer
from synapse.events import EventBase, make_event_from_dict
from synapse.events.snapshot import EventContext
from synapse.events.utils import prune_event
from synapse.storage.database import LoggingTransaction
from synapse.storage.engines import PostgresEngine

from tests.harness import inprocess
from tests.harness.fakehs.events import finalise_event
from tests.harness.fakehs.room import ORIGIN, Room, RoomSpec, StoredEvent, load_or_generate
from tests.harness.postgres import PostgresAdmin

EventPair = tuple[EventBase, EventContext]


# Outliers' parity tests write retention rows too.
RETENTION = {"retention": {"enabled": True}}


@contextmanager
def homeservers_on_fresh_databases(
    names: Sequence[str],
    db_backend: str,
    tmp_path_factory: Any,
    postgres_admin: PostgresAdmin | None,
    server_name: Callable[[str], str],
) -> Iterator[dict[str, SynapseHomeServer]]:
    """`inprocess.homeservers_on_fresh_databases`, with retention on (see
    `make_homeserver`)."""
    with inprocess.homeservers_on_fresh_databases(
        names, db_backend, tmp_path_factory, postgres_admin, server_name, RETENTION
    ) as made:
        yield made


def make_homeserver(data_dir: str, database: dict[str, Any], server_name: str = "joiner.test") -> SynapseHomeServer:
    """A real HomeServer on `database` (Synapse's `database` config section),
    set up (schema prepared) on the running reactor, with retention on (the
    persistence path then writes its retention rows too)."""
    return inprocess.make_homeserver(data_dir, server_name, database, extra_config=RETENTION)


@attr.s(slots=True, auto_attribs=True)
class Item:
    """One event of a workload and how the engine would hand it over."""

    event: dict[str, Any]
    rejected: str | None = None
    redacted: bool = False


@attr.s(slots=True, auto_attribs=True)
class Workload:
    room_id: str
    version: RoomVersion
    create: dict[str, Any]
    batches: list[list[Item]]

    @property
    def events(self) -> int:
        return sum(len(b) for b in self.batches)


def outlier_workload(
    room_version: str, members: int, servers: int, batch_size: int = 200, extras: bool = True
) -> Workload:
    """The state and auth chain of a generated room, as outlier batches."""
    room: Room = load_or_generate(RoomSpec(members=members, servers=servers, room_version=room_version))
    version = KNOWN_ROOM_VERSIONS[room_version]
    creator = room.spec.creator
    if extras:
        # Rows Synapse writes for rarer events: labels, a relation, a
        # retention policy, a redaction (persisted before what it redacts).
        target = room.events[-3]
        room.create_event(creator, "org.example.labelled", {"org.matrix.labels": ["#a", "#b"]}, "")
        room.create_event(
            creator,
            "org.example.related",
            {"m.relates_to": {"rel_type": "m.reference", "event_id": room.events[2].event_id}},
            "",
        )
        room.create_event(creator, "m.room.retention", {"max_lifetime": 86_400_000}, "")
        redaction: dict[str, Any] = {
            "type": "m.room.redaction",
            "room_id": room.room_id,
            "sender": creator,
            "content": {},
            "origin_server_ts": 1_700_000_000_000,
            "depth": room.events[-1].depth + 1,
            "prev_events": [room.events[-1].event_id],
            "auth_events": room.auth_events_for("m.room.redaction", creator, None, {}),
        }
        if version.updated_redaction_rules:
            redaction["content"]["redacts"] = target.event_id  # room v11+
        else:
            redaction["redacts"] = target.event_id
        redaction_id = finalise_event(version, redaction, ORIGIN)
        room.add(StoredEvent.from_dict(redaction_id, redaction))
    events = [e.as_dict() for e in room.events]
    create = events[0]

    items: list[Item] = []
    for i, event in enumerate(events):
        item = Item(event)
        if event["type"] == "m.room.member" and i % 37 == 0:
            item.rejected = RejectedReason.AUTH_ERROR
        elif i % 41 == 0:
            item.redacted = True  # its content hash did not match
        items.append(item)
    if extras:
        items[-2].rejected = RejectedReason.OVERSIZED_EVENT  # the retention policy
        # The redaction goes first: what it redacts is then stored redacted.
        items.insert(0, items.pop())

    batches = [items[x : x + batch_size] for x in range(0, len(items), batch_size)]
    if extras and len(batches) > 2:
        # Repeats: one event twice in a batch, one already stored. (The
        # repeat is next to the first copy: in Synapse's path, a repeat in a
        # later transaction of 100 events evicts the event from the cache that
        # the first copy's transaction filled; a quirk of its chunking.)
        batches[1].insert(4, attr.evolve(batches[1][3]))
        batches[2].insert(0, attr.evolve(batches[0][5]))
    return Workload(room_id=room.room_id, version=version, create=create, batches=batches)


def event_pairs(hs: SynapseHomeServer, workload: Workload, batch: Sequence[Item]) -> list[EventPair]:
    """Fresh outlier events and contexts for one batch, as the engine makes them."""
    storage = hs.get_storage_controllers()
    pairs: list[EventPair] = []
    for item in batch:
        event = make_event_from_dict(dict(item.event), workload.version)
        if item.redacted:
            event = prune_event(event)
        event.internal_metadata.outlier = True
        context = EventContext.for_outlier(storage)
        if item.rejected:
            context.rejected = item.rejected
        pairs.append((event, context))
    return pairs


async def store_room(hs: SynapseHomeServer, workload: Workload) -> None:
    """The `rooms` row a join writes before persisting the state."""
    create = make_event_from_dict(dict(workload.create), workload.version)
    await hs.get_datastores().main.upsert_room_on_join(workload.room_id, workload.version, [create])


async def dump_tables(hs: SynapseHomeServer) -> dict[str, list[tuple[Any, ...]]]:
    """Every table of the main database: {table: [columns, then sorted rows]}."""
    db_pool = hs.get_datastores().main.db_pool

    def txn(t: LoggingTransaction) -> dict[str, list[tuple[Any, ...]]]:
        if isinstance(t.database_engine, PostgresEngine):
            t.execute(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
            )
        else:
            t.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        tables = sorted(r[0] for r in t.fetchall())
        out: dict[str, list[tuple[Any, ...]]] = {}
        for table in tables:
            t.execute(f"SELECT * FROM {table}")
            columns = tuple(d[0] for d in t.description)
            rows = [tuple(r) for r in t.fetchall()]
            out[table] = [columns, *sorted(rows, key=repr)]
        return out

    return await db_pool.runInteraction("bulk_test_dump_tables", txn)


def name_chains_by_first_event(tables: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    """`tables` (as `dump_tables` gives them) with each chain id of the chain
    cover index replaced by the chain's first event: the ids come from a
    sequence, and which chain gets which id depends on the order of writes."""
    chains = tables.get("event_auth_chains", [()])
    chain_cols = chains[0]
    first: dict[int, tuple[int, str]] = {}
    for row in chains[1:]:
        r = dict(zip(chain_cols, row))
        best = first.get(r["chain_id"])
        if best is None or r["sequence_number"] < best[0]:
            first[r["chain_id"]] = (r["sequence_number"], r["event_id"])
    chain_name = {chain_id: event_id for chain_id, (_, event_id) in first.items()}
    chain_columns = ("chain_id", "origin_chain_id", "target_chain_id")
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table, (columns, *rows) in tables.items():
        at = [i for i, c in enumerate(columns) if c in chain_columns]
        if at:
            rows = [
                tuple(chain_name.get(v, f"unknown chain {v}") if i in at else v for i, v in enumerate(row))
                for row in rows
            ]
        out[table] = [columns, *rows]
    return out
