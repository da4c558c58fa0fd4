# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""A `/send` transaction's PDUs checked and staged together
(federation/staging.py, patch 0028) give what Synapse's one-at-a-time path
gives: the same result per PDU and the same staging rows.

Two real in-process HomeServers on fresh databases (SQLite or PostgreSQL,
`--db`), each holding the same room (room versions 10 and 12), get the same
`/send` transactions through `FederationServer._handle_pdus_in_txn`: one
through Synapse's path, the other with the module's callback registered. The
room's processing lock is held by the test, so the staged events stay
staged. The transactions mix:

- valid messages, from the origin's users and from another server's;
- a forged signature (signed with a key that is not the server's): an error;
- a content hash that does not match (content changed after signing): the
  redacted event is staged;
- a message the spam checker's `should_drop_federated_event` drops;
- the same PDU twice in one transaction, and a PDU staged by an earlier
  transaction (left as staged then);
- a transaction of a single PDU, right after the others (its received
  time must follow theirs).

The results per event id must be equal; so must the staging rows (their
received times aside); and the module's rows must be in the order sent.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from signedjson.sign import sign_json
from synapse.app.homeserver import SynapseHomeServer
from synapse.events import EventBase, make_event_from_dict
from synapse.federation.federation_server import _INBOUND_EVENT_HANDLING_LOCK_NAME
from synapse.logging.context import LoggingContext
from twisted.internet import reactor, task

from synapse_fastjoin.federation.staging import BatchStaging
from synapse_fastjoin.storage.store import FastJoinStore
from tests.harness import inprocess
from tests.harness.inprocess import store_fake_server_keys
from tests.harness.endsteps import JoinScenario, join_scenario, prepare_partial_join
from tests.harness.fakehs.keys import signing_key

SERVER = "joiner.test"


@pytest.fixture
def homeservers(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    with inprocess.homeservers_for_fixture(
        ("synapse", "batch"), SERVER, db_backend, tmp_path_factory, request, inprocess.QUIET_BACKGROUND
    ) as made:
        yield made


def _pdus(scenario: JoinScenario) -> tuple[str, list[list[dict[str, Any]]]]:
    """The origin and its transactions (lists of PDU dicts)."""
    room = scenario.room
    spec = room.spec
    origin = spec.server_name(1)
    own = [spec.member(i) for i in range(1, 200) if spec.member(i).endswith(":" + origin)]
    other = next(spec.member(i) for i in range(1, 200) if not spec.member(i).endswith(":" + origin))
    ts = iter(range(1_700_000_300_000, 1_700_000_400_000))

    def message(sender: str, body: str) -> dict[str, Any]:
        return room.create_event(sender, "m.room.message", {"msgtype": "m.text", "body": body}, None, next(ts)).as_dict()

    first = [message(own[0], "hello"), message(other, "from another server"), message(own[1], "again")]
    forged = message(own[0], "forged")
    forged["signatures"] = sign_json(
        {k: v for k, v in forged.items() if k not in ("signatures", "unsigned")}, origin, signing_key("not-" + origin)
    )["signatures"]
    bad_hash = message(own[1], "the original")
    bad_hash["content"] = {"msgtype": "m.text", "body": "changed after signing"}
    spam = message(own[0], "SPAM buy now")
    second = [
        message(own[0], "second"),
        forged,
        bad_hash,
        spam,
        copy.deepcopy(first[1]),  # staged by the first transaction already
        message(other, "two times"),
    ]
    second.append(copy.deepcopy(second[-1]))  # the same PDU twice in one transaction
    second.append(message(own[1], "last"))
    single = [message(own[0], "alone")]
    return origin, [first, second, single]


async def _staging(hs: SynapseHomeServer, room_id: str) -> list[tuple[Any, ...]]:
    def txn(t: Any) -> list[tuple[Any, ...]]:
        t.execute(
            "SELECT origin, room_id, event_id, event_json, internal_metadata, received_ts"
            " FROM federation_inbound_events_staging WHERE room_id = ? ORDER BY received_ts, event_id",
            (room_id,),
        )
        return [tuple(r) for r in t.fetchall()]

    return await hs.get_datastores().main.db_pool.runInteraction("send_staging_test", txn)


@pytest.mark.parametrize("room_version", ["10", "12"])
@pytest_twisted.ensureDeferred
async def test_staged_together_as_synapse_stages(homeservers: dict[str, SynapseHomeServer], room_version: str) -> None:
    scenario = join_scenario(room_version, members=40, servers=4, local_server=SERVER)
    origin, transactions = _pdus(scenario)
    results: dict[str, list[dict[str, Any]]] = {}
    rows: dict[str, list[tuple[Any, ...]]] = {}
    stats = None
    for name, hs in homeservers.items():
        hs.get_federation_handler()
        await hs.get_datastores().main.get_partial_state_room_resync_info()
        await task.deferLater(reactor, 0.1)
        await prepare_partial_join(hs, scenario)
        await store_fake_server_keys(hs, scenario.room.spec.server_names(), hs.get_clock().time_msec())

        async def drop_spam(event: EventBase) -> bool:
            return "SPAM" in str(event.content.get("body", ""))

        hs.get_module_api_callbacks().spam_checker.register_callbacks(should_drop_federated_event=drop_spam)
        fed = hs.get_federation_server()
        if name == "batch":
            fastjoin_store = FastJoinStore(hs.get_datastores().main.db_pool.runInteraction, may_migrate=True)
            await fastjoin_store.ensure_schema()
            staging = BatchStaging(hs, fastjoin_store)
            fed._fastjoin_callbacks.register_callbacks(stage_received_pdus=staging.stage_received_pdus)
            stats = staging.stats
        # Held here: the staged events stay staged.
        lock = await hs.get_datastores().main.try_acquire_lock(_INBOUND_EVENT_HANDLING_LOCK_NAME, scenario.room_id)
        assert lock is not None
        results[name] = []
        with LoggingContext(name=f"send-staging-{name}", server_name=SERVER):
            for pdus in transactions:
                txn = types.SimpleNamespace(pdus=copy.deepcopy(pdus))
                results[name].append(await fed._handle_pdus_in_txn(origin, txn, hs.get_clock().time_msec()))
        rows[name] = await _staging(hs, scenario.room_id)
        await lock.release()

    assert stats is not None and stats.transactions == 3, "the module did not stage the transactions"
    assert results["batch"] == results["synapse"]
    errors = [r for txn in results["synapse"] for r in txn.values() if r]
    assert len(errors) == 1 and "signature" in str(errors[0]).lower(), errors
    # The same rows, received times aside.
    without_ts = {name: sorted(r[:5] for r in rs) for name, rs in rows.items()}
    assert without_ts["batch"] == without_ts["synapse"]
    staged_ids = [r[2] for r in rows["batch"]]
    # Forged and spam left out, the duplicates once, the earlier one not again.
    assert len(staged_ids) == 3 + 4 + 1, staged_ids
    # The redacted event was staged redacted, on both.
    assert any('"changed after signing"' not in r[3] and "the original" not in r[3] for r in rows["synapse"])
    # In the order first sent (so the PDU staged again in the second
    # transaction kept its first received time), with no two times alike.
    sent: list[str] = []
    for pdus in transactions:
        for pdu in pdus:
            event_id = make_event_from_dict(copy.deepcopy(pdu), scenario.version).event_id
            if event_id in staged_ids and event_id not in sent:
                sent.append(event_id)
    assert staged_ids == sent
    assert len({r[5] for r in rows["batch"]}) == len(rows["batch"])
