"""The engine's event checks give, event for event, the outcome of Synapse's own
federation path.

One set of hostile events is handed, as the same bytes, to both:

- Synapse's path for a PDU pulled over federation: the body parsed by the
  standard-library JSON decoder Synapse uses for `/event` and `/send`, then
  `parse_events_from_pdu_json` (depth filter + `event_from_pdu_json`), the
  room check Synapse's pulled-event paths apply (events of another room are
  never stored), and `FederationBase._check_sigs_and_hash` (signatures through
  the real keyring, content hash, the room's policy server, spam checkers);
- ours: the bytes as a `/state` body through `StateBodyReader`, the chunk
  through `check_chunk` in a worker thread (keys fetched through the same
  keyring, as the engine does), then `run_spam_checks` on the reactor; and
  the same chunk through a real check process (`resync.checkpool`: a child
  Python process checks it, the events are built back from its answers).

Both run on one real, in-process HomeServer (SQLite, the real reactor) whose
database holds the signing keys of the fake servers, a spam-checker module
registered through the module API, and a room with a policy server. Federation
is closed to every server (`federation_domain_whitelist`), so nothing leaves
the machine: a key that is not in the database cannot be fetched, and a policy
server cannot be asked to sign.

For every event the two outcomes must be equal: dropped, or stored with the
same JSON (as sent, stripped of `unsigned` fields, or redacted) and the same
soft-failure flags.
"""

import copy
import json
from collections.abc import Iterator
from typing import Any

import attr
import pytest
import pytest_twisted
from signedjson.key import get_verify_key
from twisted.internet import defer, reactor, threads
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from synapse.api.room_versions import KNOWN_ROOM_VERSIONS, RoomVersion
from synapse.app.homeserver import SynapseHomeServer
from synapse.crypto.keyring import _FetchKeyRequest
from synapse.events import EventBase, make_event_from_dict
from synapse.events.utils import prune_event
from synapse.federation.federation_base import InvalidEventSignatureError, parse_events_from_pdu_json
from synapse.module_api import NOT_SPAM
from synapse.storage.keys import FetchKeyResult
from synapse.util.json import json_decoder

from synapse_fastjoin.resync.checkpool import CheckPool
from synapse_fastjoin.resync.checks import (
    KeyInfo,
    check_chunk,
    collect_worker_verdicts,
    raw_keys,
    run_spam_checks,
    wanted_key_ids,
)
from synapse_fastjoin.resync.stream import StateBodyReader
from tests.harness.inprocess import make_homeserver, shut_down
from tests.harness.fakehs.events import event_id as compute_event_id, finalise_event
from tests.harness.fakehs.keys import KEY_ID, server_keys_json, signing_key, verify_key_base64

JOINER = "joiner.test"
ORIGIN = "origin.test"
OTHER = "other.test"  # a second honest server in the room
EXPIRED = "expired.test"  # its only key expired before its events were sent
UNKNOWN = "unknown.test"  # we have no key of it and cannot fetch one
POLICY = "policy.test"  # the policy server of the policy room

BASE_TS = 1_700_000_000_000
NOW = BASE_TS + 10**9
RECEIVED = NOW + 5_000

# 10 and 12 (strict canonical JSON; 12 with MSC4291 room ids); 5 for the
# older rule, where floats and big integers are accepted as they parse.
ROOM_VERSIONS = ["10", "12", "5"]


# The HomeServer.


def _make_homeserver(data_dir: str) -> SynapseHomeServer:
    hs = make_homeserver(data_dir, JOINER)

    async def check_event_for_spam(event: EventBase) -> Any:
        if isinstance(event.content.get("body"), str) and "SPAM" in event.content["body"]:
            return "this is spam"
        return NOT_SPAM

    hs.get_module_api().register_spam_checker_callbacks(check_event_for_spam=check_event_for_spam)
    return hs


@pytest.fixture(scope="module")
def hs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseHomeServer]:
    made = _make_homeserver(str(tmp_path_factory.mktemp("parity-hs")))
    yield made
    shut_down(made)


async def _store_keys(hs: SynapseHomeServer) -> None:
    store = hs.get_datastores().main
    for server, valid_until in [
        (ORIGIN, NOW + 10**9),
        (OTHER, NOW + 10**9),
        (POLICY, NOW + 10**9),
        (EXPIRED, BASE_TS - 1),
    ]:
        await store.store_server_keys_response(
            server_name=server,
            from_server=server,
            ts_added_ms=BASE_TS,
            verify_keys={KEY_ID: FetchKeyResult(get_verify_key(signing_key(server)), valid_until)},
            response_json=server_keys_json(server, now_ms=valid_until - 7 * 24 * 3600 * 1000),
        )


# Events.


class Room:
    """A small room: its create event and the events hostile cases build on."""

    def __init__(self, version: str, name: str) -> None:
        self.version: RoomVersion = KNOWN_ROOM_VERSIONS[version]
        self.msc4291 = self.version.msc4291_room_ids_as_hashes
        self.ts = iter(range(BASE_TS, BASE_TS + 10**6))
        create: dict[str, Any] = {
            "type": "m.room.create",
            "state_key": "",
            "sender": f"@creator:{ORIGIN}",
            "content": {"room_version": version, "org.example.name": name},
            "depth": 1,
            "prev_events": [],
            "auth_events": [],
        }
        if not self.msc4291:
            create["content"]["creator"] = f"@creator:{ORIGIN}"
            create["room_id"] = f"!{name}:{ORIGIN}"
        self.create = self.sign(create, ORIGIN)
        self.create_id = compute_event_id(self.version, self.create)
        self.room_id = "!" + self.create_id[1:] if self.msc4291 else create["room_id"]
        self.events = [self.create]
        self.tip = self.create_id

    def sign(self, event: dict[str, Any], server: str) -> dict[str, Any]:
        event.setdefault("origin_server_ts", next(self.ts))
        finalise_event(self.version, event, server)
        return event

    def auth_events(self) -> list[str]:
        # MSC4291: the create event is implied, never listed.
        return [] if self.msc4291 else [self.create_id]

    def new(self, sender: str, event_type: str, content: dict[str, Any], state_key: str | None = None, **fields: Any) -> dict[str, Any]:
        """An unsigned event after the room's tip."""
        event: dict[str, Any] = {
            "type": event_type,
            "room_id": self.room_id,
            "sender": sender,
            "content": content,
            "depth": 2 + len(self.events),
            "prev_events": [self.tip],
            "auth_events": self.auth_events(),
            "origin_server_ts": next(self.ts),
        }
        if state_key is not None:
            event["state_key"] = state_key
        event.update(fields)
        return event

    def add(self, event: dict[str, Any]) -> dict[str, Any]:
        """Sign an event by its sender's server and make it the new tip."""
        self.sign(event, event["sender"].split(":", 1)[1])
        self.events.append(event)
        self.tip = compute_event_id(self.version, event)
        return event


async def _persist_room(hs: SynapseHomeServer, room: Room) -> None:
    """Store `room`'s events as the joiner's current state of it."""
    store = hs.get_datastores().main
    await store.store_room(room.room_id, f"@creator:{ORIGIN}", False, room.version)
    for raw in room.events:
        event = make_event_from_dict(copy.deepcopy(raw), room.version)
        context = await hs.get_state_handler().compute_event_context(event)
        await hs.get_storage_controllers().persistence.persist_event(event, context)


@attr.s(auto_attribs=True)
class Case:
    name: str
    body: bytes
    """The event as the resident sends it (JSON text, numbers as written)."""
    expect: str
    """What Synapse does with it, in words (checked against Synapse itself)."""


def _raw(event: dict[str, Any], **numbers: str) -> bytes:
    """`event` as JSON; each string value "<NAME>" of `numbers` replaced by the
    number text given (so a number can be written as 1.0 or 1e2 exactly)."""
    text = json.dumps(event, separators=(",", ":"), sort_keys=True)
    for placeholder, number in numbers.items():
        quoted = json.dumps(f"<{placeholder}>")
        assert quoted in text, placeholder
        text = text.replace(quoted, number)
    return text.encode()


def _cases(room: Room, policy_room: Room) -> list[Case]:
    cases: list[Case] = []
    alice, bob = f"@alice:{ORIGIN}", f"@bob:{OTHER}"

    def add(name: str, expect: str, event: dict[str, Any], **numbers: str) -> None:
        cases.append(Case(name, _raw(event, **numbers), expect))

    def signed(sender: str, event_type: str, content: dict[str, Any], state_key: str | None = None, **fields: Any) -> dict[str, Any]:
        event = room.new(sender, event_type, content, state_key, **fields)
        return room.sign(event, sender.split(":", 1)[1])

    def resigned(event: dict[str, Any], server: str) -> dict[str, Any]:
        event.pop("hashes", None)
        event.pop("signatures", None)
        return room.sign(event, server)

    add("good state event", "stored as sent", signed(alice, "m.room.topic", {"topic": "fine"}, ""))
    add("good message", "stored as sent", signed(bob, "m.room.message", {"body": "hello", "msgtype": "m.text"}))

    # unsigned: what a remote may set, and what it may not.
    for field, value in [
        ("prev_content", {"topic": "planted"}),
        ("replaces_state", "$planted"),
        ("m.relations", {"m.thread": {"count": 99}}),
        ("redacted_because", {"type": "m.room.redaction", "sender": alice}),
        ("age_ts", 1),
        ("transaction_id", "planted"),
    ]:
        event = signed(alice, "m.room.topic", {"topic": f"with {field}"}, "")
        event["unsigned"] = {field: value}
        add(f"planted unsigned.{field}", "stored stripped", event)
    event = signed(alice, "m.room.topic", {"topic": "with age"}, "")
    event["unsigned"] = {"age": 1234}
    add("unsigned.age", "stored stripped", event)
    event = signed(alice, "m.room.topic", {"topic": "with a float age"}, "")
    event["unsigned"] = {"age": "<AGE>"}
    add("unsigned.age as a float", "stored stripped", event, AGE="12.5")
    event = signed(alice, "m.room.topic", {"topic": "float in a stripped field"}, "")
    event["unsigned"] = {"prev_content": {"n": "<F>"}}
    add("float inside a stripped unsigned field", "stored stripped", event, F="1.5")
    event = signed(alice, "m.room.topic", {"topic": "unsigned not an object"}, "")
    event["unsigned"] = ["planted"]
    # Synapse's _strip_unsigned_values fails on it (it reads the non-object
    # after replacing it), so the event is refused.
    add("unsigned not an object", "dropped", event)
    invite_state = [{"type": "m.room.name", "state_key": "", "sender": alice, "content": {"name": "n"}}]
    event = signed(bob, "m.room.member", {"membership": "join"}, bob)
    event["unsigned"] = {"invite_room_state": invite_state, "prev_content": {"membership": "leave"}}
    add("member event: invite_room_state kept, prev_content stripped", "stored stripped", event)
    event = signed(bob, "m.room.member", {"membership": "join", "displayname": "B"}, bob)
    event["unsigned"] = {"invite_room_state": [{"n": "<F>"}]}
    add("float inside whitelisted invite_room_state", "dropped", event, F="2.5")

    # Numbers (strict canonical JSON in both room versions).
    for label, text in [("1.5", "1.5"), ("1.0", "1.0"), ("1e2", "1e2"), ("-0.0", "-0.0"), ("1E400", "1E400")]:
        event = signed(alice, "m.room.message", {"body": f"float {label}", "n": "<N>"})
        add(f"float {label} in content", "dropped", event, N=text)
    for label, text in [
        ("2^53", str(2**53)),
        ("-2^53", str(-(2**53))),
        ("2^64", str(2**64)),
        ("10^30", str(10**30)),
    ]:
        event = signed(alice, "m.room.message", {"body": f"int {label}", "n": "<N>"})
        add(f"integer {label} in content", "dropped", event, N=text)
    event = signed(alice, "m.room.message", {"body": "int 2^53-1", "n": 2**53 - 1, "m": -(2**53) + 1})
    add("integers +-(2^53-1) in content", "stored as sent", event)
    # A float in a signed field: the event is refused before its signature matters.
    event = room.new(alice, "m.room.message", {"body": "float ts"})
    event["origin_server_ts"] = "<TS>"
    room.sign(event, ORIGIN)
    add("float origin_server_ts", "dropped", event, TS=f"{BASE_TS}.0")

    # depth.
    for label, text in [
        ("a string", '"7"'),
        ("a float", "7.0"),
        ("true", "true"),
        ("negative", "-1"),
        ("2^53", str(2**53)),
        ("null", "null"),
    ]:
        event = room.new(alice, "m.room.message", {"body": f"depth {label}"})
        event["depth"] = "<D>"
        room.sign(event, ORIGIN)
        add(f"depth {label}", "dropped", event, D=text)
    event = room.new(alice, "m.room.message", {"body": "no depth"})
    del event["depth"]
    add("no depth", "dropped", room.sign(event, ORIGIN))
    event = room.new(alice, "m.room.message", {"body": "depth 0"}, depth=0)
    add("depth 0", "stored as sent", room.sign(event, ORIGIN))
    event = room.new(alice, "m.room.message", {"body": "max depth"}, depth=2**53 - 1)
    add("depth 2^53-1", "stored as sent", room.sign(event, ORIGIN))

    # Signatures, hashes, keys.
    event = signed(alice, "m.room.topic", {"topic": "forged"}, "")
    event["signatures"][ORIGIN][KEY_ID] = "A" * 86
    add("bad signature", "dropped", event)
    event = room.new(alice, "m.room.topic", {"topic": "signed by the wrong server"}, "")
    add("signed by another server than the sender's", "dropped", room.sign(event, OTHER))
    event = room.new(alice, "m.room.topic", {"topic": "not signed"}, "")
    room.sign(event, ORIGIN)
    event["signatures"] = {}
    add("no signatures", "dropped", event)
    event = signed(alice, "m.room.topic", {"topic": "original"}, "")
    event["content"]["topic"] = "tampered"
    add("content hash mismatch", "stored redacted", event)
    event = signed(alice, "m.room.message", {"body": "SPAM tampered"})
    event["content"]["extra"] = "x"
    add("content hash mismatch on spam (no spam check)", "stored redacted", event)
    add(
        "signed with a key that expired before the event",
        "dropped",
        signed(f"@e:{EXPIRED}", "m.room.message", {"body": "expired key"}),
    )
    add("signed with a key we cannot get", "dropped", signed(f"@u:{UNKNOWN}", "m.room.message", {"body": "unknown key"}))
    event = signed(alice, "m.room.member", {"membership": "join", "join_authorised_via_users_server": f"@admin:{OTHER}"}, alice)
    add(
        "restricted join not signed by the authorising server",
        "dropped" if room.version.restricted_join_rule else "stored as sent",
        event,
    )
    event = room.new(alice, "m.room.member", {"membership": "join", "join_authorised_via_users_server": f"@admin:{OTHER}"}, alice)
    room.sign(event, ORIGIN)
    other_sig = room.sign(copy.deepcopy(event) | {"signatures": {}}, OTHER)["signatures"]
    event["signatures"].update(other_sig)
    add("restricted join signed by both", "stored as sent", event)

    # Rooms.
    other_room = Room(room.version.identifier, "elsewhere")
    add("event of another room", "dropped", other_room.add(other_room.new(alice, "m.room.message", {"body": "elsewhere"})))
    event = room.new(alice, "m.room.message", {"body": "no room"})
    del event["room_id"]
    add("no room_id", "dropped", room.sign(event, ORIGIN))

    # Spam checker and policy server.
    add("spam", "stored redacted, soft-failed", signed(bob, "m.room.message", {"body": "SPAM SPAM", "msgtype": "m.text"}))
    refused = policy_room.new(alice, "m.room.message", {"body": "not signed by the policy server"})
    add("policy server: no signature (cannot ask it)", "stored as sent, soft-failed", policy_room.sign(refused, ORIGIN))
    allowed = policy_room.new(alice, "m.room.message", {"body": "signed by the policy server"})
    policy_room.sign(allowed, ORIGIN)
    allowed["signatures"][POLICY] = _policy_signature(policy_room, allowed)
    add("policy server: signed by its key", "stored as sent", allowed)
    both = policy_room.new(alice, "m.room.message", {"body": "SPAM, not signed by the policy server"})
    add("policy server refuses and spam", "stored redacted, soft-failed", policy_room.sign(both, ORIGIN))

    # The room version's own rules.
    if room.msc4291:
        event = room.new(alice, "m.room.topic", {"topic": "create in auth_events"}, "")
        event["auth_events"] = [room.create_id]
        add("MSC4291: create event listed in auth_events", "dropped", room.sign(event, ORIGIN))
        add("MSC4291: the room's create event", "stored as sent", copy.deepcopy(room.create))
        create = copy.deepcopy(room.create)
        create["room_id"] = room.room_id
        add("MSC4291: a create event with a room_id", "dropped", resigned(create, ORIGIN))
    else:
        event = room.new(alice, "m.room.topic", {"topic": "v10 lists the create event"}, "")
        add("create event listed in auth_events (pre-MSC4291)", "stored as sent", room.sign(event, ORIGIN))
        add("the room's create event", "stored as sent", copy.deepcopy(room.create))
    return cases


def _policy_signature(room: Room, event: dict[str, Any]) -> dict[str, str]:
    from signedjson.sign import sign_json

    from synapse.crypto.event_signing import redact_event_dict

    redacted = redact_event_dict(room.version, event)
    redacted.pop("signatures", None)
    redacted.pop("unsigned", None)
    key = signing_key(POLICY)
    original_version = key.version
    key.version = "policy_server"  # type: ignore[attr-defined]
    try:
        signed = sign_json(redacted, POLICY, key)
    finally:
        key.version = original_version  # type: ignore[attr-defined]
    return signed["signatures"][POLICY]


def _policy_room(version: str) -> Room:
    room = Room(version, f"policed-v{version}")
    creator = f"@creator:{ORIGIN}"
    room.add(room.new(creator, "m.room.member", {"membership": "join"}, creator))
    ps = f"@ps:{POLICY}"
    room.add(room.new(ps, "m.room.member", {"membership": "join"}, ps))
    room.add(
        room.new(
            creator,
            "m.room.policy",
            {"via": POLICY, "public_keys": {"ed25519": verify_key_base64(POLICY)}},
            "",
        )
    )
    return room


# The two paths.

DROPPED = ("dropped",)


def _outcome(event: EventBase) -> tuple:
    meta = event.internal_metadata
    return (
        "stored",
        # As text: a number must be what Synapse would store (a Decimal
        # left over from the stream parser would not even serialise).
        json.dumps(event.get_pdu_json(), sort_keys=True),
        bool(meta.is_soft_failed()),
        bool(meta.policy_server_spammy),
        bool(meta.spam_checker_spammy),
    )


def _describe(outcome: tuple, sent: dict[str, Any] | None, version: RoomVersion) -> str:
    if outcome == DROPPED:
        return "dropped"
    _, stored_text, soft_failed, _, _ = outcome
    stored = json.loads(stored_text)
    if sent is None:
        how = "stored"
    else:
        plain = {k: v for k, v in sent.items() if k != "unsigned"}
        stored_plain = {k: v for k, v in stored.items() if k != "unsigned"}
        if stored_plain == plain and (stored.get("unsigned") or {}) == (sent.get("unsigned") or {}):
            how = "stored as sent"
        elif stored_plain == plain:
            how = "stored stripped"
        elif stored_plain == {
            k: v
            for k, v in prune_event(make_event_from_dict(copy.deepcopy(plain), version)).get_pdu_json().items()
            if k != "unsigned"
        }:
            how = "stored redacted"
        else:
            how = "stored changed"
    return how + (", soft-failed" if soft_failed else "")


async def _synapse_path(hs: SynapseHomeServer, body: bytes, version: RoomVersion, room_id: str, received_time: int | None) -> tuple:
    try:
        pdu_json = json_decoder.decode(body.decode())
        pdus = parse_events_from_pdu_json([pdu_json], version, received_time=received_time)
    except Exception:
        return DROPPED
    if not pdus:
        return DROPPED
    (pdu,) = pdus
    if pdu.room_id != room_id:
        # federation_event: events of another room are never stored for this one.
        return DROPPED
    try:
        checked = await hs.get_federation_client()._check_sigs_and_hash(version, pdu)
    except InvalidEventSignatureError:
        return DROPPED
    return _outcome(checked)


async def _keys_for(hs: SynapseHomeServer, pdus: list[dict[str, Any]], version: RoomVersion) -> dict:
    """The keys the chunk's signers used, through Synapse's keyring, as the
    engine fetches them."""
    keyring = hs.get_keyring()
    wanted: dict[str, set[str]] = {}
    for pdu in pdus:
        for server, key_id in wanted_key_ids(pdu, version):
            wanted.setdefault(server, set()).add(key_id)
    keys = {}
    for server, key_ids in wanted.items():
        request = _FetchKeyRequest(server_name=server, minimum_valid_until_ts=0, key_ids=sorted(key_ids))
        try:
            found = await keyring._fetch_keys_queue.add_to_queue(request, key=server)
        except Exception:
            continue
        for key_id, result in found.get(server, {}).items():
            keys[(server, key_id)] = KeyInfo(result.verify_key, result.valid_until_ts)
    return keys


def _stream(bodies: list[bytes]) -> list[dict[str, Any]]:
    """The bodies as one /state response, read by the engine's stream parser."""
    chunks: list[list[dict[str, Any]]] = []

    def on_chunk(chunk: list[dict[str, Any]]) -> "defer.Deferred[None]":
        chunks.append(chunk)
        return defer.succeed(None)

    class Transport:
        def pauseProducing(self) -> None:  # noqa: N802
            pass

        resumeProducing = stopProducing = pauseProducing  # noqa: N815

    reader = StateBodyReader(on_chunk, reactor, chunk_size=1000, max_items=10_000)
    reader.makeConnection(Transport())
    body = b'{"pdus":[' + b",".join(bodies) + b'],"auth_chain":[]}'
    for i in range(0, len(body), 4096):
        reader.dataReceived(body[i : i + 4096])
    reader.connectionLost(Failure(ResponseDone()))
    assert reader.done.called and not isinstance(reader.done.result, Failure), "the body was refused"
    return [item for chunk in chunks for item in chunk]


def _lenient_id(body: bytes, version: RoomVersion) -> str | None:
    """The event id a resident would list in /state_ids for this event."""
    try:
        return make_event_from_dict(json_decoder.decode(body.decode()), version).event_id
    except Exception:
        return None


async def _in_check_process(pool: CheckPool, pdus: list[dict[str, Any]], version: RoomVersion, room_id: str,
                            promised: set[str], keys: dict, received_time: int | None) -> Any:
    for _ in range(600):
        if pool.ready():
            break
        await _sleep(0.05)
    assert pool.ready(), "the check process did not start"
    before = pool.requests
    verdicts = await pool.check(pdus, version.identifier, raw_keys(keys), received_time)
    assert pool.requests == before + 1
    return await threads.deferToThread(collect_worker_verdicts, verdicts, version, room_id, promised, promised)


def _sleep(seconds: float) -> "defer.Deferred[None]":
    d: "defer.Deferred[None]" = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def _our_path(hs: SynapseHomeServer, cases: list[Case], version: RoomVersion, room_ids: dict[str, str],
                    received_time: int | None, pool: CheckPool | None = None) -> list[tuple]:
    """Every case through the engine's checks, one chunk per room (in a check
    process if `pool` is given, else in a thread)."""
    outcomes: dict[int, tuple] = {}
    for room_id in dict.fromkeys(room_ids.values()):
        indexes = [i for i, c in enumerate(cases) if room_ids[c.name] == room_id]
        pdus = _stream([cases[i].body for i in indexes])
        assert len(pdus) == len(indexes)
        ids = {i: _lenient_id(cases[i].body, version) for i in indexes}
        promised = {e for e in ids.values() if e is not None}
        keys = await _keys_for(hs, pdus, version)
        if pool is not None:
            result = await _in_check_process(pool, pdus, version, room_id, promised, keys, received_time)
        else:
            result = await threads.deferToThread(
                check_chunk, pdus, version, room_id, promised, promised, keys, received_time
            )
        await run_spam_checks(hs, result)
        by_id = {event.event_id: event for event in result.accepted}
        assert len(by_id) == len(result.accepted)
        for i in indexes:
            event = by_id.pop(ids[i], None) if ids[i] is not None else None
            outcomes[i] = DROPPED if event is None else _outcome(event)
        assert not by_id, "accepted events that were not sent"
    return [outcomes[i] for i in range(len(cases))]


# The test.

_prepared: dict[str, tuple[Room, Room]] = {}


async def _world(hs: SynapseHomeServer, version: str) -> tuple[Room, Room]:
    if not _prepared:
        await _store_keys(hs)
    if version not in _prepared:
        room = Room(version, f"hostile-v{version}")
        policy_room = _policy_room(version)
        await _persist_room(hs, policy_room)
        _prepared[version] = (room, policy_room)
    return _prepared[version]


@pytest.fixture(scope="module")
def check_pool() -> Any:
    pool = CheckPool(reactor, 1)
    pool.warm_up()
    yield pool
    pool.stop()


@pytest.mark.parametrize("where", ["thread", "process"])
@pytest.mark.parametrize("received_time", [None, RECEIVED], ids=["pulled", "with-received-time"])
@pytest.mark.parametrize("version", ROOM_VERSIONS, ids=[f"v{v}" for v in ROOM_VERSIONS])
@pytest_twisted.ensureDeferred
async def test_every_hostile_event_gets_synapse_s_outcome(
    hs: SynapseHomeServer, check_pool: CheckPool, version: str, received_time: int | None, where: str
) -> None:
    room, policy_room = await _world(hs, version)
    rv = KNOWN_ROOM_VERSIONS[version]
    cases = _cases(room, policy_room)
    room_ids = {c.name: (policy_room.room_id if c.name.startswith("policy") else room.room_id) for c in cases}
    assert len(room_ids) == len(cases), "case names must be unique"

    theirs = [await _synapse_path(hs, c.body, rv, room_ids[c.name], received_time) for c in cases]
    ours = await _our_path(hs, cases, rv, room_ids, received_time, check_pool if where == "process" else None)

    table = []
    for case, t, o in zip(cases, theirs, ours):
        try:
            sent = json_decoder.decode(case.body.decode())
        except Exception:
            sent = None
        table.append((case.name, _describe(t, sent, rv), _describe(o, sent, rv), case.expect))
    report = "\n".join(f"{n:60} synapse: {t:32} ours: {o:32} ({e})" for n, t, o, e in table)
    print(f"\nroom version {version}, received_time={received_time}\n{report}")
    mismatched = [case.name for case, t, o in zip(cases, theirs, ours) if t != o]
    assert not mismatched, f"outcomes differ for {mismatched}:\n{report}"
    # The cases are what they say they are: Synapse's verdict, in words.
    wrong = [
        (name, t, expect)
        for name, t, _, expect in table
        # Without strict canonical JSON, numbers are Synapse's to judge (the
        # parity above still holds for them).
        if t != expect and (rv.strict_canonicaljson or not name.startswith(("float", "integer", "unsigned.age as")))
    ]
    assert not wrong, wrong
