"""The signing keys a resync checks events with, fetched through Synapse's
keyring (its notaries, caches and key store) ahead of the threaded checks."""

import logging
from typing import TYPE_CHECKING, Any

from signedjson.key import encode_verify_key_base64
from twisted.internet import defer

from synapse.api.room_versions import RoomVersion
from synapse.crypto.keyring import BANNED_SERVER_SIGNING_KEYS, _FetchKeyRequest
from synapse.logging.context import make_deferred_yieldable, run_in_background
from synapse.util.async_helpers import Linearizer

from synapse_fastjoin.resync.checks import KeyInfo, wanted_key_ids

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
