"""The state groups of a catch-up run written in one transaction
(`synapse_fastjoin.storage.state_groups`) are the rows Synapse's own
`store_state_group` writes, one group at a time, for the same chain.

Two fresh HomeServers ("synapse" and "ours"), each on its own database: the
same base group, then the same chain of delta groups (deltas over the base,
over earlier groups of the chain, and a branch back to an earlier group, as a
rejected state event gives), written by Synapse group by group on one and by
the module in one transaction on the other. The state-group tables must be
identical, row for row. Also at the delta-chain limit (`MAX_STATE_DELTA_HOPS`),
where Synapse stores a full group: the module's chain stops there and the
group is stored by Synapse, as the engine does.
"""

from typing import Any, Iterator

import pytest
import pytest_twisted

from synapse.app.homeserver import SynapseHomeServer
from synapse.storage.databases.state.store import MAX_STATE_DELTA_HOPS

from synapse_fastjoin.storage.state_groups import (
    ChainRef,
    delete_unused_groups_txn,
    state_at_keys_txn,
    store_state_group_chain_txn,
)
from tests.harness.outliers import homeservers_on_fresh_databases
from tests.harness.postgres import PostgresAdmin

ROOM = "!room:a.test"
SERVER = "joiner.test"
TABLES = ("state_groups", "state_group_edges", "state_groups_state", "state_groups_pending_deletion")


@pytest.fixture
def homeservers(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict[str, SynapseHomeServer]]:
    admin: PostgresAdmin | None = request.getfixturevalue("postgres_admin") if db_backend == "postgres" else None
    with homeservers_on_fresh_databases(
        ("synapse", "ours"), db_backend, tmp_path_factory, admin, server_name=lambda _: SERVER
    ) as made:
        yield made


def _member(i: int) -> tuple[str, str]:
    return ("m.room.member", f"@u{i}:a.test")


BASE = {
    ("m.room.create", ""): "$create",
    ("m.room.power_levels", ""): "$pl",
    ("m.room.join_rules", ""): "$jr",
    **{_member(i): f"$join{i}" for i in range(8)},
}


async def _tables(hs: SynapseHomeServer) -> dict[str, list[tuple[Any, ...]]]:
    store = hs.get_datastores().state

    def read(txn: Any) -> dict[str, list[tuple[Any, ...]]]:
        out = {}
        for table in TABLES:
            txn.execute(f"SELECT * FROM {table}")
            out[table] = sorted(tuple(row) for row in txn)
        return out

    return await store.db_pool.runInteraction("read_state_group_tables", read)


async def _base(hs: SynapseHomeServer, hops: int = 0) -> int:
    """The base group, stored whole by Synapse, then `hops` one-entry deltas."""
    state = hs.get_storage_controllers().state
    group = await state.store_state_group("$base", ROOM, None, None, dict(BASE))
    for i in range(hops):
        group = await state.store_state_group(
            f"$hop{i}", ROOM, group, {("m.room.topic", ""): f"$topic{i}"}, None
        )
    return group


def _chain(base: int) -> list[tuple[str, Any, dict[tuple[str, str], str]]]:
    return [
        ("$kick", base, {_member(1): "$kick"}),
        ("$topic", ChainRef(0), {("m.room.topic", ""): "$topic"}),
        # A branch back to the first group (the state event after the topic
        # change was rejected: the one after it has the state before it).
        ("$ban", ChainRef(0), {_member(2): "$ban"}),
        ("$pl2", ChainRef(2), {("m.room.power_levels", ""): "$pl2"}),
        ("$join9", ChainRef(3), {_member(9): "$join9"}),
    ]


async def _synapse_writes(hs: SynapseHomeServer, chain: list[Any], upto: int | None = None) -> list[int]:
    state = hs.get_storage_controllers().state
    groups: list[int] = []
    for event_id, prev, delta in chain[:upto]:
        prev_group = groups[prev.index] if isinstance(prev, ChainRef) else prev
        groups.append(await state.store_state_group(event_id, ROOM, prev_group, delta, None))
    return groups


async def _our_writes(hs: SynapseHomeServer, chain: list[Any]) -> list[int]:
    store = hs.get_datastores().state
    return await store.db_pool.runInteraction(
        "test_chain", store_state_group_chain_txn, store, ROOM, chain
    )


@pytest_twisted.ensureDeferred
async def test_a_chain_of_groups_in_one_transaction_writes_synapses_rows(homeservers) -> None:
    synapse, ours = homeservers["synapse"], homeservers["ours"]
    chain = _chain(await _base(synapse))
    assert chain[0][1] == await _base(ours)
    theirs = await _synapse_writes(synapse, chain)
    mine = await _our_writes(ours, chain)
    assert mine == theirs
    assert await _tables(ours) == await _tables(synapse)
    # And the state Synapse reads from them is the same.
    for group in mine:
        a = await synapse.get_storage_controllers().state.get_state_ids_for_group(group)
        b = await ours.get_storage_controllers().state.get_state_ids_for_group(group)
        assert a == b


@pytest_twisted.ensureDeferred
async def test_the_chain_stops_where_synapse_stores_a_full_group(homeservers) -> None:
    synapse, ours = homeservers["synapse"], homeservers["ours"]
    # The base is one hop short of the limit: the chain's first group is a
    # delta at the limit, the second would be the first past it.
    tip = await _base(synapse, hops=MAX_STATE_DELTA_HOPS - 1)
    assert tip == await _base(ours, hops=MAX_STATE_DELTA_HOPS - 1)
    chain = _chain(tip)[:2]
    theirs = await _synapse_writes(synapse, chain)
    mine = await _our_writes(ours, chain)
    # Where the limit falls depends on the database (Synapse counts the hops
    # with a different query on each): the chain stops where Synapse's stored
    # a full group, and what it wrote before that is Synapse's.
    stopped = len(mine)
    assert stopped < len(chain)
    assert mine == theirs[:stopped]
    # The engine has Synapse store that one (whole), as Synapse does; the
    # rest goes on as a chain.
    event_id, prev, delta = chain[stopped]
    prev_group = mine[prev.index] if isinstance(prev, ChainRef) else prev
    state = ours.get_storage_controllers().state
    mine.append(await state.store_state_group(event_id, ROOM, prev_group, delta, None))
    for event_id, prev, delta in chain[len(mine):]:
        prev_group = mine[prev.index] if isinstance(prev, ChainRef) else prev
        mine.extend(await _our_writes(ours, [(event_id, prev_group, delta)]))
    assert mine == theirs
    tables = await _tables(ours)
    assert tables == await _tables(synapse)
    # Synapse stored it whole: no edge, every entry.
    assert not [e for e in tables["state_group_edges"] if e[0] == mine[stopped]]
    assert len([r for r in tables["state_groups_state"] if r[0] == mine[stopped]]) >= len(BASE) + 1


@pytest_twisted.ensureDeferred
async def test_groups_written_ahead_and_not_used_are_removed(homeservers) -> None:
    ours = homeservers["ours"]
    base = await _base(ours)
    before = await _tables(ours)
    mine = await _our_writes(ours, _chain(base))
    store = ours.get_datastores().state
    await store.db_pool.runInteraction("test_delete", delete_unused_groups_txn, store, mine)
    assert await _tables(ours) == before


@pytest_twisted.ensureDeferred
async def test_the_state_at_some_keys_is_what_synapse_reads(homeservers) -> None:
    """`state_at_keys_txn` (the catch-up's one read of the auth state before
    a run) against Synapse's own read of the same groups and keys, uncached:
    keys set in the full base group, changed on the chain, added on it, and
    in no group at all."""
    from synapse.types.state import StateFilter

    ours = homeservers["ours"]
    base = await _base(ours, hops=3)
    mine = await _our_writes(ours, _chain(base))
    store = ours.get_datastores().state
    keys = {
        ("m.room.create", ""),
        ("m.room.power_levels", ""),
        ("m.room.topic", ""),
        ("m.room.third_party_invite", "x"),
        *(_member(i) for i in range(12)),
    }
    for group in [base, *mine]:
        theirs = await store._get_state_groups_from_groups(
            [group], state_filter=StateFilter.from_types(keys)
        )
        got = await store.db_pool.runInteraction(
            "test_state_at_keys", state_at_keys_txn, group, keys
        )
        assert got == {k: v for k, v in theirs[group].items() if k in keys}, group
        assert ("m.room.third_party_invite", "x") not in got
