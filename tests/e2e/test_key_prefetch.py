"""A big room's signing keys asked of the notary as its resync starts
(`resync.keys.prefetch_server_keys`), not chunk by chunk as the state reveals
the servers that signed it."""

import math
import re

import pytest_twisted

from synapse_fastjoin.resync.keys import _PREFETCH_BATCH

from tests.e2e.test_resync_bad_input import assert_complete, join, served, start_resident
from tests.harness.fakehs.room import RoomSpec

# 241 other servers: over the engine's threshold for a big room (200).
SPEC = RoomSpec(members=600, servers=240, history=5)
KEY_QUERY = r"^/_matrix/key/v2/query"


@pytest_twisted.ensureDeferred
async def test_keys_of_a_big_room_come_from_the_notary_at_once(synapse_factory, tls_files, tmp_path):
    resident = await start_resident(tls_files, tmp_path, spec=SPEC)
    try:
        # Chunks of 20 events: without the prefetch each would reveal new
        # servers and wait for a notary query of its own (30 of them).
        j = await join(synapse_factory, resident, chunk_size=20, event_fetch_threshold=0)
        await assert_complete(j)
        found = re.search(
            r"notaries gave the keys of (\d+) of (\d+) servers in [\d.]+ s"
            r" \((\d+) known already; stored in (\d+) transactions\)",
            j.joiner.read_log(),
        )
        assert found, "no key prefetch"
        assert int(found.group(1)) >= SPEC.servers, found.group(0)
        # A transaction for each notary query's answers (Synapse's notary
        # fetcher takes one for each server).
        assert 0 < int(found.group(4)) <= math.ceil((SPEC.servers + 1) / _PREFETCH_BATCH), found.group(0)
        # The prefetch's queries (_PREFETCH_BATCH servers each: 10 of 25),
        # and at most a couple made before it started.
        assert served(resident, KEY_QUERY, 200) <= math.ceil((SPEC.servers + 1) / _PREFETCH_BATCH) + 2, served(
            resident, KEY_QUERY
        )
    finally:
        await resident.stop()
