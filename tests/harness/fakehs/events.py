"""Building events the way a homeserver does: content hash, signature of the
redacted form, and (room versions 3 and later) the reference hash as event id."""

import hashlib
from typing import Any

from canonicaljson import encode_canonical_json
from signedjson.sign import sign_json
from unpaddedbase64 import encode_base64

from synapse.api.room_versions import KNOWN_ROOM_VERSIONS, RoomVersion
from synapse.crypto.event_signing import redact_event_dict

from tests.harness.fakehs.keys import signing_key

SUPPORTED_ROOM_VERSIONS = ("10", "11", "12")

_NOT_HASHED = ("signatures", "unsigned", "hashes")


def room_version(version: str) -> RoomVersion:
    if version not in SUPPORTED_ROOM_VERSIONS:
        raise ValueError(
            f"room version {version!r} is not supported; use one of {SUPPORTED_ROOM_VERSIONS}"
        )
    return KNOWN_ROOM_VERSIONS[version]


def finalise_event(version: RoomVersion, event: dict[str, Any], origin: str) -> str:
    """Add `hashes` and `signatures` (by `origin`'s key) to `event` in place and
    return its event id."""
    unhashed = {k: v for k, v in event.items() if k not in _NOT_HASHED}
    content_hash = hashlib.sha256(encode_canonical_json(unhashed)).digest()
    event["hashes"] = {"sha256": encode_base64(content_hash)}
    redacted = redact_event_dict(version, event)
    redacted.pop("signatures", None)
    redacted.pop("unsigned", None)
    event["signatures"] = sign_json(dict(redacted), origin, signing_key(origin))[
        "signatures"
    ]
    return event_id_of_redacted(redacted)


def event_id_of_redacted(redacted: dict[str, Any]) -> str:
    return "$" + encode_base64(
        hashlib.sha256(encode_canonical_json(redacted)).digest(), urlsafe=True
    )


def event_id(version: RoomVersion, event: dict[str, Any]) -> str:
    """The reference-hash event id of an already signed event."""
    redacted = redact_event_dict(version, event)
    redacted.pop("signatures", None)
    redacted.pop("unsigned", None)
    return event_id_of_redacted(redacted)
