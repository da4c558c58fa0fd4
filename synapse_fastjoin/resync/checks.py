"""Signature, hash and identity checks of fetched events, run in worker threads.

Everything here is plain CPU work on data the caller hands over (the raw event
dicts and the signing keys it has already fetched), so it can run off the
reactor thread. ed25519 verification (libsodium through PyNaCl) and hashing
release the GIL, so two worker threads overlap with each other and with the
reactor.

The checks are those Synapse applies to every event it pulls over federation
(`federation_base._check_sigs_and_hash`): the event must be signed by its
sender's server (and, for a restricted join, by the server that authorised it)
with a key valid at the event's timestamp where the room version demands it;
an event whose content hash does not match is redacted, not dropped. On top of
that, an event is only accepted if its id is one the resident promised in
`/state_ids`: a hostile server cannot make us store anything else.

Before any of that, each raw dict goes through what Synapse does to a PDU it
receives over federation (`federation_base.event_from_pdu_json`, and the depth
filter of `federation.units.filter_pdus_for_valid_depth` that comes before it
on the `/event` and `/backfill` paths): `unsigned` is cut down to what a remote
server may set, `depth` must be an integer in range, the room version's own
rules apply (strict canonical JSON; MSC4291 rooms: no create event in
`auth_events`). Synapse's own code is called for this, not a copy of it, so the
outcome for every event is the one Synapse's federation path gives.

Numbers: Synapse parses federation JSON with the standard library (`/send`,
`/event`): a number with a fraction or an exponent becomes a float and an
integer of any size an int, and in room versions with strict canonical JSON
both a float and an integer out of range get the event refused. The streamed
`/state` parser (`resync.stream`) uses the same decoder with the same
settings, so the events reach these checks as Synapse's own paths would have
them. (`parse_pdu` still turns any `Decimal` it is given into the float the
standard library would have made, for callers that parse otherwise.)

What needs the reactor (the spam checker's and the policy server's verdicts,
which Synapse asks for in `FederationBase._check_sigs_and_hash` right after the
content hash) is `run_spam_checks`, to be awaited on the reactor thread with
the result of `check_chunk`.
"""

import logging
from decimal import Decimal
from typing import TYPE_CHECKING, AbstractSet, Any, Mapping, NamedTuple

import attr
from signedjson.sign import SignatureVerifyException, verify_signed_json

from synapse.api.constants import CANONICALJSON_MAX_INT, CANONICALJSON_MIN_INT, EventTypes, Membership
from synapse.api.errors import AuthError, EventSizeError
from synapse.api.room_versions import EventFormatVersions, RoomVersion
from synapse.crypto.event_signing import check_event_content_hash
from synapse.event_auth import validate_event_for_room_version
from synapse.events import EventBase, make_event_from_json
from synapse.events.utils import prune_event
from synapse.federation.federation_base import event_from_pdu_json
from synapse.types import get_domain_from_id

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)


class KeyInfo(NamedTuple):
    """A server's verify key as the keyring returned it."""

    verify_key: Any  # signedjson VerifyKey
    valid_until_ts: int


# Reasons starting with this are about our keys, not the event.
_KEY_PROBLEM = "key unavailable"

KeyMap = Mapping[tuple[str, str], KeyInfo]
"""(server name, key id) -> key."""


@attr.s(slots=True, auto_attribs=True)
class CheckResult:
    """What became of one chunk of raw events."""

    accepted: list[EventBase] = attr.Factory(list)
    """Events that passed; those with a bad content hash are already redacted."""

    redacted: int = 0
    """How many of `accepted` were redacted for a content hash mismatch."""

    unwanted: int = 0
    """Events not promised by /state_ids (or for another room, or duplicates)."""

    already_stored: int = 0
    """Promised events we have already (e.g. from an earlier, cut-off round)."""

    bad_signature: list[tuple[str, str]] = attr.Factory(list)
    """(event id, reason) of events whose signatures did not verify."""

    missing_key: list[tuple[str, str]] = attr.Factory(list)
    """(event id, reason) of events we could not check for want of a usable key
    (not fetched yet, or expired): to be tried again, never taken as forged."""

    malformed: int = 0
    """Items that are not valid PDUs of this room version (what Synapse's
    `event_from_pdu_json` refuses: bad or missing depth, floats or integers
    out of range under strict canonical JSON, the create event in an MSC4291
    room's auth_events, anything that is not an event at all)."""

    malformed_reasons: list[str] = attr.Factory(list)
    """Why, for the first few of `malformed` (for the logs)."""

    hash_redacted: set[str] = attr.Factory(set)
    """Ids of the events of `accepted` redacted for a content hash mismatch:
    Synapse asks neither the policy server nor the spam checker about those."""

    validated: dict[str, "Validation"] = attr.Factory(dict)
    """For events of `accepted` checked in a check process: the outcome of
    Synapse's `validate_event_for_room_version` on the event as accepted (the
    first step of its auth checks, a pure function of the event), computed
    there so the parent need not encode every event once more to measure
    it (`raise_validation`)."""

    policy_refused: int = 0
    """Set by `run_spam_checks`: events the room's policy server did not
    allow (kept, soft-failed, as Synapse keeps them)."""

    spam: int = 0
    """Set by `run_spam_checks`: events a spam checker called spam (kept
    redacted and soft-failed, as Synapse keeps them)."""

    def _malformed(self, reason: str) -> None:
        self.malformed += 1
        if len(self.malformed_reasons) < 5:
            self.malformed_reasons.append(reason)


def signing_servers(pdu: Mapping[str, Any], room_version: RoomVersion) -> set[str]:
    """The servers whose signatures an event needs, from its raw dict.

    Raises:
        ValueError: the dict lacks what is needed to tell (a malformed event).
    """
    sender = pdu.get("sender")
    if not isinstance(sender, str) or ":" not in sender:
        raise ValueError("event has no valid sender")
    servers = {get_domain_from_id(sender)}
    if _is_invite_via_3pid(pdu):
        # Signed by the identity server's key, which the auth rules check.
        servers.clear()
    if room_version.event_format == EventFormatVersions.ROOM_V1_V2:
        event_id = pdu.get("event_id")
        if not isinstance(event_id, str) or ":" not in event_id:
            raise ValueError("event has no valid event_id")
        servers.add(get_domain_from_id(event_id))
    content = pdu.get("content")
    if (
        room_version.restricted_join_rule
        and pdu.get("type") == EventTypes.Member
        and isinstance(content, Mapping)
        and content.get("membership") == Membership.JOIN
        and "join_authorised_via_users_server" in content
    ):
        authoriser = content["join_authorised_via_users_server"]
        if not isinstance(authoriser, str) or ":" not in authoriser:
            raise ValueError("join_authorised_via_users_server is not a user id")
        servers.add(get_domain_from_id(authoriser))
    return servers


def _is_invite_via_3pid(pdu: Mapping[str, Any]) -> bool:
    content = pdu.get("content")
    return (
        pdu.get("type") == EventTypes.Member
        and isinstance(content, Mapping)
        and content.get("membership") == Membership.INVITE
        and "third_party_invite" in content
    )


def wanted_key_ids(pdu: Mapping[str, Any], room_version: RoomVersion) -> set[tuple[str, str]]:
    """The (server, key id) pairs an event's signatures could be checked with."""
    signatures = pdu.get("signatures")
    if not isinstance(signatures, Mapping):
        return set()
    found = set()
    try:
        servers = signing_servers(pdu, room_version)
    except ValueError:
        return set()
    for server in servers:
        sigs = signatures.get(server)
        if isinstance(sigs, Mapping):
            found.update((server, key_id) for key_id in sigs if isinstance(key_id, str))
    return found


def check_chunk(
    pdus: list[dict[str, Any]],
    room_version: RoomVersion,
    room_id: str,
    promised: AbstractSet[str],
    missing: AbstractSet[str],
    keys: KeyMap,
    received_time: int | None = None,
) -> CheckResult:
    """Check a chunk of raw events. Runs in a worker thread.

    The dicts are changed in place (Synapse's `event_from_pdu_json` strips
    their `unsigned`); the caller must not use them afterwards.

    Args:
        pdus: raw event dicts as received.
        room_version: the room's version.
        room_id: the room they must belong to.
        promised: the event ids /state_ids listed; anything else is counted in
            `unwanted` and dropped.
        missing: those of them not stored yet; the others are skipped unchecked.
        keys: every key the caller could fetch for the chunk's signers.
        received_time: as for Synapse's `event_from_pdu_json`: when the events
            were received (ms), to turn an `unsigned.age` into `age_ts`; with
            None (what Synapse does for events it pulls with `/event` or
            `/backfill`), `age` is dropped.

    Returns:
        What became of the chunk. Events in `accepted` still have to go
        through `run_spam_checks` on the reactor thread.
    """
    result = CheckResult()
    seen: set[str] = set()
    for pdu in pdus:
        try:
            event = parse_pdu(pdu, room_version, received_time)
            event_id = event.event_id
        except Exception as e:
            result._malformed(f"{type(e).__name__}: {e}")
            continue
        if not _admit(result, seen, event_id, event.room_id, room_id, promised, missing):
            continue
        _take(result, event, *_verdict(pdu, event, room_version, keys))
    return result


def _admit(
    result: CheckResult,
    seen: set[str],
    event_id: str,
    event_room_id: str | None,
    room_id: str,
    promised: AbstractSet[str],
    missing: AbstractSet[str],
) -> bool:
    """Whether an event is one to check: promised, of this room, the first of
    its id, and not stored yet (else counted in `result`)."""
    if event_id not in promised or event_id in seen or event_room_id != room_id:
        result.unwanted += 1
        return False
    seen.add(event_id)
    if event_id not in missing:
        result.already_stored += 1
        return False
    return True


# What `_verdict` says of one event.
_OK = "ok"
_HASH_MISMATCH = "hash"
_BAD_SIGNATURE = "bad_signature"
_MISSING_KEY = "missing_key"
_MALFORMED = "malformed"


def _verdict(pdu: Mapping[str, Any], event: EventBase, room_version: RoomVersion, keys: KeyMap) -> tuple[str, str | None]:
    """Signatures, then the content hash, of one parsed event: (verdict, reason)."""
    reason = _check_signatures(pdu, event, room_version, keys)
    if reason is not None:
        return (_MISSING_KEY if reason.startswith(_KEY_PROBLEM) else _BAD_SIGNATURE), reason
    if not check_event_content_hash(event):
        return _HASH_MISMATCH, None
    return _OK, None


def _take(result: CheckResult, event: EventBase, verdict: str, reason: str | None) -> None:
    """Record one promised, missing event's verdict in `result`."""
    if verdict == _MISSING_KEY:
        result.missing_key.append((event.event_id, reason or ""))
    elif verdict == _BAD_SIGNATURE:
        result.bad_signature.append((event.event_id, reason or ""))
    elif verdict == _HASH_MISMATCH:
        # Synapse keeps an event whose content hash does not match, redacted.
        result.redacted += 1
        result.hash_redacted.add(event.event_id)
        result.accepted.append(prune_event(event))
    else:
        result.accepted.append(event)


# The same checks in a separate process (`resync.checkpool`): the worker parses
# and checks every item without knowing which ids were promised, and hands
# back each verdict with the event's canonical JSON, from which the parent
# builds the very event `event_from_pdu_json` would have built.

Validation = tuple[str, bool, str] | None
"""None (valid), or ("size", unpersistable, message) for an EventSizeError,
or ("auth", False, message) for an AuthError."""


def validation_of(event: EventBase) -> Validation:
    """What Synapse's `validate_event_for_room_version` says of `event`."""
    try:
        validate_event_for_room_version(event)
    except EventSizeError as e:
        return ("size", e.unpersistable, e.msg)
    except AuthError as e:
        return ("auth", False, e.msg)
    return None


def raise_validation(outcome: Validation) -> None:
    """Raise what `validate_event_for_room_version` raised for `outcome`."""
    if outcome is None:
        return
    kind, unpersistable, message = outcome
    if kind == "size":
        raise EventSizeError(message, unpersistable=unpersistable)
    raise AuthError(403, message)


RawKeys = Mapping[tuple[str, str], tuple[bytes, int]]
"""(server, key id) -> (ed25519 verify key bytes, valid until ts): keys in a
form that crosses a process boundary."""

WorkerVerdict = tuple[str, "str | None", "str | None", "str | None", "str | None", Validation]
"""(verdict, event id, room id, reason, canonical JSON of the event, the
event's `Validation` as it will be stored: redacted for a hash mismatch)."""


def raw_keys(keys: KeyMap) -> dict[tuple[str, str], tuple[bytes, int]]:
    return {k: (bytes(v.verify_key), v.valid_until_ts) for k, v in keys.items()}


_decoded_keys: dict[tuple[str, str, bytes], Any] = {}


def _keys_from_raw(keys: RawKeys) -> dict[tuple[str, str], KeyInfo]:
    from signedjson.key import decode_verify_key_bytes

    out = {}
    for (server, key_id), (key_bytes, valid_until) in keys.items():
        cache_key = (server, key_id, key_bytes)
        verify_key = _decoded_keys.get(cache_key)
        if verify_key is None:
            verify_key = _decoded_keys[cache_key] = decode_verify_key_bytes(key_id, key_bytes)
        out[(server, key_id)] = KeyInfo(verify_key, valid_until)
    return out


def check_pdus_in_worker(
    pdus: list[Any], room_version_id: str, keys: RawKeys, received_time: int | None
) -> list[WorkerVerdict]:
    """Runs in a check process: the verdict on every item, in order."""
    from canonicaljson import encode_canonical_json
    from synapse.api.room_versions import KNOWN_ROOM_VERSIONS

    room_version = KNOWN_ROOM_VERSIONS[room_version_id]
    key_map = _keys_from_raw(keys)
    out: list[WorkerVerdict] = []
    for pdu in pdus:
        try:
            event = parse_pdu(pdu, room_version, received_time)
            event_id = event.event_id
            room_id = event.room_id
        except Exception as e:
            out.append((_MALFORMED, None, None, f"{type(e).__name__}: {e}", None, None))
            continue
        verdict, reason = _verdict(pdu, event, room_version, key_map)
        event_json = None
        validation: Validation = None
        if verdict in (_OK, _HASH_MISMATCH):
            # What `make_event_from_dict` builds the event from (the PDU as
            # `event_from_pdu_json` left it).
            event_json = encode_canonical_json(pdu).decode("utf-8")
            validation = validation_of(event if verdict == _OK else prune_event(event))
        out.append((verdict, event_id, room_id, reason, event_json, validation))
    return out


def collect_worker_verdicts(
    verdicts: list[WorkerVerdict],
    room_version: RoomVersion,
    room_id: str,
    promised: AbstractSet[str],
    missing: AbstractSet[str],
) -> CheckResult:
    """The `CheckResult` `check_chunk` gives for the same items, from a check
    process's verdicts. Runs in a worker thread of the parent."""
    result = CheckResult()
    seen: set[str] = set()
    for verdict, event_id, event_room_id, reason, event_json, validation in verdicts:
        if verdict == _MALFORMED or event_id is None:
            result._malformed(reason or "malformed")
            continue
        if not _admit(result, seen, event_id, event_room_id, room_id, promised, missing):
            continue
        if event_json is None:
            # Refused by the signature check: nothing to build.
            bucket = result.missing_key if verdict == _MISSING_KEY else result.bad_signature
            bucket.append((event_id, reason or ""))
            continue
        event = make_event_from_json(event_json, room_version)
        if event.event_id != event_id:
            # The parent must never store something the worker did not check.
            raise AssertionError(f"check process and parent disagree on {event_id}")
        _take(result, event, verdict, reason)
        result.validated[event_id] = validation
    return result


def parse_pdu(pdu: Any, room_version: RoomVersion, received_time: int | None = None) -> EventBase:
    """Build an event from a PDU received over federation, exactly as Synapse
    does on its `/event` and `/backfill` paths (the depth filter, then
    `event_from_pdu_json`), after turning the stream parser's `Decimal`s into
    the floats the standard library's JSON parser gives.

    Changes `pdu` in place.

    Raises:
        Exception: the PDU is not valid for this room version (Synapse drops it).
    """
    if not isinstance(pdu, dict):
        raise ValueError("not a JSON object")
    if not room_version.strict_canonicaljson:
        # Under strict canonical JSON a Decimal is refused just as a float
        # would be; only the older room versions take floats.
        _decimals_to_floats(pdu)
    # `filter_pdus_for_valid_depth`: an event whose depth is missing or out of
    # canonical JSON's integer range is dropped before anything else (a depth
    # that cannot be compared makes Synapse's whole request fail).
    if "depth" not in pdu or not CANONICALJSON_MIN_INT <= pdu["depth"] <= CANONICALJSON_MAX_INT:
        raise ValueError(f"depth {pdu.get('depth')!r} missing or out of range")
    return event_from_pdu_json(pdu, room_version, received_time=received_time)


def _decimals_to_floats(value: Any) -> Any:
    """Replace, in place, every Decimal in a parsed JSON value by the float the
    standard library's parser would have made of the same text; returns the
    new value for a bare Decimal."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (Decimal, dict, list)):
                value[k] = _decimals_to_floats(v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, (Decimal, dict, list)):
                value[i] = _decimals_to_floats(v)
    return value


async def run_spam_checks(hs: "HomeServer", result: CheckResult) -> None:
    """The rest of Synapse's `FederationBase._check_sigs_and_hash` for the
    events `check_chunk` accepted: the room's policy server, then the spam
    checkers. Runs on the reactor thread (both may do I/O).

    As in Synapse, an event redacted for its content hash is asked about by
    neither; an event the policy server does not allow is soft-failed (and
    marked `policy_server_spammy`) but kept whole; an event a spam checker
    calls spam is redacted and soft-failed (and marked
    `spam_checker_spammy`). `result.accepted` is updated in place.

    The room's policy server is looked up once per call rather than once per
    event: with none configured (nearly every room), Synapse's per-event
    answer is "allowed" for every event, so nothing is asked.
    """
    if not result.accepted:
        return
    spam_checker = hs.get_module_api_callbacks().spam_checker
    policy_handler = hs.get_room_policy_handler()
    ask_spam_checker = bool(spam_checker._check_event_for_spam_callbacks)
    room_ids = {event.room_id for event in result.accepted}
    with_policy_server = {
        room_id for room_id in room_ids if await policy_handler._get_policy_server(room_id) is not None
    }
    if not ask_spam_checker and not with_policy_server:
        return
    for i, event in enumerate(result.accepted):
        if event.event_id in result.hash_redacted:
            continue
        if event.room_id in with_policy_server and not await policy_handler.is_event_allowed(event):
            logger.warning("Event not allowed by policy server, soft-failing %s", event.event_id)
            event.internal_metadata.soft_failed = True
            event.internal_metadata.policy_server_spammy = True
            result.policy_refused += 1
        if not ask_spam_checker:
            continue
        verdict = await spam_checker.check_event_for_spam(event)
        if verdict != spam_checker.NOT_SPAM:
            logger.warning("Event contains spam, soft-failing %s", event.event_id)
            redacted = prune_event(event)
            # Validated as it was, not as it is now: the auth checks redo it.
            result.validated.pop(event.event_id, None)
            redacted.internal_metadata.soft_failed = True
            redacted.internal_metadata.spam_checker_spammy = True
            result.accepted[i] = redacted
            result.spam += 1


def _check_signatures(
    pdu: Mapping[str, Any], event: EventBase, room_version: RoomVersion, keys: KeyMap
) -> str | None:
    """None if every required server signed the event with a usable key,
    else why not."""
    try:
        servers = signing_servers(pdu, room_version)
    except ValueError as e:
        return str(e)
    minimum_valid_until = event.origin_server_ts if room_version.enforce_key_validity else 0
    redacted: dict[str, Any] | None = None
    signatures = pdu.get("signatures")
    if not isinstance(signatures, Mapping):
        return "the event has no signatures"
    for server in servers:
        sigs = signatures.get(server)
        if not isinstance(sigs, Mapping) or not sigs:
            return f"not signed by {server}"
        verified = False
        last_error = f"{_KEY_PROBLEM}: no usable key of {server}"
        for key_id in sigs:
            key = keys.get((server, key_id))
            if key is None:
                continue
            if key.valid_until_ts < minimum_valid_until:
                last_error = f"{_KEY_PROBLEM}: key {server} {key_id} expired before the event"
                continue
            if redacted is None:
                redacted = prune_event(event).get_pdu_json()
            try:
                verify_signed_json(redacted, server, key.verify_key)
            except SignatureVerifyException as e:
                last_error = f"bad signature by {server} {key_id}: {e}"
                continue
            verified = True
            break
        if not verified:
            return last_error
    return None
