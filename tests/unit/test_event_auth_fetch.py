# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Auth chains fetched for inbound events (federation/event_auth.py) store
what Synapse's `FederationClient.get_event_auth` path stores.

Two real in-process HomeServers on fresh databases (`--db`) hold the same
partial-state join of a generated room (room versions 10 and 12), with the
joins of six members left out (as during a resync). Each member then sends a
message, and the server it came from answers `/event_auth` for it (the
transport is played here; everything from the parsed body on is real). The
answers carry, beside the plain auth chains:

- a stored event's copy with other `unsigned` fields (held as received);
- a stored event's copy with a signature changed, one with content added
  that its content hash does not match, and one with a value of another
  JSON type in content the redaction algorithm drops (`false` for `0`: equal
  in Python, not in canonical JSON): Synapse's checks fail them and write
  failure rows;
- a member's join (not stored) with a signature changed: dropped, so that
  member's message has no auth chain;
- an event of the answer that is not valid for the room version: the whole
  answer fails.

One server runs Synapse's `get_event_auth` for each event, the other the
module's `fetch_auth_chains`; each then persists the chains as the runs do
(`_auth_and_persist_outliers`, the first copy of an event kept). The events,
their JSON, rejections and failure rows must be equal, and the module must
have left the stored events' plain copies unchecked.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from synapse.api.errors import RequestSendFailed
from synapse.app.homeserver import SynapseHomeServer
from synapse.events import EventBase
from synapse.logging.context import LoggingContext
from synapse.types import get_domain_from_id

from synapse_fastjoin.federation.event_auth import AuthChainFetch, fetch_auth_chains, same_json
from tests.harness import inprocess
from tests.harness.inprocess import store_fake_server_keys
from tests.harness.endsteps import join_scenario, prepare_partial_join

SERVER = "joiner.test"

TABLES = {
    "events": ("event_id", "type", "sender", "state_key", "outlier", "rejection_reason"),
    "event_json": ("event_id", "json", "format_version"),
    "rejections": ("event_id", "reason"),
    "event_failed_pull_attempts": ("room_id", "event_id", "num_attempts", "last_cause"),
    "state_events": ("event_id", "type", "state_key"),
    "event_auth": ("event_id", "auth_id"),
}


@pytest.fixture
def homeservers(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict[str, SynapseHomeServer]]:
    with inprocess.homeservers_for_fixture(("synapse", "module"), SERVER, db_backend, tmp_path_factory, request) as made:
        yield made


def _flip_signature(pdu: dict[str, Any]) -> None:
    server, sigs = next(iter(pdu["signatures"].items()))
    key_id, sig = next(iter(sigs.items()))
    pdu["signatures"][server][key_id] = ("B" if sig[0] != "B" else "C") + sig[1:]


async def _rows(hs: SynapseHomeServer, room_id: str) -> dict[str, list[tuple[Any, ...]]]:
    def txn(t: Any) -> dict[str, list[tuple[Any, ...]]]:
        out = {}
        for table, columns in TABLES.items():
            t.execute(f"SELECT {', '.join(columns)} FROM {table}")
            out[table] = sorted((tuple(r) for r in t.fetchall()), key=repr)
        return out

    return await hs.get_datastores().main.db_pool.runInteraction("event_auth_test_rows", txn)


def test_a_received_text_is_parsed_once_and_checked_as_its_own() -> None:
    """Copies with the same received text share a parse and a verdict; a
    copy that differs in type, order or `unsigned` does not; each copy not
    held goes to the checks as an instance of its own, equal to a parse
    of the copy itself."""
    from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
    from synapse.federation.federation_base import event_from_pdu_json

    from synapse_fastjoin.federation.event_auth import _Parses, received_key

    scenario = join_scenario("12", members=4, servers=2, local_server=SERVER, variety=False)
    room = scenario.room
    pl = room.by_id[room.current_state[("m.room.power_levels", "")]].as_dict()
    assert received_key(pl) == received_key(copy.deepcopy(pl))
    reordered = dict(reversed(list(copy.deepcopy(pl).items())))
    assert received_key(reordered) != received_key(pl)
    retyped = copy.deepcopy(pl)
    retyped["depth"] = float(retyped["depth"])
    assert received_key(retyped) != received_key(pl)
    assert received_key({"a": float("nan")}) is None

    version = KNOWN_ROOM_VERSIONS["12"]
    parses = _Parses(version)
    first = parses.parse_answer([copy.deepcopy(pl), copy.deepcopy(pl)])
    second = parses.parse_answer([copy.deepcopy(pl), reordered])
    assert first[0][1] is first[1][1] is second[0][1]
    assert second[1][1] is not first[0][1]
    expected = event_from_pdu_json(copy.deepcopy(pl), version)
    handed = [parses.to_check(key, ev) for key, ev in first + second[:1]]
    assert len({id(ev) for ev in handed}) == 3
    for ev in handed:
        assert ev.get_dict() == expected.get_dict()
        assert ev.event_id == expected.event_id
    # One comparison per text: a later stored copy does not change the verdict.
    key, ev = first[0]
    assert parses.held(key, expected, ev)
    assert parses.held(key, None, ev)


def test_same_json_is_strict() -> None:
    assert same_json({"a": [1, {"b": "c"}]}, {"a": [1, {"b": "c"}]})
    assert not same_json({"a": 0}, {"a": False})
    assert not same_json({"a": 1}, {"a": 1.0})
    assert not same_json({"a": 1}, {"a": 1, "b": 2})
    assert not same_json({"a": [1]}, {"a": [1, 2]})
    assert not same_json({"a": "1"}, {"a": 1})
    assert not same_json({"a": {}}, {"a": []})


@pytest.mark.parametrize(
    ("room_version", "read_fails"),
    [("10", False), ("12", False), ("12", True)],
    ids=["10", "12", "12-stored-copies-unreadable"],
)
@pytest_twisted.ensureDeferred
async def test_fetch_stores_what_synapse_stores(
    homeservers: dict[str, SynapseHomeServer], room_version: str, read_fails: bool
) -> None:
    """With `read_fails`, reading the stored copies fails: every event of
    the answers is then checked, as Synapse's path checks them."""
    scenario = join_scenario(room_version, members=40, servers=5, local_server=SERVER, variety=False)
    room = scenario.room
    spec = room.spec
    senders = [spec.member(i) for i in range(1, 8)]
    # The fifth sender's join is stored, with a number in content the
    # redaction algorithm drops (covered by the hashes, not the event id).
    counted = room.create_event(
        senders[4], "m.room.member", {"membership": "join", "displayname": "four", "org.example.count": 0}, senders[4],
        1_700_000_250_000,
    ).event_id
    left_out = {room.current_state[("m.room.member", m)] for m in senders} - {counted}
    messages = [
        room.create_event(m, "m.room.message", {"msgtype": "m.text", "body": f"hi {i}"}, None, 1_700_000_300_000 + i)
        for i, m in enumerate(senders)
    ]
    servers = {get_domain_from_id(e.sender) for e in room.by_id.values()}
    create_id = room.current_state[("m.room.create", "")]
    pl_id = room.current_state[("m.room.power_levels", "")]
    jr_id = room.current_state[("m.room.join_rules", "")]

    # The answers, one per message, each from the sender's server.
    answers: dict[str, list[dict[str, Any]]] = {}
    for i, message in enumerate(messages):
        by_id = {e: copy.deepcopy(room.by_id[e].as_dict()) for e in room.auth_chain([message.event_id])}
        assert {create_id, pl_id, jr_id} <= set(by_id) or room_version == "12"
        if i == 0:
            # Copies that other answers carry too, with the same text: the
            # power levels with the signature answer 2 changes (checked, and
            # failed, once per answer in Synapse's path, so twice), and the
            # join of the fourth sender, not stored, as answer 3 has it.
            _flip_signature(by_id[pl_id])
            join3 = room.current_state[("m.room.member", senders[3])]
            by_id[join3] = copy.deepcopy(room.by_id[join3].as_dict())
        elif i == 1:
            by_id[jr_id]["unsigned"] = {"age": 1234, "replaces_state": "$planted"}
        elif i == 2:
            _flip_signature(by_id[pl_id])
        elif i == 3:
            by_id[jr_id]["content"]["org.example.extra"] = "not in the content hash"
        elif i == 4:
            by_id[counted]["content"]["org.example.count"] = False
        elif i == 5:
            _flip_signature(by_id[room.current_state[("m.room.member", senders[5])]])
        elif i == 6:
            by_id[jr_id]["depth"] = "not a depth"
        answers[message.event_id] = list(by_id.values())
    wanted = [(get_domain_from_id(m.sender), m.event_id) for m in messages]

    results: dict[str, dict[str, list[tuple[Any, ...]]]] = {}
    fetch = AuthChainFetch()
    for name, hs in homeservers.items():
        await prepare_partial_join(hs, scenario, leave_out=left_out | {m.event_id for m in messages})
        await store_fake_server_keys(hs, servers, hs.get_clock().time_msec())

        async def get_event_auth(destination: str, room_id: str, event_id: str) -> dict[str, Any]:
            if destination != get_domain_from_id(room.by_id[event_id].sender):
                raise RequestSendFailed(Exception("not its server"), can_retry=False)
            return {"auth_chain": copy.deepcopy(answers[event_id])}

        hs.get_federation_client().transport_layer.get_event_auth = get_event_auth  # type: ignore[method-assign]
        with LoggingContext(name=f"event-auth-{name}", server_name=SERVER):
            if name == "synapse":
                chains: dict[str, list[EventBase]] = {}
                for origin, event_id in wanted:
                    try:
                        chains[event_id] = await hs.get_federation_client().get_event_auth(origin, scenario.room_id, event_id)
                    except Exception:
                        pass
            else:
                store = hs.get_datastores().main
                if read_fails:
                    # The first read (the stored copies) fails; the checks'
                    # own reads (Synapse's fallback to a stored copy) do not.
                    get_events = store.get_events
                    failed: list[bool] = []

                    async def unreadable(*args: Any, **kwargs: Any) -> Any:
                        if not failed:
                            failed.append(True)
                            raise RuntimeError("a failed read")
                        return await get_events(*args, **kwargs)

                    store.get_events = unreadable  # type: ignore[method-assign]
                try:
                    chains = await fetch_auth_chains(hs, scenario.room_id, wanted, 10, fetch)
                finally:
                    store.__dict__.pop("get_events", None)
            fetched: dict[str, EventBase] = {}
            for _, event_id in wanted:
                for ev in chains.get(event_id, ()):
                    if ev.event_id != event_id:
                        fetched.setdefault(ev.event_id, ev)
            await hs.get_federation_event_handler()._auth_and_persist_outliers(scenario.room_id, fetched.values())
        results[name] = await _rows(hs, scenario.room_id)

    synapse, module = results["synapse"], results["module"]
    for table in TABLES:
        assert synapse[table] == module[table], table
    stored = {r[0] for r in module["events"]}
    # The joins of the plain answers' senders were stored; the one with a
    # bad signature was not, nor the joins of the answer that failed whole.
    assert left_out - stored == {
        room.current_state[("m.room.member", senders[5])],
        room.current_state[("m.room.member", senders[6])],
    }
    # Failure rows for the stored events' bad copies and the bad join.
    failed = {r[1] for r in module["event_failed_pull_attempts"]}
    assert {pl_id, jr_id, counted, room.current_state[("m.room.member", senders[5])]} <= failed, failed
    # The bad copy two answers carry was checked for each.
    assert [r[2] for r in module["event_failed_pull_attempts"] if r[1] == pl_id] == [2]
    if read_fails:
        assert failed, "the stored copies were not read"
        assert fetch.checked == fetch.received > 0, (fetch.checked, fetch.received)
    else:
        # The stored events' plain copies were not checked again.
        assert 0 < fetch.checked < fetch.received / 2, (fetch.checked, fetch.received)
