# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Synapse's key store for `resync.keys.prefetch_server_keys`: which servers'
keys it holds already, and the notaries' answers stored together."""

import json
from typing import Any, Collection, Mapping, Sequence

import attr
from canonicaljson import encode_canonical_json

from synapse.storage.database import LoggingTransaction
from synapse.storage.databases.main.keys import KeyStore, db_binary_type
from synapse.storage.keys import FetchKeyResult
from synapse.types import JsonDict

from synapse_fastjoin.storage.sql import in_list_batches


def servers_with_keys_valid_until_txn(
    txn: LoggingTransaction, servers: Collection[str], valid_until_ms: int
) -> set[str]:
    """Those of `servers` with a signing key in `server_keys_json` valid at
    least until `valid_until_ms` (by the table's unique (server_name, key_id,
    from_server) index)."""
    found: set[str] = set()
    for batch, in_list in in_list_batches(sorted(servers)):
        txn.execute(
            "SELECT DISTINCT server_name FROM server_keys_json"
            f" WHERE server_name IN ({in_list}) AND ts_valid_until_ms >= ?",
            (*batch, valid_until_ms),
        )
        found.update(r[0] for r in txn)
    return found


@attr.s(slots=True, frozen=True, auto_attribs=True)
class KeyResponse:
    """The arguments of one call of Synapse's `KeyStore.store_server_keys_response`:
    the keys `from_server` gave for `server_name`."""

    server_name: str
    from_server: str
    ts_added_ms: int
    verify_keys: Mapping[str, FetchKeyResult]
    response_json: JsonDict


def store_server_keys_responses_txn(
    txn: LoggingTransaction, store: KeyStore, responses: Sequence[KeyResponse]
) -> None:
    """The rows and cache invalidations of Synapse's `store_server_keys_response`
    (1.163.2) for each of `responses`, in that order, in one transaction where
    Synapse takes one for each.

    Synapse upserts every value column of both tables, so a key given twice
    ends with the later response's row: the rows are gathered by key, the
    last one kept, and each table written with one multi-row upsert (one
    statement with a row repeated would be refused by PostgreSQL)."""
    signature_keys: dict[tuple[str, str], tuple[Any, ...]] = {}
    keys_json: dict[tuple[str, str, str], tuple[Any, ...]] = {}
    invalidated: dict[tuple[str, str], None] = {}
    for response in responses:
        key_json_bytes = db_binary_type(encode_canonical_json(response.response_json))
        for key_id, result in response.verify_keys.items():
            key = (response.server_name, key_id)
            signature_keys[key] = (
                response.from_server,
                response.ts_added_ms,
                result.valid_until_ts,
                db_binary_type(result.verify_key.encode()),
            )
            json_key = (response.server_name, key_id, response.from_server)
            keys_json[json_key] = (response.ts_added_ms, result.valid_until_ts, key_json_bytes)
            invalidated[key] = None
    if not invalidated:
        return
    db_pool = store.db_pool
    db_pool.simple_upsert_many_txn(
        txn,
        table="server_signature_keys",
        key_names=("server_name", "key_id"),
        key_values=list(signature_keys),
        value_names=("from_server", "ts_added_ms", "ts_valid_until_ms", "verify_key"),
        value_values=list(signature_keys.values()),
    )
    db_pool.simple_upsert_many_txn(
        txn,
        table="server_keys_json",
        key_names=("server_name", "key_id", "from_server"),
        key_values=list(keys_json),
        value_names=("ts_added_ms", "ts_valid_until_ms", "key_json"),
        value_values=list(keys_json.values()),
    )
    for key in invalidated:
        txn.call_after(store._get_server_keys_json.invalidate, (key,))
    store._send_invalidation_to_replication_bulk(
        txn, store._get_server_keys_json.__name__, [(json.dumps(list(key)),) for key in invalidated]
    )
    store._invalidate_cache_and_stream_bulk(txn, store.get_server_key_json_for_remote, list(invalidated))
