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


async def test_who_ignores_the_senders_read_at_once_equals_synapses(homeservers: dict[str, HomeServer]) -> None:  # noqa: F811
    """`ignored_by` for a run's senders in one query: the answer of Synapse's
    `ignored_by` for each, put in its cache; an invalidation while the query
    runs leaves that sender out of the cache."""
    from synapse_fastjoin.handlers.staged_runs import StagedRuns

    hs = homeservers["runs"]
    main = hs.get_datastores().main
    a, b = "@a:push.test", "@b:push.test"
    x, y, z = "@x:else.test", "@y:else.test", "@z:else.test"
    await main.add_account_data_for_user(a, "m.ignored_user_list", {"ignored_users": {x: {}, y: {}}})
    await main.add_account_data_for_user(b, "m.ignored_user_list", {"ignored_users": {x: {}}})
    store = FastJoinStore(main.db_pool.runInteraction, may_migrate=True)
    await store.ensure_schema()

    found = await store.ignored_by([x, y, z])
    main.ignored_by.invalidate_all()
    expected = {u: await main.ignored_by(u) for u in (x, y, z)}
    assert found == expected == {x: frozenset({a, b}), y: frozenset({a}), z: frozenset()}

    runs = StagedRuns(hs, store, 100)
    runs._setup()
    main.ignored_by.invalidate_all()
    await runs._warm_ignored_by({x, y, z})
    assert {u: main.ignored_by.cache.get_immediate(u, None) for u in (x, y, z)} == expected
    # Synapse's own lookups find those entries: with the rows gone behind the
    # cache's back, it still answers what was read.
    await main.db_pool.simple_delete("ignored_users", {"ignored_user_id": y}, desc="test")
    assert await main.ignored_by(y) == frozenset({a})
    await main.db_pool.simple_insert(
        "ignored_users", {"ignorer_user_id": a, "ignored_user_id": y}, desc="test"
    )

    # An ignore list changed while the query runs: that user is not cached.
    main.ignored_by.invalidate_all()
    read = store.ignored_by

    async def read_then_invalidate(user_ids: Any) -> Any:
        result = await read(user_ids)
        main.ignored_by.invalidate((x,))
        return result

    store.ignored_by = read_then_invalidate  # type: ignore[method-assign]
    await runs._warm_ignored_by({x, y})
    assert main.ignored_by.cache.get_immediate(x, None) is None
    assert main.ignored_by.cache.get_immediate(y, None) == frozenset({a})
