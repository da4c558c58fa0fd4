"""State groups of a catch-up run, written in one transaction.

Synapse's `StateGroupDataStore.store_state_group` writes one delta group per
transaction (and, on SQLite, counts the hops of the delta chain with one
query per hop each time). During catch-up a run of events gets a chain of
such groups, one per state event, each a delta over the one before. Here the
same rows are written for a whole chain in one transaction: per group the
same deletion check and bump of its previous group, the same `state_groups`,
`state_group_edges` and `state_groups_state` rows, ids from the same sequence
in the same order. The hop count of the chain's first previous group is
counted as Synapse counts it; each new group has one hop more than its
previous group (it has exactly one edge, to it).

A group that would need a full copy of the state (its chain reaches
`MAX_STATE_DELTA_HOPS`) is not written here: the chain stops before it and
the caller stores it with Synapse's `store_state_group`.

Also the one read of the auth state before a catch-up run
(`state_at_keys_txn`): a group's state at a few keys, by index.
"""

from typing import TYPE_CHECKING, Collection, Sequence, Union

from synapse.storage.database import LoggingTransaction
from synapse.storage.databases.state.store import MAX_STATE_DELTA_HOPS
from synapse.types import StateMap
from synapse.util.iterutils import batch_iter

if TYPE_CHECKING:
    from synapse.storage.databases.state.store import StateGroupDataStore


class ChainRef:
    """The previous group of a chain item is the group of an earlier item."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"ChainRef({self.index})"


StateKey = tuple[str, str]

# An item: (event id, previous group: a stored group or an earlier item, delta).
ChainItem = tuple[str, Union[int, ChainRef], StateMap[str]]


def store_state_group_chain_txn(
    txn: LoggingTransaction,
    state_store: "StateGroupDataStore",
    room_id: str,
    chain: Sequence[ChainItem],
) -> list[int]:
    """Store the delta groups of `chain` in order; returns their ids. Stops at
    the first item that Synapse would store as a full group (the list is then
    shorter than `chain`)."""
    groups: list[int] = []
    hops: dict[int, int] = {}
    for event_id, prev, delta_ids in chain:
        prev_group = groups[prev.index] if isinstance(prev, ChainRef) else prev
        missing = state_store._state_deletion_store._check_state_groups_and_bump_deletion_txn(
            txn, {prev_group}
        )
        if missing:
            raise Exception(
                "Trying to persist state with unpersisted prev_group: %r" % (prev_group,)
            )
        prev_hops = hops.get(prev_group)
        if prev_hops is None:
            prev_hops = state_store._count_state_group_hops_txn(txn, prev_group)
        if prev_hops >= MAX_STATE_DELTA_HOPS:
            break
        state_group = state_store._state_group_seq_gen.get_next_id_txn(txn)
        state_store.db_pool.simple_insert_txn(
            txn,
            table="state_groups",
            values={"id": state_group, "room_id": room_id, "event_id": event_id},
        )
        state_store.db_pool.simple_insert_txn(
            txn,
            table="state_group_edges",
            values={"state_group": state_group, "prev_state_group": prev_group},
        )
        state_store.db_pool.simple_insert_many_txn(
            txn,
            table="state_groups_state",
            keys=("state_group", "room_id", "type", "state_key", "event_id"),
            values=[
                (state_group, room_id, key[0], key[1], state_id)
                for key, state_id in delta_ids.items()
            ],
        )
        hops[state_group] = prev_hops + 1
        groups.append(state_group)
    return groups


def delete_unused_groups_txn(
    txn: LoggingTransaction, state_store: "StateGroupDataStore", groups: Sequence[int]
) -> None:
    """Remove groups this run wrote ahead and then did not use (written in the
    same run, referenced by no event and by no other group but each other)."""
    for table, column in (
        ("state_groups_state", "state_group"),
        ("state_group_edges", "state_group"),
        ("state_groups", "id"),
    ):
        state_store.db_pool.simple_delete_many_txn(
            txn, table=table, column=column, values=list(groups), keyvalues={}
        )


def state_at_keys_txn(
    txn: LoggingTransaction, group: int, keys: Collection[StateKey]
) -> dict[StateKey, str]:
    """The state of `group` at `keys` (those it has): for each key the entry of
    the nearest group on its delta chain that has one, as Synapse's
    `_get_state_groups_from_groups_txn` reads it; but only the rows of those
    keys, by the (state_group, type, state_key) index, where Synapse's read
    (its filter widened to all non-member state) goes through every row of
    each group on the chain, a whole room's state at the full group."""
    found: dict[StateKey, str] = {}
    wanted = sorted(set(keys))
    next_group: int | None = group
    while next_group is not None and wanted:
        # One query per type, the state keys in a list: each a lookup in the
        # (state_group, type, state_key) index (an OR of (type, state_key)
        # pairs is not: SQLite scans the group's rows).
        by_type: dict[str, list[str]] = {}
        for typ, state_key in wanted:
            by_type.setdefault(typ, []).append(state_key)
        for typ, state_keys in by_type.items():
            for batch in batch_iter(state_keys, 500):
                marks = ",".join("?" for _ in batch)
                txn.execute(
                    "SELECT state_key, event_id FROM state_groups_state"
                    f" WHERE state_group = ? AND type = ? AND state_key IN ({marks})",
                    [next_group, typ, *batch],
                )
                for state_key, event_id in txn:
                    found.setdefault((typ, state_key), event_id)
        wanted = [k for k in wanted if k not in found]
        txn.execute(
            "SELECT prev_state_group FROM state_group_edges WHERE state_group = ?",
            (next_group,),
        )
        row = txn.fetchone()
        next_group = row[0] if row else None
    return found
