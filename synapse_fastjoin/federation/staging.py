# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""A `/send` transaction's PDUs of a room, checked and staged together
(patch 0028).

Synapse handles a transaction's PDUs of a room one at a time
(`FederationServer._handle_received_pdu`): the signature and hash checks
(`_check_sigs_and_hash`, which reads the origin's keys from the database),
the spam checker's `should_drop_federated_event`, one transaction to insert
the PDU into the staging area, the module's `on_inbound_event_staged`, one
transaction to try the room's processing lock (and, if taken, the start of
the room's processing). About three transactions a PDU. On SQLite each waits
for the one connection, behind a resync's writes or the work a big join
leaves behind: a `/send` of 50 PDUs took 5 to 20 s to answer then, and the
sending server (which sends one transaction at a time) fell minutes behind,
so live events reached the joiner long after they were sent.

Here, for each PDU in order, the same outcome:

- `_check_sigs_and_hash` for every PDU at once (Synapse's keyring gathers
  the concurrent key lookups of one origin into one), its verdict per PDU:
  an invalid signature is the PDU's error result (`FederationError` 403, as
  Synapse reports it), a bad content hash stages the redacted event, as
  Synapse does;
- the spam checker's `should_drop_federated_event`, one PDU after another in
  the transaction's order: a dropped PDU is not staged, and its result is
  empty, as in Synapse;
- the kept PDUs are staged in one transaction, with the rows Synapse writes
  (an event staged already from the same origin is left as it is), and
  received times one millisecond apart in the transaction's order, so the
  queue processes them in the order sent (Synapse's one-at-a-time inserts
  may tie within a millisecond);
- `on_inbound_event_staged` once per staged PDU, then one attempt at the
  room's processing lock, which starts the room's processing when taken.

Any other failure of a PDU's checks is that PDU's error result (logged), as
in Synapse. A transaction of one PDU takes this path too (what it costs is
Synapse's), so that its received time follows those given before it.
`tests/unit/test_send_staging_parity.py` hands the same transactions
(forged signatures, bad hashes, spam, duplicates, events staged before) to
Synapse's path and to this one and compares results and staging rows.
"""

import logging
from typing import TYPE_CHECKING, Any

from synapse.api.errors import FederationError
from synapse.events import EventBase
from synapse.federation.federation_base import InvalidEventSignatureError
from synapse.federation.federation_server import _INBOUND_EVENT_HANDLING_LOCK_NAME
from synapse.util.async_helpers import yieldable_gather_results
from synapse.util.json import json_encoder

from synapse_fastjoin.storage.store import FastJoinStore

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

# Rooms whose last assigned received time is remembered (the next
# transaction's times follow it); the oldest are forgotten past this.
_LAST_TS_ROOMS = 10_000


class StagingStats:
    def __init__(self) -> None:
        self.transactions = 0
        self.pdus = 0


class BatchStaging:
    def __init__(self, hs: "HomeServer", store: FastJoinStore) -> None:
        self._hs = hs
        self._store = store
        self._clock = hs.get_clock()
        self._last_ts: dict[str, int] = {}
        self.stats = StagingStats()

    def _received_times(self, room_id: str, count: int) -> list[int]:
        start = max(self._clock.time_msec(), self._last_ts.get(room_id, 0) + 1)
        self._last_ts.pop(room_id, None)
        self._last_ts[room_id] = start + count - 1
        if len(self._last_ts) > _LAST_TS_ROOMS:
            del self._last_ts[next(iter(self._last_ts))]
        return [start + i for i in range(count)]

    async def stage_received_pdus(
        self, origin: str, room_id: str, pdus: list[EventBase]
    ) -> dict[str, dict] | None:
        """Patch 0028's callback (module docstring)."""
        if not pdus:
            return None
        hs = self._hs
        main = hs.get_datastores().main
        federation_server = hs.get_federation_server()
        callbacks = hs.get_module_api_callbacks()
        room_version = await main.get_room_version(room_id)

        async def check(pdu: EventBase) -> EventBase | dict:
            try:
                return await federation_server._check_sigs_and_hash(room_version, pdu)
            except InvalidEventSignatureError as e:
                logger.warning("event id %s: %s", pdu.event_id, e)
                error = FederationError("ERROR", 403, str(e), affected=pdu.event_id)
                logger.warning("Error handling PDU %s: %s", pdu.event_id, error)
                return {"error": str(error)}
            except Exception as e:
                logger.error("Failed to handle PDU %s", pdu.event_id, exc_info=True)
                return {"error": str(e)}

        checked = await yieldable_gather_results(check, pdus)
        results: dict[str, dict] = {}
        kept: list[EventBase] = []
        for pdu, outcome in zip(pdus, checked):
            if isinstance(outcome, dict):
                results[pdu.event_id] = outcome
                continue
            try:
                drop = await callbacks.spam_checker.should_drop_federated_event(outcome)
            except Exception as e:
                logger.error("Failed to handle PDU %s", pdu.event_id, exc_info=True)
                results[pdu.event_id] = {"error": str(e)}
                continue
            if drop:
                logger.warning("Unstaged federated event contains spam, dropping %s", outcome.event_id)
            else:
                kept.append(outcome)
            results[pdu.event_id] = {}
        if not kept:
            return results
        times = self._received_times(room_id, len(kept))
        await self._store.stage_received_events(
            [
                (
                    origin,
                    event.room_id,
                    event.event_id,
                    received_ts,
                    json_encoder.encode(event.get_dict()),
                    json_encoder.encode(event.internal_metadata.get_dict()),
                )
                for event, received_ts in zip(kept, times)
            ]
        )
        for _ in kept:
            await callbacks.fastjoin.on_inbound_event_staged(room_id)
        self.stats.transactions += 1
        self.stats.pdus += len(kept)
        lock = await main.try_acquire_lock(_INBOUND_EVENT_HANDLING_LOCK_NAME, room_id)
        if lock:
            federation_server._process_incoming_pdus_in_room_inner(room_id, room_version, lock, origin, kept[0])
        return results
