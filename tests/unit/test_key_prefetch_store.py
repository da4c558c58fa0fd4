# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""The key prefetch (`resync.keys.prefetch_server_keys`) stores a notary
request's answers in one transaction, with the rows Synapse's own notary
fetcher writes for the same answers a transaction each (`process_v2_response`
calling `store_server_keys_response`), on SQLite and PostgreSQL.

The notary is played by the test (a remote server: its answers are handed to
Synapse's federation client's `post_json`); everything else is Synapse's."""

import copy
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from signedjson.key import encode_verify_key_base64, get_verify_key
from signedjson.sign import sign_json

from synapse.app.homeserver import SynapseHomeServer
from synapse.crypto.keyring import PerspectivesKeyFetcher, _FetchKeyRequest
from synapse.util.iterutils import batch_iter

from synapse_fastjoin.resync.keys import _PREFETCH_BATCH, prefetch_server_keys
from tests.harness import inprocess
from tests.harness.fakehs.keys import KEY_ID, server_keys_json, signing_key

NOTARY = "notary.test"
SERVER = "joiner.test"
# 60 servers: three requests of the prefetch (25, 25, 10).
SERVERS = [f"s{i:02}.test" for i in range(60)]
OLD_KEY_ID = "ed25519:old"
VALID_UNTIL = 1_900_000_000_000
# The servers whose answers are out of the ordinary (indexes into SERVERS):
# the first request asks for 0 to 24, the second for 25 to 49.
MISSING, TWICE, OLD_KEY, FORGED, NOT_COUNTERSIGNED = 3, 5, 7, 20, 30


def _answers() -> dict[str, list[dict[str, Any]]]:
    """What the notary answers for each server (an entry each, most of them;
    the same every time it is asked)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for i, server in enumerate(SERVERS):
        if i == MISSING:
            continue  # the notary has nothing for this one
        if i == TWICE:
            # Two entries for one server, the later one valid for longer:
            # Synapse stores both, one after the other.
            first = server_keys_json(server, now_ms=VALID_UNTIL - 10**6)
            second = server_keys_json(server, now_ms=VALID_UNTIL)
            out[server] = [sign_json(first, NOTARY, signing_key(NOTARY)), sign_json(second, NOTARY, signing_key(NOTARY))]
            continue
        doc = server_keys_json(server, now_ms=VALID_UNTIL)
        if i == OLD_KEY:
            # An old key beside the current one.
            del doc["signatures"]
            doc["old_verify_keys"] = {
                OLD_KEY_ID: {
                    "key": encode_verify_key_base64(get_verify_key(signing_key("old-" + server))),
                    "expired_ts": 1_700_000_000_000,
                }
            }
            doc = sign_json(doc, server, signing_key(server))
        if i == FORGED:
            # Not signed by the server it is for. Synapse's notary fetcher
            # lets the signature error out of the whole answer: what it
            # stored of the answer before this entry stays, the rest of
            # the answer is neither stored nor returned.
            del doc["signatures"]
            doc = sign_json(doc, server, signing_key("someone-else.test"))
        if i == NOT_COUNTERSIGNED:
            # Not countersigned by the notary: this entry is refused, the
            # rest of the answer is taken.
            out[server] = [doc]
            continue
        out[server] = [sign_json(doc, NOTARY, signing_key(NOTARY))]
    return out


class _Notary:
    """Synapse's federation client as far as its notary fetcher uses it."""

    def __init__(self) -> None:
        self.answers = _answers()
        self.requests = 0

    async def post_json(self, destination: str, path: str, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        assert (destination, path) == (NOTARY, "/_matrix/key/v2/query"), (destination, path)
        self.requests += 1
        return {
            "server_keys": [
                copy.deepcopy(answer) for server in data["server_keys"] for answer in self.answers.get(server, [])
            ]
        }


@pytest.fixture
def homeservers(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict[str, SynapseHomeServer]]:
    config = {
        "trusted_key_servers": [
            {"server_name": NOTARY, "verify_keys": {KEY_ID: encode_verify_key_base64(get_verify_key(signing_key(NOTARY)))}}
        ]
    }
    with inprocess.homeservers_for_fixture(
        ("synapse", "prefetch"), SERVER, db_backend, tmp_path_factory, request, config
    ) as made:
        yield made


def _notary_fetcher(hs: SynapseHomeServer) -> PerspectivesKeyFetcher:
    fetcher = next(f for f in hs.get_keyring()._key_fetchers if isinstance(f, PerspectivesKeyFetcher))
    fetcher.client = _Notary()  # type: ignore[assignment]
    return fetcher


async def _rows(hs: SynapseHomeServer) -> dict[str, list[tuple[Any, ...]]]:
    """Both tables, but the time each row was added (now, on each server)."""
    db_pool = hs.get_datastores().main.db_pool
    out = {}
    for table, columns in (
        ("server_signature_keys", "server_name, key_id, from_server, ts_valid_until_ms, verify_key"),
        ("server_keys_json", "server_name, key_id, from_server, ts_valid_until_ms, key_json"),
    ):
        rows = await db_pool.execute(f"rows_{table}", f"SELECT {columns} FROM {table} ORDER BY 1, 2, 3")
        out[table] = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in rows]
    return out


@pytest_twisted.ensureDeferred
async def test_prefetch_stores_what_synapse_stores_in_a_transaction_per_request(
    homeservers: dict[str, SynapseHomeServer], caplog: pytest.LogCaptureFixture
) -> None:
    synapse_hs, prefetch_hs = homeservers["synapse"], homeservers["prefetch"]
    for hs in homeservers.values():
        # Looked up (and cached as missing) before the keys arrive: the
        # store must invalidate these entries as Synapse's does.
        store = hs.get_datastores().main
        assert (await store.get_server_keys_json([(SERVERS[0], KEY_ID)])).get((SERVERS[0], KEY_ID)) is None
        assert (await store.get_server_keys_json_for_remote(SERVERS[0], [KEY_ID])).get(KEY_ID) is None

    # Synapse's path: its notary fetcher, asked for the same servers in the
    # same requests as the prefetch asks.
    fetcher = _notary_fetcher(synapse_hs)
    for batch in batch_iter(sorted(SERVERS), _PREFETCH_BATCH):
        await fetcher._fetch_keys([_FetchKeyRequest(server_name=s, minimum_valid_until_ts=0, key_ids=[]) for s in batch])

    notary = _notary_fetcher(prefetch_hs).client
    store = prefetch_hs.get_datastores().main
    descs: list[str] = []
    run_interaction = store.db_pool.runInteraction

    def counting(desc: str, *args: Any, **kwargs: Any) -> Any:
        descs.append(desc)
        return run_interaction(desc, *args, **kwargs)

    store.db_pool.runInteraction = counting  # type: ignore[method-assign]
    caplog.clear()
    try:
        with caplog.at_level(logging.WARNING, logger="synapse_fastjoin"):
            found = await prefetch_server_keys(prefetch_hs, "!room:test", SERVERS)
    finally:
        store.db_pool.runInteraction = run_interaction  # type: ignore[method-assign]
    # A request whose answers could not be stored is logged (with why) and
    # left out of what is found: none here.
    failures = [r for r in caplog.records if r.name.startswith("synapse_fastjoin") and r.levelno >= logging.WARNING]
    assert not failures, "\n".join(caplog.text.splitlines()[-60:])

    requests = -(-len(SERVERS) // _PREFETCH_BATCH)
    assert notary.requests == requests
    # One transaction for each request's answers, none for each server.
    assert "store_server_keys_response" not in descs, descs
    assert descs.count("fastjoin_store_server_keys") == requests, descs
    # The servers of the requests whose answers were taken (the forged
    # entry lost the first answer for both paths), but the one refused.
    assert found == len(SERVERS) - _PREFETCH_BATCH - 1

    synapse_rows, prefetch_rows = await _rows(synapse_hs), await _rows(prefetch_hs)
    assert prefetch_rows == synapse_rows
    stored = {row[0] for row in synapse_rows["server_signature_keys"]}
    assert stored == (set(SERVERS[:FORGED]) | set(SERVERS[_PREFETCH_BATCH:])) - {SERVERS[MISSING], SERVERS[NOT_COUNTERSIGNED]}
    assert (SERVERS[OLD_KEY], OLD_KEY_ID) in {row[:2] for row in synapse_rows["server_signature_keys"]}
    # The server with two entries: the later one's validity, as Synapse's
    # second upsert leaves it.
    assert {row[3] for row in synapse_rows["server_keys_json"] if row[0] == SERVERS[TWICE]} == {
        VALID_UNTIL + 7 * 24 * 3600 * 1000
    }

    for hs in homeservers.values():
        store = hs.get_datastores().main
        # The cached misses were invalidated.
        assert (await store.get_server_keys_json([(SERVERS[0], KEY_ID)])).get((SERVERS[0], KEY_ID)) is not None
        assert (await store.get_server_keys_json_for_remote(SERVERS[0], [KEY_ID])).get(KEY_ID) is not None

    # The keyring checks a signature with what was stored, asking no one.
    signed = sign_json({"hello": "world"}, SERVERS[1], signing_key(SERVERS[1]))
    await prefetch_hs.get_keyring().verify_json_for_server(SERVERS[1], signed, 1_800_000_000_000)
    assert notary.requests == requests
