"""The signing keys a resync checks events with, fetched through Synapse's
keyring (its notaries, caches and key store) ahead of the threaded checks."""

import copy
import logging
import time
from typing import TYPE_CHECKING, Any, Collection

from signedjson.key import encode_verify_key_base64
from twisted.internet import defer

from synapse.api.room_versions import RoomVersion
from synapse.crypto.keyring import BANNED_SERVER_SIGNING_KEYS, PerspectivesKeyFetcher, _FetchKeyRequest
from synapse.logging.context import make_deferred_yieldable, run_in_background
from synapse.util.async_helpers import Linearizer, ObservableDeferred
from synapse.util.iterutils import batch_iter

from synapse_fastjoin.resync.checks import KeyInfo, wanted_key_ids
from synapse_fastjoin.storage.keys import KeyResponse, servers_with_keys_valid_until_txn, store_server_keys_responses_txn

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)


class SigningKeys:
    """The verify keys of one resync run, by (server, key id)."""

    def __init__(self, hs: "HomeServer", room_id: str, room_version: RoomVersion) -> None:
        self._hs = hs
        self._room_id = room_id
        self._room_version = room_version
        self._keyring = hs.get_keyring()
        self._keys: dict[tuple[str, str], KeyInfo] = {}
        self._tried: set[tuple[str, str]] = set()
        self._linearizer = Linearizer(name="fastjoin_keys", clock=hs.get_clock())

    def snapshot(self) -> dict[tuple[str, str], KeyInfo]:
        """The keys known now (a copy, for a worker thread)."""
        return dict(self._keys)

    def new_round(self) -> None:
        """Keys that could not be fetched are asked for again."""
        self._tried.clear()

    async def ensure(self, chunk: list[dict[str, Any]]) -> None:
        """Fetch the keys the chunk is signed with that we do not have yet
        (each asked for once per round). Serialised, so a chunk never goes on
        while another is still fetching its keys."""
        async with self._linearizer.queue(self._room_id):
            await _wait_for_prefetch(self._hs, self._room_id)
            await self._ensure_locked(chunk)

    async def _ensure_locked(self, chunk: list[dict[str, Any]]) -> None:
        needed: dict[str, set[str]] = {}
        min_ts: dict[str, int] = {}
        for pdu in chunk:
            for server, key_id in wanted_key_ids(pdu, self._room_version):
                if (server, key_id) in self._keys or (server, key_id) in self._tried:
                    continue
                needed.setdefault(server, set()).add(key_id)
                ts = pdu.get("origin_server_ts") if self._room_version.enforce_key_validity else 0
                if isinstance(ts, int):
                    min_ts[server] = max(min_ts.get(server, 0), ts)
        if not needed:
            return

        async def fetch(server: str) -> None:
            key_ids = needed[server]
            self._tried.update((server, k) for k in key_ids)
            if self._hs.is_mine_server_name(server):
                found = {k: v for k, v in self._keyring._local_verify_keys.items() if k in key_ids}
            else:
                request = _FetchKeyRequest(
                    server_name=server,
                    minimum_valid_until_ts=min_ts.get(server, 0),
                    key_ids=sorted(key_ids),
                )
                try:
                    by_server = await self._keyring._fetch_keys_queue.add_to_queue(
                        request, key=server
                    )
                except Exception as e:
                    logger.warning(
                        "Resync of %s: fetching keys of %s failed: %s", self._room_id, server, e
                    )
                    return
                found = by_server.get(server, {})
            for key_id, result in found.items():
                if encode_verify_key_base64(result.verify_key) in BANNED_SERVER_SIGNING_KEYS:
                    continue
                self._keys[(server, key_id)] = KeyInfo(result.verify_key, result.valid_until_ts)

        await make_deferred_yieldable(
            defer.gatherResults(
                [run_in_background(fetch, server) for server in needed], consumeErrors=True
            )
        )


# Servers per notary request of `prefetch_server_keys`, and requests at once.
# Synapse stores each server's answer in a transaction of its own, one after
# another within a request (`process_v2_response`): on a PostgreSQL busy with
# live traffic some 65 ms each, so a thousand servers in batches of 100, 4 at
# once, took 19 to 21 s, during which the state's checks wait. The prefetch
# now stores a request's answers in one transaction (`_BatchedKeyStore`);
# several requests at once still overlap the notary's answers with those
# writes.
_PREFETCH_BATCH = 25
_PREFETCH_PARALLEL = 8
# How long the first chunks wait for a prefetch under way rather than asking
# for their keys themselves (twice: the notary would answer the same, and
# Synapse stores each server's answer in a transaction of its own, which on
# PostgreSQL takes a good part of a minute for a thousand servers). Bounded
# for a notary that does not answer (Synapse's own request timeout bounds it
# too).
_PREFETCH_WAIT_SECONDS = 120.0

# Prefetches under way, by room.
_prefetching: dict[str, ObservableDeferred[int]] = {}


async def _wait_for_prefetch(hs: "HomeServer", room_id: str) -> None:
    prefetch = _prefetching.get(room_id)
    if prefetch is None:
        return
    waiter = prefetch.observe()
    waiter.addTimeout(_PREFETCH_WAIT_SECONDS, hs.get_reactor())
    try:
        await make_deferred_yieldable(waiter)
    except defer.TimeoutError:
        logger.info("Resync of %s: the key prefetch is slow; asking for the chunk's keys", room_id)
    except Exception:
        pass  # logged where it failed


def start_key_prefetch(hs: "HomeServer", room_id: str, servers: Collection[str]) -> None:
    """Run `prefetch_server_keys` in the background; the room's chunk checks
    wait for it (up to a bound) instead of asking the notaries the same."""
    if room_id in _prefetching:
        return

    async def run() -> int:
        try:
            return await prefetch_server_keys(hs, room_id, servers)
        finally:
            _prefetching.pop(room_id, None)

    d = hs.run_as_background_process("fastjoin_prefetch_keys", run)
    if not d.called:  # (else it is over already: nothing to wait for)
        _prefetching[room_id] = ObservableDeferred(d, consumeErrors=True)


async def prefetch_server_keys(hs: "HomeServer", room_id: str, servers: Collection[str]) -> int:
    """Warm Synapse's key store with the signing keys of a big room's servers
    before its state arrives.

    The checks of each chunk of the state wait for the keys of the servers
    that signed it (`SigningKeys.ensure`); in a room of a thousand servers the
    first chunks each reveal hundreds of servers, fetched one keyring round
    after another while the stream waits. Here the room's servers are asked
    of the configured notaries as the resync starts, in parallel with
    `/state_ids`, through Synapse's own notary client: a server listed with no
    key id asks the notary for every key it has of that server, and what
    comes back is checked by Synapse's own code as on any key query
    (`process_v2_response`) and stored with the rows Synapse's key store
    writes, one transaction for each request's answers where Synapse takes
    one for each server (`_BatchedKeyStore`). The keyring then answers the
    chunks' requests from its store. Best effort: nothing depends on it but
    the time, and a notary that fails is only logged (by Synapse).

    Returns how many servers' keys the notaries returned.
    """
    fetcher = next(
        (f for f in hs.get_keyring()._key_fetchers if isinstance(f, PerspectivesKeyFetcher)), None
    )
    if fetcher is None:
        return 0
    wanted = {s for s in servers if not hs.is_mine_server_name(s)}
    # Servers whose keys the store holds already, valid for an hour at least
    # (from another room, or an earlier resync): the keyring answers for them.
    known = await hs.get_datastores().main.db_pool.runInteraction(
        "fastjoin_servers_with_keys",
        servers_with_keys_valid_until_txn,
        wanted,
        hs.get_clock().time_msec() + 3600 * 1000,
    )
    wanted = sorted(wanted - known)
    batches = [
        [_FetchKeyRequest(server_name=s, minimum_valid_until_ts=0, key_ids=[]) for s in batch]
        for batch in batch_iter(wanted, _PREFETCH_BATCH)
    ]
    found: set[str] = set()
    store = hs.get_datastores().main
    transactions = 0

    async def worker() -> None:
        nonlocal transactions
        while batches:
            batch = batches.pop()
            collected = _BatchedKeyStore(store)
            result = await collected.fetcher(fetcher)._fetch_keys(batch)
            if collected.responses:
                try:
                    await store.db_pool.runInteraction(
                        "fastjoin_store_server_keys", store_server_keys_responses_txn, store, collected.responses
                    )
                except Exception:
                    # Best effort, as the rest: the chunks' checks ask the
                    # keyring for these servers' keys as they come.
                    logger.warning("Resync of %s: storing the notaries' keys failed", room_id, exc_info=True)
                    continue
                transactions += 1
            found.update(server for server, keys in result.items() if keys)

    started = time.monotonic()
    await make_deferred_yieldable(
        defer.gatherResults(
            [run_in_background(worker) for _ in range(min(_PREFETCH_PARALLEL, len(batches)))],
            consumeErrors=True,
        )
    )
    logger.info(
        "Resync of %s: notaries gave the keys of %d of %d servers in %.1f s (%d known already; stored in %d transactions)",
        room_id, len(found), len(wanted), time.monotonic() - started, len(known), transactions,
    )
    return len(found)


class _BatchedKeyStore:
    """Synapse's key store as a copy of its notary fetcher sees it
    (`fetcher`): the answers that fetcher stores, a transaction each
    (`store_server_keys_response`, called by `process_v2_response` once it has
    checked an answer's signatures), are kept in `responses`, to be stored
    together (`store_server_keys_responses_txn`). Everything else is the
    real store's."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.responses: list[KeyResponse] = []

    def fetcher(self, fetcher: PerspectivesKeyFetcher) -> PerspectivesKeyFetcher:
        """A copy of Synapse's notary fetcher that stores here: its requests,
        checks and merging of the notaries' answers are Synapse's own."""
        batched = copy.copy(fetcher)
        batched.store = self  # type: ignore[assignment]
        return batched

    async def store_server_keys_response(
        self,
        server_name: str,
        from_server: str,
        ts_added_ms: int,
        verify_keys: dict[str, Any],
        response_json: dict[str, Any],
    ) -> None:
        self.responses.append(KeyResponse(server_name, from_server, ts_added_ms, verify_keys, response_json))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)
