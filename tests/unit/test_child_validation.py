"""`validate_event_for_room_version` run in the check process: the outcome the
parent applies (`raise_validation`) is what Synapse's own call on the event
the parent stores raises, event for event (size limits whole and per field,
in code points and in bytes, strict and lenient room versions; events stored
redacted for a bad content hash are validated redacted)."""

import copy
from typing import Any

import pytest
import pytest_twisted
from signedjson.key import get_verify_key
from twisted.internet import reactor

from synapse.api.errors import AuthError, EventSizeError
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from synapse.event_auth import validate_event_for_room_version
from synapse.logging.context import make_deferred_yieldable

from synapse_fastjoin.resync.checkpool import CheckPool
from synapse_fastjoin.resync.checks import (
    KeyInfo,
    check_pdus_in_worker,
    collect_worker_verdicts,
    raise_validation,
    raw_keys,
)
from tests.harness.fakehs.events import finalise_event
from tests.harness.fakehs.keys import KEY_ID, signing_key

ORIGIN = "origin.test"
TS = 1_700_000_000_000


def _events(version: str) -> list[dict[str, Any]]:
    rv = KNOWN_ROOM_VERSIONS[version]
    room_id = "!room:origin.test"

    def event(state_key: str | None, content: dict[str, Any], sender: str = f"@a:{ORIGIN}", **extra: Any) -> dict[str, Any]:
        e: dict[str, Any] = {
            "type": "m.room.member" if state_key is not None and state_key.startswith("@") else "org.example",
            "room_id": room_id,
            "sender": sender,
            "content": content,
            "depth": 5,
            "prev_events": ["$prev"],
            "auth_events": ["$create"],
            "origin_server_ts": TS,
            **extra,
        }
        if state_key is not None:
            e["state_key"] = state_key
        finalise_event(rv, e, ORIGIN)
        return e

    cases = [
        event(f"@a:{ORIGIN}", {"membership": "join"}),
        event("", {"body": "x" * 70_000}),  # the whole PDU over 64 KiB
        event("k" * 300, {}),  # state_key over 255 code points
        event("é" * 200, {}),  # 200 code points, 400 bytes
        event(None, {"body": "ok"}, type="t" * 256),  # type too long
        event(None, {"body": "ok"}, sender="@" + "ü" * 130 + f":{ORIGIN}"),  # sender over 255 bytes
    ]
    # Redacted for a bad content hash: the parent stores (and validates) the
    # redacted event, which fits.
    bad_hash = event("", {"body": "y" * 70_000})
    bad_hash["content"]["body"] = "z" * 70_000
    cases.append(bad_hash)
    return cases


def _keys() -> dict[tuple[str, str], KeyInfo]:
    return {(ORIGIN, KEY_ID): KeyInfo(get_verify_key(signing_key(ORIGIN)), TS + 10**12)}


def _raised(call: Any, arg: Any) -> tuple[type, bool] | None:
    """What `call(arg)` raised: (the error type, unpersistable), or None."""
    try:
        call(arg)
    except EventSizeError as e:
        return (EventSizeError, e.unpersistable)
    except AuthError:
        return (AuthError, False)
    return None


def _compare(version: str, verdicts: list[Any]) -> None:
    rv = KNOWN_ROOM_VERSIONS[version]
    events = _events(version)
    ids = {v[1] for v in verdicts if v[1]}
    result = collect_worker_verdicts(verdicts, rv, "!room:origin.test", ids, ids)
    assert len(result.accepted) == len(events), result
    assert set(result.validated) == {e.event_id for e in result.accepted}
    outcomes = []
    for event in result.accepted:
        ours = _raised(raise_validation, result.validated[event.event_id])
        theirs = _raised(validate_event_for_room_version, event)
        outcomes.append(theirs)
        assert ours == theirs, (event.event_id, ours, theirs)
    # The cases are what they claim: valid, refused, and kept as rejected.
    strict = rv.strict_event_byte_limits_room_versions
    assert outcomes == [
        None,
        (EventSizeError, True),
        (EventSizeError, True),
        (EventSizeError, strict),
        (EventSizeError, True),
        (EventSizeError, strict),
        None,
    ]
    assert result.redacted == 1


@pytest.mark.parametrize("version", ["10", "12"])
def test_validation_in_the_worker_function(version: str) -> None:
    pdus = copy.deepcopy(_events(version))
    _compare(version, check_pdus_in_worker(pdus, version, raw_keys(_keys()), None))


@pytest_twisted.ensureDeferred
async def test_validation_across_a_real_check_process() -> None:
    pool = CheckPool(reactor, 1)
    pool.warm_up()
    try:
        for _ in range(600):
            if pool.ready():
                break
            await make_deferred_yieldable(_sleep(0.05))
        assert pool.ready(), "the check process did not start"
        for version in ("10", "12"):
            pdus = copy.deepcopy(_events(version))
            verdicts = await make_deferred_yieldable(pool.check(pdus, version, raw_keys(_keys()), None))
            _compare(version, verdicts)
    finally:
        pool.stop()


def _sleep(seconds: float) -> Any:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)
