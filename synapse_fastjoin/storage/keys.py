# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""What Synapse's key store already holds (for `resync.keys.prefetch_server_keys`)."""

from typing import Collection

from synapse.storage.database import LoggingTransaction

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
