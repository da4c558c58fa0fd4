"""The engine's event checks (run in worker threads) and its streaming /state
reader, on events signed like a real remote server signs them."""

import copy
import json

import pytest
from signedjson.key import get_verify_key
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from synapse.api.room_versions import RoomVersions

from synapse_fastjoin.resync.checks import KeyInfo, check_chunk, signing_servers, wanted_key_ids
from synapse_fastjoin.resync.stream import StateBodyReader, StreamAborted
from tests.harness.fakehs.events import finalise_event
from tests.harness.fakehs.keys import KEY_ID, signing_key

V10 = RoomVersions.V10
ROOM = "!room:origin.test"


def _member(i: int, server: str = "origin.test", **extra) -> dict:
    user = f"@u{i}:{server}"
    event = {
        "type": "m.room.member",
        "room_id": ROOM,
        "sender": user,
        "state_key": user,
        "content": {"membership": "join", **extra},
        "origin_server_ts": 1_700_000_000_000 + i,
        "depth": 10 + i,
        "prev_events": ["$prev"],
        "auth_events": ["$create"],
    }
    finalise_event(V10, event, server)
    return event


def _ids(events):
    from tests.harness.fakehs.events import event_id

    return [event_id(V10, e) for e in events]


def _keys(*servers, valid_until=2**62):
    return {
        (s, KEY_ID): KeyInfo(get_verify_key(signing_key(s)), valid_until) for s in servers
    }


def test_good_events_are_accepted_with_their_ids():
    events = [_member(i) for i in range(5)]
    ids = _ids(events)
    result = check_chunk(events, V10, ROOM, set(ids), set(ids), _keys("origin.test"))
    assert [e.event_id for e in result.accepted] == ids
    assert (result.unwanted, result.redacted, result.bad_signature) == (0, 0, [])


def test_events_not_promised_or_of_another_room_or_duplicated_are_unwanted():
    events = [_member(i) for i in range(3)]
    ids = _ids(events)
    other_room = _member(9)
    other_room["room_id"] = "!other:origin.test"
    finalise_event(V10, other_room, "origin.test")
    chunk = events + [events[0], other_room]
    promised = set(ids[:2]) | set(_ids([other_room]))
    result = check_chunk(chunk, V10, ROOM, promised, promised, _keys("origin.test"))
    assert [e.event_id for e in result.accepted] == ids[:2]
    # events[2] was not promised, events[0] twice, other_room is of another room
    assert result.unwanted == 3


def test_promised_events_already_stored_are_skipped_not_counted_hostile():
    events = [_member(i) for i in range(3)]
    ids = _ids(events)
    result = check_chunk(events, V10, ROOM, set(ids), {ids[1]}, _keys("origin.test"))
    assert [e.event_id for e in result.accepted] == [ids[1]]
    assert result.already_stored == 2 and result.unwanted == 0


def test_bad_signature_missing_key_and_expired_key_are_refused():
    events = [_member(i) for i in range(3)]
    ids = _ids(events)
    forged = copy.deepcopy(events[0])
    forged["signatures"]["origin.test"][KEY_ID] = "A" * 86
    result = check_chunk([forged], V10, ROOM, set(ids), set(ids), _keys("origin.test"))
    assert result.accepted == [] and result.bad_signature[0][0] == ids[0]
    assert "bad signature" in result.bad_signature[0][1]

    # Without a usable key the event is not judged forged: it is set aside to
    # be checked again once the key can be fetched.
    result = check_chunk(events[1:2], V10, ROOM, set(ids), set(ids), {})
    assert result.accepted == [] and result.bad_signature == []
    assert result.missing_key[0][0] == ids[1] and "no usable key" in result.missing_key[0][1]

    # Room v5+ enforce key validity: a key that expired before the event.
    expired = _keys("origin.test", valid_until=events[2]["origin_server_ts"] - 1)
    result = check_chunk(events[2:3], V10, ROOM, set(ids), set(ids), expired)
    assert result.accepted == [] and "expired" in result.missing_key[0][1]


def test_signed_by_the_wrong_server_is_refused():
    event = _member(1, server="origin.test")
    # Re-sign as another server: the sender's server has not signed it.
    del event["signatures"]
    finalise_event(V10, event, "evil.test")
    ids = _ids([event])
    result = check_chunk([event], V10, ROOM, set(ids), set(ids), _keys("origin.test", "evil.test"))
    assert result.accepted == [] and "not signed by origin.test" in result.bad_signature[0][1]


def test_wrong_content_hash_is_redacted_not_dropped():
    event = _member(1, displayname="Alice")
    (event_id,) = _ids([event])
    event["content"]["displayname"] = "Mallory"  # signature covers the redacted form only
    result = check_chunk([event], V10, ROOM, {event_id}, {event_id}, _keys("origin.test"))
    assert result.redacted == 1
    (accepted,) = result.accepted
    assert accepted.event_id == event_id
    assert "displayname" not in accepted.content and accepted.content["membership"] == "join"


def test_restricted_join_needs_the_authorising_server_too():
    event = _member(1, join_authorised_via_users_server="@admin:auth.test")
    assert signing_servers(event, V10) == {"origin.test", "auth.test"}
    assert wanted_key_ids(event, V10) == {("origin.test", KEY_ID)}
    ids = _ids([event])
    result = check_chunk([event], V10, ROOM, set(ids), set(ids), _keys("origin.test", "auth.test"))
    assert result.accepted == [] and "not signed by auth.test" in result.bad_signature[0][1]


def test_malformed_items_are_counted():
    result = check_chunk([{"type": 5}, {"__not_an_object__": True}], V10, ROOM, set(), set(), {})
    assert result.accepted == []
    assert result.malformed + result.unwanted == 2


# The streaming reader.


class _Transport:
    def __init__(self):
        self.paused = False
        self.stopped = False

    def pauseProducing(self):  # noqa: N802
        self.paused = True

    def resumeProducing(self):  # noqa: N802
        self.paused = False

    def stopProducing(self):  # noqa: N802
        self.stopped = True


def _reader(chunks, pending=None, **kwargs):
    def on_chunk(chunk):
        chunks.append(chunk)
        if pending is not None:
            d = defer.Deferred()
            pending.append(d)
            return d
        return defer.succeed(None)

    reader = StateBodyReader(on_chunk, Clock(), **{"chunk_size": 2, "max_items": 100, **kwargs})
    reader.makeConnection(_Transport())
    return reader


def _body(n):
    pdus = [{"n": i} for i in range(n)]
    return json.dumps({"pdus": pdus[: n - 1], "auth_chain": pdus[n - 1 :]}).encode()


def test_reader_hands_on_state_and_auth_chain_in_chunks_from_split_data():
    chunks = []
    reader = _reader(chunks)
    body = _body(5)
    for i in range(0, len(body), 7):  # arbitrary splits, mid-token
        reader.dataReceived(body[i : i + 7])
    reader.connectionLost(Failure(ResponseDone()))
    assert reader.done.called
    assert sorted(item["n"] for chunk in chunks for item in chunk) == [0, 1, 2, 3, 4]
    assert all(len(c) <= 2 for c in chunks)


def test_reader_pauses_while_the_consumer_is_behind():
    chunks, pending = [], []
    reader = _reader(chunks, pending, max_pending=2)
    reader.dataReceived(_body(9)[:-30])
    assert reader.transport.paused
    for d in list(pending):
        d.callback(None)
    assert not reader.transport.paused


@pytest.mark.parametrize(
    "data,limit,why",
    [
        (b'{"pdus":[{"padding":"' + b"x" * 300_000, {}, "no complete event"),
        (_body(50), {"max_items": 10}, "more than 10 events"),
        (b'{"pdus":[}', {}, "not valid JSON"),
    ],
    ids=["endless-item", "too-many-items", "malformed"],
)
def test_reader_aborts_hostile_bodies(data, limit, why):
    reader = _reader([], **limit)
    errors = []
    reader.done.addErrback(errors.append)
    reader.dataReceived(data)
    assert errors and errors[0].check(StreamAborted)
    assert why in str(errors[0].value)
    assert reader.transport.stopped


def test_reader_reports_a_cut_connection_and_hands_on_what_arrived_whole():
    chunks = []
    reader = _reader(chunks, chunk_size=10)
    errors = []
    reader.done.addErrback(errors.append)
    body = _body(8)
    reader.dataReceived(body[: len(body) // 2])
    reader.connectionLost(Failure(ConnectionError("reset")))
    assert errors and "connection lost" in str(errors[0].value)
    # The events that arrived whole were handed on (fewer than a chunk).
    handed = [item["n"] for chunk in chunks for item in chunk]
    assert handed and handed == list(range(len(handed)))


def test_reader_hands_on_what_arrived_whole_when_the_body_ends_early():
    chunks = []
    reader = _reader(chunks, chunk_size=10)
    errors = []
    reader.done.addErrback(errors.append)
    body = _body(8)
    reader.dataReceived(body[: len(body) // 2])
    reader.connectionLost(Failure(ResponseDone()))
    assert errors and "ended early" in str(errors[0].value)
    assert [item["n"] for chunk in chunks for item in chunk]


def test_reader_hands_nothing_on_from_a_hostile_body():
    chunks = []
    reader = _reader(chunks, chunk_size=10, max_items=3)
    errors = []
    reader.done.addErrback(errors.append)
    reader.dataReceived(_body(8))
    assert errors and "more than 3 events" in str(errors[0].value)
    assert chunks == []


def test_reader_gives_up_on_a_silent_server():
    clock = Clock()
    reader = StateBodyReader(lambda c: defer.succeed(None), clock, chunk_size=2, max_items=10, idle_timeout=30)
    reader.makeConnection(_Transport())
    errors = []
    reader.done.addErrback(errors.append)
    reader.dataReceived(b'{"pdus":[')
    clock.advance(31)
    assert errors and "no data for 30 s" in str(errors[0].value)


# Which servers a resync asks: tests/unit/test_fetch_policy.py


# One pass over the body: whatever the body's pieces, the items are those the
# standard library (Synapse's decoder) makes of the whole body.

_TRICKY_BODY = (
    '{ "origin" : "x", "pdus" : [ {"a": 1.5e3, "b": -0, "c": 12345678901234567890123, '
    '"s": "quote \\" brace } bracket ] \\u00e9 \\ud83d\\ude00 caf\u00e9 \U0001f600", "n": null, '
    '"t": [true, false, {"deep": [[], {}]}]} , {"k": "\\\\"}, 7, "str", [1] ],\n'
    ' "other": {"pdus": [{"not": "an item"}]}, "auth_chain": [{"z": -1.25E-2}], "tail": [1, 2] }'
).encode("utf-8")


def _items(body: bytes, step: int) -> list:
    chunks = []
    reader = _reader(chunks, chunk_size=100)
    for i in range(0, len(body), step):
        reader.dataReceived(body[i : i + step])
    reader.connectionLost(Failure(ResponseDone()))
    assert reader.done.called and not isinstance(reader.done.result, Failure), reader.done.result
    return [item for chunk in chunks for item in chunk]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 10_000])
def test_reader_items_equal_the_standard_librarys_in_any_pieces(step):
    whole = json.loads(_TRICKY_BODY)
    expected = [
        item if isinstance(item, dict) else {"__not_an_object__": True}
        for item in whole["pdus"] + whole["auth_chain"]
    ]
    assert _items(_TRICKY_BODY, step) == expected
    # The numbers are the standard library's: big integers whole, no Decimals.
    assert type(_items(_TRICKY_BODY, step)[0]["a"]) is float


@pytest.mark.parametrize(
    "body,why",
    [
        (b'{"pdus":[{"a": NaN}]}', "not valid JSON"),
        (b'{"pdus":[{"a": "\xff\xfe"}]}', "not UTF-8"),
        (b'{"pdus":[{"a": 1} {"b": 2}]}', "not valid JSON"),
        (b'["pdus"]', "not valid JSON"),
        (b'{"pdus":[{"a": 1}]} trailing', "not valid JSON"),
    ],
    ids=["nan", "not-utf8", "missing-comma", "not-an-object", "trailing-data"],
)
def test_reader_refuses_bodies_that_are_not_json(body, why):
    reader = _reader([])
    errors = []
    reader.done.addErrback(errors.append)
    reader.dataReceived(body)
    reader.connectionLost(Failure(ResponseDone()))
    assert errors and errors[0].check(StreamAborted)
    assert why in str(errors[0].value)
