"""The fake resident's federation answers and its test controls, exercised over
real HTTPS on loopback."""

import json

import attr
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed

from tests.harness.client import sleep
from tests.harness.fakehs.events import event_id
from tests.harness.fakehs.keys import KEY_ID, verify_key_base64
from tests.harness.fakehs.room import RoomSpec, load_or_generate
from tests.harness.fakehs.server import FakeResident, Rule, _NoVerifyTLS
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json
from unpaddedbase64 import decode_base64

SPEC = RoomSpec(members=60, servers=6, history=4)
"""Room version 12, the default; every test runs on a version 10 room too."""
F = "/_matrix/federation/v1"


@pytest.fixture(params=["12", "10"], ids=["v12", "v10"])
def resident(request, tls_files, tmp_path):
    room = load_or_generate(attr.evolve(SPEC, room_version=request.param), tmp_path / "rooms")
    r = FakeResident(room, tls_files, personas=2)
    r.start()
    yield r
    pytest_twisted.blockon(defer.ensureDeferred(r.stop()))


def _http():
    pool = HTTPConnectionPool(reactor, persistent=False)
    return treq.client.HTTPClient(Agent(reactor, contextFactory=_NoVerifyTLS(), pool=pool))


async def get(resident, path, persona=0, method="GET", body=None):
    url = f"https://{resident.personas[persona].server_name}{path}"
    kwargs = {"data": json.dumps(body).encode()} if body is not None else {}
    response = await _http().request(method, url, timeout=10, **kwargs)
    return response.code, await response.content()


def tip(resident):
    return resident.room.events[-1].event_id


@pytest_twisted.ensureDeferred
async def test_two_personas_are_in_the_room_and_serve_notarised_keys(resident):
    assert len(resident.personas) == 2
    servers = resident.room.servers_in_room()
    assert all(p.server_name in servers for p in resident.personas)
    code, body = await get(resident, "/_matrix/key/v2/query", method="POST",
                           body={"server_keys": {SPEC.server_name(1): {}}})
    assert code == 200
    [doc] = json.loads(body)["server_keys"]
    notary = resident.personas[0].server_name
    for signer in (SPEC.server_name(1), notary):
        key = decode_verify_key_bytes(KEY_ID, decode_base64(verify_key_base64(signer)))
        verify_signed_json(doc, signer, key)


@pytest_twisted.ensureDeferred
async def test_state_ids_and_state_agree_and_events_have_valid_ids(resident):
    code, body = await get(resident, f"{F}/state_ids/{resident.room.room_id}?event_id={tip(resident)}")
    assert code == 200
    ids = json.loads(body)
    code, body = await get(resident, f"{F}/state/{resident.room.room_id}?event_id={tip(resident)}")
    state = json.loads(body)
    version = resident.room.version
    assert sorted(event_id(version, e) for e in state["pdus"]) == sorted(ids["pdu_ids"])
    assert sorted(event_id(version, e) for e in state["auth_chain"]) == sorted(ids["auth_chain_ids"])
    # State before the tip (the second persona's join) has every member but that persona.
    members = {e["state_key"] for e in state["pdus"] if e["type"] == "m.room.member"}
    assert len(members) == SPEC.members + SPEC.moderators + 1 + 1


@pytest_twisted.ensureDeferred
async def test_hold_keeps_a_request_until_released(resident):
    resident.hold("/state_ids/")
    d = defer.ensureDeferred(get(resident, f"{F}/state_ids/{resident.room.room_id}?event_id={tip(resident)}"))
    await sleep(0.5)
    assert not d.called and resident.held_count() == 1
    assert resident.release() == 1
    code, _ = await d
    assert code == 200


@pytest_twisted.ensureDeferred
async def test_fail_n_times_then_answer(resident):
    resident.add_rule(Rule("fail", "/event/", times=2, status=502))
    eid = tip(resident)
    codes = [(await get(resident, f"{F}/event/{eid}"))[0] for _ in range(3)]
    assert codes == [502, 502, 200]


@pytest_twisted.ensureDeferred
async def test_cut_connection_part_way(resident):
    resident.add_rule(Rule("cut", "/state/", after_bytes=100, times=1))
    with pytest.raises(ResponseFailed):
        await get(resident, f"{F}/state/{resident.room.room_id}?event_id={tip(resident)}")
    code, _ = await get(resident, f"{F}/state/{resident.room.room_id}?event_id={tip(resident)}")
    assert code == 200


@pytest.mark.parametrize("action", ["truncate", "malformed"])
@pytest_twisted.ensureDeferred
async def test_broken_bodies_are_not_json(resident, action):
    resident.add_rule(Rule(action, "/state/"))
    code, body = await get(resident, f"{F}/state/{resident.room.room_id}?event_id={tip(resident)}")
    assert code == 200
    with pytest.raises(ValueError):
        json.loads(body)


@pytest_twisted.ensureDeferred
async def test_oversize_and_endless_bodies(resident):
    resident.add_rule(Rule("oversize", "/event/", size=5_000_000, times=1))
    code, body = await get(resident, f"{F}/event/{tip(resident)}")
    assert code == 200 and len(body) > 5_000_000 and json.loads(body)["pdus"]
    resident.add_rule(Rule("endless", "/state/", size=20_000_000))
    with pytest.raises(ResponseFailed):
        await get(resident, f"{F}/state/{resident.room.room_id}?event_id={tip(resident)}")
    assert resident.bytes_served["state"] >= 20_000_000


@pytest.mark.parametrize("mode", ["bad_signature", "bad_hash", "extra_events"])
@pytest_twisted.ensureDeferred
async def test_forged_state(resident, mode):
    path = f"{F}/state/{resident.room.room_id}?event_id={tip(resident)}"
    _, honest = await get(resident, path)
    resident.add_rule(Rule("forge", "/state/", mode=mode))
    _, forged = await get(resident, path)
    honest_doc, forged_doc = json.loads(honest), json.loads(forged)
    if mode == "extra_events":
        assert len(forged_doc["pdus"]) == len(honest_doc["pdus"]) + 10
    else:
        assert forged_doc != honest_doc
        assert len(forged_doc["pdus"]) == len(honest_doc["pdus"])


@pytest_twisted.ensureDeferred
async def test_unknown_routes_are_404_and_recorded(resident):
    code, body = await get(resident, f"{F}/no_such_thing")
    assert code == 404 and json.loads(body)["errcode"] == "M_UNRECOGNIZED"
    assert resident.unknown_routes == [f"GET {F}/no_such_thing"]
