"""Signing keys of the fake servers, and the key documents they publish.

Keys are derived from the server name, so a room generated once and cached on
disk stays valid in every later run without storing any secret.
"""

import hashlib
import time
from functools import lru_cache
from typing import Any

from signedjson.key import encode_verify_key_base64, get_verify_key
from signedjson.sign import SigningKey, sign_json
from nacl.signing import SigningKey as NaclSigningKey

KEY_ID = "ed25519:fake"
# Key documents are valid for a week from the moment they are served.
_VALIDITY_MS = 7 * 24 * 3600 * 1000


@lru_cache(maxsize=None)
def signing_key(server_name: str) -> SigningKey:
    """The deterministic ed25519 key of `server_name`."""
    seed = hashlib.sha256(b"synapse-fastjoin fake server key\0" + server_name.encode()).digest()
    key = NaclSigningKey(seed)
    # signedjson expects these two attributes on its keys.
    key.alg = "ed25519"  # type: ignore[attr-defined]
    key.version = "fake"  # type: ignore[attr-defined]
    return key


def verify_key_base64(server_name: str) -> str:
    return encode_verify_key_base64(get_verify_key(signing_key(server_name)))


def server_keys_json(server_name: str, now_ms: int | None = None) -> dict[str, Any]:
    """`server_name`'s own key document (GET /_matrix/key/v2/server), self-signed."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    doc = {
        "server_name": server_name,
        "valid_until_ts": now_ms + _VALIDITY_MS,
        "verify_keys": {KEY_ID: {"key": verify_key_base64(server_name)}},
        "old_verify_keys": {},
    }
    return sign_json(doc, server_name, signing_key(server_name))


def notarised_keys_json(server_name: str, notary: str) -> dict[str, Any]:
    """`server_name`'s key document countersigned by `notary`, as served from
    /_matrix/key/v2/query."""
    return sign_json(server_keys_json(server_name), notary, signing_key(notary))
