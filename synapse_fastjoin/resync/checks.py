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
"""

import logging
from typing import AbstractSet, Any, Mapping, NamedTuple

import attr
from signedjson.sign import SignatureVerifyException, verify_signed_json

from synapse.api.constants import EventTypes, Membership
from synapse.api.room_versions import EventFormatVersions, RoomVersion
from synapse.crypto.event_signing import check_event_content_hash
from synapse.events import EventBase, make_event_from_dict
from synapse.events.utils import prune_event
from synapse.types import get_domain_from_id

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
    """Items that could not be parsed as events of this room version."""


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
) -> CheckResult:
    """Check a chunk of raw events. Runs in a worker thread.

    Args:
        pdus: raw event dicts as received.
        room_version: the room's version.
        room_id: the room they must belong to.
        promised: the event ids /state_ids listed; anything else is counted in
            `unwanted` and dropped.
        missing: those of them not stored yet; the others are skipped unchecked.
        keys: every key the caller could fetch for the chunk's signers.
    """
    result = CheckResult()
    seen: set[str] = set()
    for pdu in pdus:
        try:
            event = make_event_from_dict(pdu, room_version)
            event_id = event.event_id
        except Exception:
            result.malformed += 1
            continue
        if event_id not in promised or event_id in seen or event.room_id != room_id:
            result.unwanted += 1
            continue
        seen.add(event_id)
        if event_id not in missing:
            result.already_stored += 1
            continue
        reason = _check_signatures(pdu, event, room_version, keys)
        if reason is not None:
            if reason.startswith(_KEY_PROBLEM):
                result.missing_key.append((event_id, reason))
            else:
                result.bad_signature.append((event_id, reason))
            continue
        if not check_event_content_hash(event):
            event = prune_event(event)
            result.redacted += 1
        result.accepted.append(event)
    return result


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
