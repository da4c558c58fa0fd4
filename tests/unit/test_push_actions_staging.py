"""storage/push_actions.py writes the rows Synapse's `add_push_actions_to_staging`
writes (patch 0032 lets a run of staged events write them in one transaction),
on SQLite and PostgreSQL: notify and highlight actions, dict and string
actions, several users of one event, unread counts, threads, an event with no
actions (no row)."""

from typing import Any

import pytest_twisted
from synapse.server import HomeServer

from synapse_fastjoin.storage.push_actions import StagedPushActions
from synapse_fastjoin.storage.store import FastJoinStore

# Two HomeServers on fresh databases, "synapse" and "runs".
from tests.unit.test_staged_runs_parity import homeservers  # noqa: F401 (fixture)

NOW = 1_800_000_000_000

HIGHLIGHT = [
    "notify",
    {"set_tweak": "sound", "value": "default"},
    {"set_tweak": "highlight"},
]
ENTRIES: list[StagedPushActions] = [
    ("$plain", {"@a:push.test": ["notify"]}, False, "main"),
    ("$mention", {"@a:push.test": HIGHLIGHT, "@b:push.test": ["notify"]}, False, "main"),
    ("$highlight-false", {"@a:push.test": ["notify", {"set_tweak": "highlight", "value": False}]}, False, "main"),
    # Counted as unread only (MSC2654): no actions, a row all the same.
    ("$unread", {"@a:push.test": []}, True, "main"),
    ("$thread-reply", {"@b:push.test": ["notify", {"set_tweak": "sound", "value": "ring"}]}, True, "$root"),
    ("$nobody", {}, False, "main"),
]


async def _staging(hs: HomeServer) -> list[tuple[Any, ...]]:
    def txn(t: Any) -> list[tuple[Any, ...]]:
        t.execute(
            "SELECT event_id, user_id, actions, notif, highlight, unread, thread_id"
            " FROM event_push_actions_staging ORDER BY event_id, user_id"
        )
        return [tuple(r) for r in t.fetchall()]

    return await hs.get_datastores().main.db_pool.runInteraction("push_staging_test", txn)


@pytest_twisted.ensureDeferred
async def test_rows_equal_synapses(homeservers: dict[str, HomeServer]) -> None:  # noqa: F811
    synapse_store = homeservers["synapse"].get_datastores().main
    for event_id, actions, unread, thread_id in ENTRIES:
        await synapse_store.add_push_actions_to_staging(event_id, dict(actions), unread, thread_id)

    hs = homeservers["runs"]
    store = FastJoinStore(hs.get_datastores().main.db_pool.runInteraction, may_migrate=True)
    await store.ensure_schema()
    await store.add_push_actions_to_staging(ENTRIES, NOW)
    # Nothing to write: no transaction fails.
    await store.add_push_actions_to_staging([], NOW)

    expected = await _staging(homeservers["synapse"])
    assert len(expected) == 6, expected  # two users for one event, none for another
    assert await _staging(hs) == expected
