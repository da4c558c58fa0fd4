# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Push actions of several events staged in one transaction.

Synapse's `add_push_actions_to_staging` writes one event's rows of
`event_push_actions_staging` per transaction; a run of staged inbound events
(handlers/staged_runs.py) collects every event's arguments to it (patch 0032)
and writes them here at once, as the same rows: the columns come from
Synapse's own helpers (`_serialize_action`, `_action_has_highlight`), and an
event with no actions gets no row, as there.
"""

from collections.abc import Collection, Mapping

from synapse.storage.database import DatabasePool, LoggingTransaction, make_in_list_sql_clause
from synapse.storage.databases.main.event_push_actions import (
    _action_has_highlight,
    _serialize_action,
)
from synapse.util.iterutils import batch_iter

# One event's arguments to Synapse's `add_push_actions_to_staging`: event ID,
# actions by user, whether it counts as unread, thread ID.
StagedPushActions = tuple[str, Mapping[str, Collection[Mapping | str]], bool, str]

_COLUMNS = ("event_id", "user_id", "actions", "notif", "highlight", "unread", "thread_id", "inserted_ts")


def staging_rows(entries: list[StagedPushActions], now_ms: int) -> list[tuple[str, str, str, int, int, int, str, int]]:
    """The rows Synapse's `add_push_actions_to_staging` writes for each entry."""
    rows = []
    for event_id, user_id_actions, count_as_unread, thread_id in entries:
        for user_id, actions in user_id_actions.items():
            is_highlight = 1 if _action_has_highlight(actions) else 0
            rows.append(
                (
                    event_id,
                    user_id,
                    _serialize_action(actions, bool(is_highlight)),
                    1 if "notify" in actions else 0,
                    is_highlight,
                    int(count_as_unread),
                    thread_id,
                    now_ms,
                )
            )
    return rows


def add_push_actions_to_staging_txn(
    txn: LoggingTransaction, entries: list[StagedPushActions], now_ms: int
) -> None:
    rows = staging_rows(entries, now_ms)
    if rows:
        DatabasePool.simple_insert_many_txn(txn, "event_push_actions_staging", _COLUMNS, rows)


def ignored_by_txn(txn: LoggingTransaction, user_ids: Collection[str]) -> dict[str, frozenset[str]]:
    """For each of `user_ids`, the users who ignore it: what Synapse's
    `ignored_by` reads (`ignored_users` by `ignored_user_id`), for many users
    in one transaction (an empty set for a user nobody ignores)."""
    found: dict[str, set[str]] = {user_id: set() for user_id in user_ids}
    for batch in batch_iter(list(found), 500):
        clause, args = make_in_list_sql_clause(txn.database_engine, "ignored_user_id", batch)
        txn.execute(f"SELECT ignored_user_id, ignorer_user_id FROM ignored_users WHERE {clause}", args)
        for ignored, ignorer in txn:
            found[ignored].add(ignorer)
    return {user_id: frozenset(ignorers) for user_id, ignorers in found.items()}
