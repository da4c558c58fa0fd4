# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""The end of a resync: the room's current state written in chunks
(`synapse_fastjoin.storage.current_state`) leaves the database, the caches
and the streams exactly as Synapse's `StateHandler.update_current_state`.

Two real in-process HomeServers on fresh databases (SQLite or PostgreSQL,
`--db`) take the same partial-state join of a generated room (room versions
10 and 12): its state stored as outliers, the join persisted with a partial
state (non-member state, the creator's and a local user's memberships, a
member's outdated membership, a key the full state lost, a local user's
invite the full state replaced with a leave), then given its full state as
the engine does. Caches that depend on the current state are read on both
(so they hold the partial answers). Then one server runs Synapse's
`update_current_state`, the other the module's, in chunks of 100 members.
Every table that changed on either server is compared row by row, stream
orderings and times aside; the cache-invalidation stream (PostgreSQL), whose
rows group the same invalidated members in a different order, by how many
rows each cache got and the keys they name. The stream positions, the stream
caches and what the state caches answer afterwards must be the same.

Both servers have the module's tables, so the joined-member counts its
triggers keep (storage/member_counts.py, per room and per server) are
compared too, and must equal
Synapse's `COUNT(*)` before and after.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from synapse.app.homeserver import SynapseHomeServer

from synapse_fastjoin.storage.current_state import update_current_state
from synapse_fastjoin.storage.member_counts import joined_member_count_txn
from synapse_fastjoin.storage.schema import prepare_schema_txn
from tests.harness.endsteps import join_scenario, prepare_partial_join, un_partial_join
from tests.harness.outliers import dump_tables, homeservers_on_fresh_databases
from tests.harness.postgres import PostgresAdmin

SERVER = "joiner.test"

# Stream orderings and times: the only columns allowed to differ.
VOLATILE_COLUMNS = {"stream_ordering", "event_stream_ordering", "received_ts", "last_check", "invalidation_ts"}

# Tables the update must write for this scenario.
EXPECTED_TABLES = {
    "current_state_delta_stream",
    "current_state_events",
    "fastjoin_room_joined_counts",
    "fastjoin_room_server_joined_counts",
    "local_current_membership",
    "sliding_sync_joined_rooms",
    "sliding_sync_membership_snapshots",
}


@pytest.fixture
def homeservers(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict[str, SynapseHomeServer]]:
    """Two fresh HomeServers of the same name, "synapse" and "ours", each on its own database."""
    admin: PostgresAdmin | None = request.getfixturevalue("postgres_admin") if db_backend == "postgres" else None
    with homeservers_on_fresh_databases(
        ("synapse", "ours"), db_backend, tmp_path_factory, admin, server_name=lambda _: SERVER
    ) as made:
        yield made


def _canonical(tables: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for table, (columns, *rows) in tables.items():
        if table == "cache_invalidation_stream_by_instance":
            out[table] = _invalidations(columns, rows)
            continue
        volatile = set(VOLATILE_COLUMNS)
        if table == "current_state_delta_stream":
            volatile.add("stream_id")  # checked apart: one stream id for the whole update
        keep = [i for i, c in enumerate(columns) if c not in volatile]
        out[table] = [tuple(columns[i] for i in keep), *sorted((tuple(r[i] for i in keep) for r in rows), key=repr)]
    return out


def _invalidations(columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[Any]:
    """Per cache and instance: how many rows, and every key they name
    (Synapse groups a current-state update's members 50 a row, in a set's
    order)."""
    summary: dict[tuple[str, str], tuple[int, set[str]]] = {}
    for row in rows:
        r = dict(zip(columns, row))
        keys = r["keys"] or []
        if isinstance(keys, str):
            keys = json.loads(keys)
        n, named = summary.get((r["cache_func"], r["instance_name"]), (0, set()))
        summary[(r["cache_func"], r["instance_name"])] = (n + 1, named | {json.dumps(k) for k in keys})
    return sorted((k, n, sorted(named)) for k, (n, named) in summary.items())


async def _read_caches(hs: SynapseHomeServer, room_id: str, users: list[str]) -> dict[str, Any]:
    """What the caches that hang on the room's current state answer."""
    store = hs.get_datastores().main
    out: dict[str, Any] = {
        "users_in_room": sorted(await store.get_users_in_room(room_id)),
        "local_users": sorted(await store.get_local_users_in_room(room_id)),
        "hosts": sorted(await store.get_current_hosts_in_room(room_id)),
        "joined_count": await store.get_number_joined_users_in_room(room_id),
        "member_counts": await store.get_member_counts(room_id),
        "kept_joined_count": await store.db_pool.runInteraction(
            "kept_joined_count", joined_member_count_txn, room_id
        ),
        "state_ids": sorted((await store.get_partial_current_state_ids(room_id)).items()),
        "summary": sorted((k, v.count, list(v.members)) for k, v in (await store.get_room_summary(room_id)).items()),
    }
    # No module callback here: get_number_joined_users_in_room is Synapse's COUNT(*).
    assert out["kept_joined_count"] == out["joined_count"]
    for user in users:
        out[f"rooms_for {user}"] = sorted(await store.get_rooms_for_user(user))
        out[f"sliding {user}"] = repr(sorted((await store.get_sliding_sync_rooms_for_user_from_membership_snapshots(user)).items()))
    return out


@pytest.mark.parametrize("room_version", ["10", "12"])
@pytest_twisted.ensureDeferred
async def test_chunked_current_state_writes_what_synapse_writes(
    homeservers: dict[str, SynapseHomeServer], room_version: str, db_backend: str
) -> None:
    scenario = join_scenario(room_version, members=500, servers=5, local_server=SERVER)
    room_id = scenario.room_id
    users = [f"@local{i}:{SERVER}" for i in range(3)] + [f"@joiner:{SERVER}", scenario.room.spec.member(3), scenario.room.spec.member(7)]

    dumps: dict[str, tuple[dict[str, list[Any]], dict[str, list[Any]]]] = {}
    cached: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    chunks = 0
    streams: dict[str, list[bool]] = {}
    for name, hs in homeservers.items():
        await hs.get_datastores().main.db_pool.runInteraction("fastjoin_prepare_schema", prepare_schema_txn)
        await prepare_partial_join(hs, scenario)
        await un_partial_join(hs, scenario)
        partial_answers = await _read_caches(hs, room_id, users)
        before = await dump_tables(hs)
        store = hs.get_datastores().main
        position = store.get_room_max_stream_ordering()
        if name == "synapse":
            await hs.get_state_handler().update_current_state(room_id)
        else:
            chunks = await update_current_state(hs, room_id, chunk_size=100)
        after = await dump_tables(hs)
        # The whole update took one stream id, the next one, and the stream
        # stands on it.
        assert store.get_room_max_stream_ordering() == position + 1
        new_ids = {r[0] for r in after["current_state_delta_stream"][1:]} - {r[0] for r in before["current_state_delta_stream"][1:]}
        assert new_ids == {position + 1}
        assert store._curr_state_delta_stream_cache.get_max_pos_of_last_change(room_id) == position + 1
        streams[name] = [store._membership_stream_cache.has_entity_changed(u, position) for u in users]
        dumps[name] = (_canonical(before), _canonical(after))
        cached[name] = (partial_answers, await _read_caches(hs, room_id, users))

    assert chunks > 3, "the update was not written in chunks"
    (s_before, s_after), (o_before, o_after) = dumps["synapse"], dumps["ours"]
    changed = {t for t in s_after if s_after[t] != s_before.get(t)} | {t for t in o_after if o_after[t] != o_before.get(t)}
    missing = EXPECTED_TABLES - changed
    assert not missing, f"tables the update should have written: {missing}"
    differences = [
        f"{t}: only Synapse's {[r for r in s_after[t][1:] if r not in o_after[t]][:5]}, only ours {[r for r in o_after[t][1:] if r not in s_after[t]][:5]}"
        for t in sorted(changed)
        if s_after[t] != o_after[t]
    ]
    assert not differences, "\n".join(differences)
    if db_backend == "postgres":
        assert "cache_invalidation_stream_by_instance" in changed

    # The caches answered from the partial state before, and from the full
    # state after: the same answers on both servers, and not the stale ones.
    assert cached["synapse"][0] == cached["ours"][0]
    assert cached["synapse"][1] == cached["ours"][1]
    assert cached["ours"][1]["joined_count"] > cached["ours"][0]["joined_count"] + 400
    # The membership stream cache knows the same users changed.
    assert streams["synapse"] == streams["ours"] and any(streams["ours"])
