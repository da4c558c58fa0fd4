# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""The bulk writer writes, row for row, what Synapse's own outlier persistence
writes.

The same generated state (a room of 500 members over 5 servers, room versions
10 and 12: rejected events, events stored redacted for a bad hash, a
redaction persisted before the event it redacts, labels, a relation, a
retention policy, name and topic search rows, an event repeated within a
batch and one already stored) is persisted, in the same batches:

- into one fresh database through Synapse's
  `persist_events_and_notify(room_id, batch, backfilled=True)`, as the engine
  does today;
- into another through `synapse_fastjoin.storage.bulk.persist_outliers`.

Both are real in-process HomeServers on the real reactor, on SQLite or
PostgreSQL (`--db`). Every table that changed in either database is compared
row by row; stream orderings and wall-clock timestamps aside, and the chain
cover index compared by the events of each chain (its chain ids come from a
sequence). The backfill stream's position, the event cache and the events as
read back through Synapse must be the same too.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from synapse.app.homeserver import SynapseHomeServer
from synapse.events import make_event_from_dict
from synapse.storage.databases.main.cache import CacheInvalidationWorkerStore

from synapse_fastjoin.storage.bulk import ALL_CACHE_NAMES, persist_outliers
from tests.harness.outliers import (
    Workload,
    dump_tables,
    event_pairs,
    homeservers_on_fresh_databases,
    name_chains_by_first_event,
    outlier_workload,
    store_room,
)
from tests.harness.postgres import PostgresAdmin

logger = logging.getLogger(__name__)

# Columns holding a stream ordering or the time of writing: the only ones
# allowed to differ.
VOLATILE_COLUMNS = {"stream_ordering", "event_stream_ordering", "received_ts", "last_check"}

# Tables the outlier path must write for this workload (the comparison covers
# every table that changed, these must be among them).
EXPECTED_TABLES = {
    "events",
    "event_json",
    "state_events",
    "rejections",
    "event_auth",
    "event_auth_chains",
    "event_auth_chain_links",
    "event_edges",
    "room_memberships",
    "event_search",
    "event_relations",
    "event_labels",
    "redactions",
    "room_depth",
}


@pytest.fixture
def homeservers(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict[str, SynapseHomeServer]]:
    """Two fresh HomeServers, "synapse" and "bulk", each on its own database."""
    admin: PostgresAdmin | None = request.getfixturevalue("postgres_admin") if db_backend == "postgres" else None
    with homeservers_on_fresh_databases(
        ("synapse", "bulk"), db_backend, tmp_path_factory, admin, server_name=lambda name: f"{name}.test"
    ) as made:
        yield made


def _event_ids(workload: Workload) -> list[str]:
    return list(
        dict.fromkeys(
            make_event_from_dict(dict(item.event), workload.version).event_id
            for batch in workload.batches
            for item in batch
        )
    )


async def _persist(hs: SynapseHomeServer, workload: Workload, bulk: bool) -> float:
    """Persist the workload; return the seconds spent in persistence.

    Before it, the "not seen" answers for every event are cached (as the engine's
    own lookups leave them): persistence must invalidate them.
    """
    await store_room(hs, workload)
    store = hs.get_datastores().main
    ids = _event_ids(workload)
    assert not await store.have_seen_events(workload.room_id, ids)
    handler = hs.get_federation_event_handler()
    spent = 0.0
    for batch in workload.batches:
        pairs = event_pairs(hs, workload, batch)
        started = time.perf_counter()
        if bulk:
            await persist_outliers(hs, workload.room_id, pairs)
        else:
            await handler.persist_events_and_notify(workload.room_id, pairs, backfilled=True)
        spent += time.perf_counter() - started
    return spent


def _canonical(tables: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    """Drop volatile columns; name each chain of the chain cover index by its
    first event instead of its sequence-allocated id."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table, (columns, *rows) in name_chains_by_first_event(tables).items():
        keep = [i for i, c in enumerate(columns) if c not in VOLATILE_COLUMNS]
        out[table] = [tuple(columns[i] for i in keep), *sorted((tuple(row[i] for i in keep) for row in rows), key=repr)]
    return out


def _changed(before: dict[str, list[Any]], after: dict[str, list[Any]]) -> set[str]:
    return {t for t in after if after[t] != before.get(t)}


def _diff(table: str, a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> str:
    only_a = [r for r in a[1:] if r not in set(b[1:])]
    only_b = [r for r in b[1:] if r not in set(a[1:])]
    return (
        f"{table} {a[0]}: {len(a) - 1} rows through Synapse, {len(b) - 1} through the bulk writer; "
        f"only Synapse's: {only_a[:5]}; only ours: {only_b[:5]}"
    )


async def _cached_and_read(hs: SynapseHomeServer, workload: Workload) -> tuple[set[str], dict[str, Any]]:
    store = hs.get_datastores().main
    rows = await store.db_pool.simple_select_onecol("events", {"room_id": workload.room_id}, "event_id")
    cache = store._get_event_cache._lru_cache
    cached = {e for e in rows if (e,) in cache}
    events = await store.get_events_as_list(rows, allow_rejected=True)
    read = {
        e.event_id: (e.get_pdu_json(), e.internal_metadata.is_outlier(), e.rejected_reason, e.internal_metadata.redacted_by)
        for e in events
    }
    return cached, read


@pytest.mark.parametrize("room_version", ["10", "12"])
@pytest_twisted.ensureDeferred
async def test_bulk_writer_writes_the_rows_synapse_writes(
    homeservers: dict[str, SynapseHomeServer], room_version: str, db_backend: str
) -> None:
    workload = outlier_workload(room_version, members=500, servers=5)
    rejected = sum(1 for b in workload.batches for i in b if i.rejected)
    redacted = sum(1 for b in workload.batches for i in b if i.redacted)
    assert rejected >= 10 and redacted >= 10

    dumps: dict[str, tuple[dict[str, list[Any]], dict[str, list[Any]]]] = {}
    spent: dict[str, float] = {}
    for name, hs in homeservers.items():
        before = _canonical(await dump_tables(hs))
        spent[name] = await _persist(hs, workload, bulk=(name == "bulk"))
        dumps[name] = (before, _canonical(await dump_tables(hs)))
    logger.info(
        "%s v%s, %d events: Synapse %.0f µs/event, bulk writer %.0f µs/event",
        db_backend,
        room_version,
        workload.events,
        spent["synapse"] / workload.events * 1e6,
        spent["bulk"] / workload.events * 1e6,
    )

    (s_before, s_after), (b_before, b_after) = dumps["synapse"], dumps["bulk"]
    changed = _changed(s_before, s_after) | _changed(b_before, b_after)
    missing = EXPECTED_TABLES - changed
    assert not missing, f"tables the workload should have written: {missing}"
    differences = [_diff(t, s_after[t], b_after[t]) for t in sorted(changed) if s_after[t] != b_after[t]]
    assert not differences, "\n".join(differences)
    assert len(s_after["rejections"]) - 1 == rejected

    # The backfill stream stands where Synapse's path leaves it.
    s_store, b_store = (homeservers[n].get_datastores().main for n in ("synapse", "bulk"))
    assert s_store._backfill_id_gen.get_current_token() == b_store._backfill_id_gen.get_current_token()
    assert s_store.get_room_max_stream_ordering() == b_store.get_room_max_stream_ordering()

    # Nothing stale in the caches: every event is seen.
    for name, hs in homeservers.items():
        ids = _event_ids(workload)
        seen = await hs.get_datastores().main.have_seen_events(workload.room_id, ids)
        assert seen == set(ids), f"{name}: {len(ids) - len(seen)} events still cached as not seen"

    # The same events cached, and the same events read back.
    s_cached, s_read = await _cached_and_read(homeservers["synapse"], workload)
    b_cached, b_read = await _cached_and_read(homeservers["bulk"], workload)
    assert s_cached == b_cached and s_cached
    assert s_read == b_read


@pytest_twisted.ensureDeferred
async def test_a_write_waits_for_the_room_s_turn_and_says_how_long(
    homeservers: dict[str, SynapseHomeServer],
) -> None:
    """While Synapse persists other events of the room (its persistence queue
    holds the room), the bulk writer waits, then writes, and reports the
    wait (the resync's progress field `slot_wait_seconds`). This HomeServer
    has no module, so patch 0034's callback is not registered: the writer
    holds the room in Synapse's queue itself (`synapse_holds_room`); the
    turns with the callback are `tests/unit/test_room_turns.py`'s."""
    hs = homeservers["bulk"]
    workload = outlier_workload("12", members=20, servers=2, extras=False)
    await store_room(hs, workload)
    queue = hs.get_storage_controllers().persistence._event_persist_queue
    waits: list[float] = []
    first, *rest = workload.batches
    clock = hs.get_clock()

    queue._currently_persisting_rooms.add(workload.room_id)  # Synapse's, say
    try:
        held_since = clock.time()
        write = defer.ensureDeferred(
            persist_outliers(hs, workload.room_id, event_pairs(hs, workload, first), on_slot_wait=waits.append)
        )
        await deferLater(reactor, 0.2, lambda: None)
        assert not write.called and waits == [], "written while the room's turn was taken"
        held = clock.time() - held_since
    finally:
        queue._currently_persisting_rooms.discard(workload.room_id)
    await write
    # The wait began once the write had its lock against purges (a
    # transaction), after `held_since`, and ended after the release.
    assert len(waits) == 1 and 0.1 <= waits[0] <= held + 0.1, (waits, held)
    # Released after the write.
    assert workload.room_id not in queue._currently_persisting_rooms
    # With the room free, no wait (the slot is taken at the first look).
    for batch in rest:
        await persist_outliers(hs, workload.room_id, event_pairs(hs, workload, batch), on_slot_wait=waits.append)
    assert len(waits) == len(workload.batches) and all(w < 0.05 for w in waits[1:]), waits
    stored = await hs.get_datastores().main.have_seen_events(workload.room_id, _event_ids(workload))
    assert stored == set(_event_ids(workload))


def test_batched_invalidation_covers_the_caches_synapse_invalidates() -> None:
    """The bulk writer invalidates per batch what Synapse's
    `_invalidate_caches_for_event` invalidates per event: the same caches."""
    source = inspect.getsource(CacheInvalidationWorkerStore._invalidate_caches_for_event)
    names = set(re.findall(r'_attempt_to_invalidate_cache\(\s*"([A-Za-z_]+)"', source))
    assert names == ALL_CACHE_NAMES
    # And the stream caches and the event cache, per event.
    for call in ("_membership_stream_cache.entity_has_changed", "_events_stream_cache.entity_has_changed", "_invalidate_local_get_event_cache"):
        assert call in source
