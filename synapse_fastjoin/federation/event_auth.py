# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Auth chains of inbound events from their servers (`/event_auth`), with
the copies of events we already hold left unchecked.

While a room is partial, most inbound events name an auth event we do not
hold (the sender's membership), and Synapse's `_check_event_auth` fetches
the event's whole auth chain from the server that sent it
(`FederationClient.get_event_auth`): it parses every event of the answer
(`parse_events_from_pdu_json`), checks the signatures and hashes of every
one (`_check_sigs_and_hash_for_pulled_events_and_fetch`), then persists the
ones it does not hold (`_auth_and_persist_outliers`, which drops every event
already stored). An answer is some two dozen events, of which all but the
sender's membership history (the create event, power levels, join rules)
are usually stored already: their checks decide nothing.

`fetch_auth_chains` does what `get_event_auth` does for several events, but
gives an event of an answer to the checks only when we do not hold exactly
that event: when no stored event has its id, or when the stored one differs
from the copy received in anything but `unsigned` (compared value for value
and type for type, so `true` is not `1` and `1.0` is not `1`). An event left
out is one `_auth_and_persist_outliers` would drop as stored, whatever its
checks would have said: on a failed signature check Synapse falls back to
the stored copy, which is dropped as stored too. So what is persisted is
the same in every case. The checks themselves would have passed (the stored
event is the same JSON, signatures and hashes included, `unsigned` being
covered by neither, and it passed them when it was stored, or we signed it)
unless the signing keys changed since: a later key fetch recorded a shorter
validity, or the key can no longer be had. Only then would Synapse's path
write one row we do not: a failed pull attempt (`event_failed_pull_attempts`)
for an event we already hold, after a key request of its own. A copy that
differs in any way is checked as before, its failure row written as Synapse
writes it.

Every event of an answer is still parsed (a malformed one fails the whole
answer, as in Synapse). What is saved: the signature verification, two
canonical encodings and a content hash per stored event, and the spam
checker and policy-server calls Synapse makes for each; in a partial-state
room that was some twenty of every answer's two dozen events.

The answers of one call share most of their events (the create event, the
power levels, the join rules), each a copy of its own. A copy is parsed
once per call for each distinct *received text*: the key is the copy as
received, encoded again with the key order kept (so two keys are equal only
for the same values of the same JSON types in the same order), and a copy
with a key seen before in the call takes that parse's outcome, and the
verdict held-or-not of its first comparison with the stored event. A copy
that is not held is given to the checks as a parse of its own, from the
key's text, as if parsed from the answer: each answer's checks see their
own instances, as in Synapse. Measured on a 50,000-member resync with 50
live events a second (SQLite, py-spy): the parses and comparisons of the
answers took some 6 of the reactor's 68 busy seconds; an encoding costs
about a sixth of a parse and comparison.
`tests/unit/test_event_auth_fetch.py` hands the same answers, hostile
copies included, to Synapse's path and to this one, and compares what
each persists and the failure rows each writes.
"""

import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from synapse.api.errors import RequestSendFailed
from synapse.api.room_versions import RoomVersion
from synapse.events import EventBase
from synapse.federation.federation_base import event_from_pdu_json
from synapse.federation.units import filter_pdus_for_valid_depth
from synapse.storage.databases.main.events_worker import EventRedactBehaviour
from synapse.util.async_helpers import concurrently_execute
from synapse.util.json import json_decoder

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)


def same_json(a: Any, b: Any) -> bool:
    """Whether two JSON values are the same, type for type (Python's `==`
    takes `True` for `1` and `1.0` for `1`; canonical JSON does not)."""
    if isinstance(a, Mapping):
        if not isinstance(b, Mapping) or len(a) != len(b):
            return False
        for key, value in a.items():
            if key not in b or not same_json(value, b[key]):
                return False
        return True
    if isinstance(a, (str, bytes)) or isinstance(b, (str, bytes)):
        return type(a) is type(b) and a == b
    if isinstance(a, Sequence):
        if not isinstance(b, Sequence) or len(a) != len(b):
            return False
        return all(same_json(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def held_as_received(stored: EventBase | None, received: EventBase) -> bool:
    """Whether `stored` is the event `received` is a copy of, byte for byte
    but for `unsigned`."""
    if stored is None:
        return False
    ours = stored.get_dict()
    theirs = received.get_dict()
    ours.pop("unsigned", None)
    theirs.pop("unsigned", None)
    return same_json(ours, theirs)


def received_key(pdu: Any) -> str | None:
    """The text that names a received copy within one call: its JSON
    encoded again, key order kept (None if it cannot be encoded: then the
    copy is parsed on its own)."""
    try:
        return json.dumps(pdu, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return None


class _Parses:
    """The copies of one call's answers, parsed once per received text and
    compared once with the stored event (module docstring)."""

    def __init__(self, room_version: RoomVersion) -> None:
        self._room_version = room_version
        self._parsed: dict[str, EventBase] = {}
        self._held: dict[str, bool] = {}
        self._handed_out: set[str] = set()

    def parse_answer(self, auth_chain: Any) -> list[tuple[str | None, EventBase]]:
        """What `parse_events_from_pdu_json` gives for the answer, each event
        with its key. Raises as it raises (the answer fails whole)."""
        parsed: list[tuple[str | None, EventBase]] = []
        for pdu in filter_pdus_for_valid_depth(auth_chain):
            key = received_key(pdu)
            ev = self._parsed.get(key) if key is not None else None
            if ev is None:
                ev = event_from_pdu_json(pdu, self._room_version)
                if key is not None:
                    self._parsed[key] = ev
            parsed.append((key, ev))
        return parsed

    def held(self, key: str | None, stored: EventBase | None, received: EventBase) -> bool:
        """`held_as_received(stored, received)`, once per key."""
        if key is None:
            return held_as_received(stored, received)
        verdict = self._held.get(key)
        if verdict is None:
            verdict = self._held[key] = held_as_received(stored, received)
        return verdict

    def to_check(self, key: str | None, ev: EventBase) -> EventBase:
        """The instance to give to the checks: the parse itself the first
        time, a parse of its own from the received text after that."""
        if key is None:
            return ev
        if key not in self._handed_out:
            self._handed_out.add(key)
            return ev
        return event_from_pdu_json(json_decoder.decode(key), self._room_version)


class AuthChainFetch:
    """What one call of `fetch_auth_chains` did (for the logs and tests)."""

    def __init__(self) -> None:
        self.received = 0
        """Events in the answers."""
        self.checked = 0
        """Of them, given to Synapse's signature and hash checks."""


async def fetch_auth_chains(
    hs: "HomeServer",
    room_id: str,
    wanted: Sequence[tuple[str, str]],
    concurrency: int,
    stats: AuthChainFetch | None = None,
) -> dict[str, list[EventBase]]:
    """For each `(origin, event_id)` of `wanted`, the event's auth chain as
    `origin` answers `/event_auth`, checked as
    `FederationClient.get_event_auth` checks it, without the events we hold
    exactly as received (module docstring). An event whose request or
    answer fails is left out of the result (logged as Synapse's callers log
    it)."""
    federation_client = hs.get_federation_client()
    transport = federation_client.transport_layer
    store = hs.get_datastores().main
    room_version = await store.get_room_version(room_id)
    stats = stats if stats is not None else AuthChainFetch()
    answers: dict[str, tuple[str, list[tuple[str | None, EventBase]]]] = {}
    parses = _Parses(room_version)

    async def request(item: tuple[str, str]) -> None:
        origin, event_id = item
        try:
            res = await transport.get_event_auth(origin, room_id, event_id)
            answers[event_id] = (origin, parses.parse_answer(res["auth_chain"]))
        except RequestSendFailed as e:
            logger.info("Failed to get event auth from %s: %s", origin, e)
        except Exception as e:
            logger.warning("Failed to get auth chain for %s: %s", event_id, e)

    await concurrently_execute(request, wanted, concurrency)
    ids = {ev.event_id for _, chain in answers.values() for _, ev in chain}
    try:
        stored = await store.get_events(ids, redact_behaviour=EventRedactBehaviour.as_is, allow_rejected=True)
    except Exception as e:
        # Then every event is checked, as Synapse's path checks them.
        logger.warning("Could not read the stored copies of %d auth events: %s", len(ids), e)
        stored = {}
    chains: dict[str, list[EventBase]] = {}

    async def check(event_id: str) -> None:
        origin, chain = answers[event_id]
        fresh = [
            parses.to_check(key, ev) for key, ev in chain if not parses.held(key, stored.get(ev.event_id), ev)
        ]
        stats.received += len(chain)
        stats.checked += len(fresh)
        try:
            chains[event_id] = await federation_client._check_sigs_and_hash_for_pulled_events_and_fetch(
                origin, fresh, room_version=room_version
            )
        except Exception as e:
            logger.warning("Failed to get auth chain for %s: %s", event_id, e)

    await concurrently_execute(check, list(answers), concurrency)
    # In the order asked for (the caller keeps the first copy of an event).
    return {event_id: chains[event_id] for _, event_id in wanted if event_id in chains}
