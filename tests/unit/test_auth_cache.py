"""The auth events of a batch of state events the engine persists."""

import collections

from twisted.internet import defer

from synapse.api.room_versions import RoomVersions
from synapse.events import make_event_from_dict

from synapse_fastjoin.resync.persist import auth_events_for_batch


def _event(n: int, auth: list[str]):
    return make_event_from_dict(
        {
            "type": "m.room.member",
            "room_id": "!r:x",
            "sender": f"@u{n}:x",
            "state_key": f"@u{n}:x",
            "content": {"membership": "join"},
            "auth_events": auth,
            "prev_events": [],
            "depth": 5,
            "origin_server_ts": n,
            "hashes": {"sha256": "x"},
            "signatures": {},
        },
        RoomVersions.V10,
    )


def test_a_full_cache_never_loses_an_auth_event_the_batch_counts_on():
    """A full cache whose oldest entry is an auth event of the batch, and the
    batch needs more events from the database than the cache has room for:
    the oldest entry must still be in the result (the batch persisted under
    live traffic once lost a whole batch of 500 valid events this way)."""
    size = 50
    cache: collections.OrderedDict = collections.OrderedDict()
    create = _event(0, [])
    cache[create.event_id] = create
    for n in range(1, size):
        ev = _event(n, [])
        cache[ev.event_id] = ev
    in_db = {ev.event_id: ev for ev in (_event(1000 + n, []) for n in range(10))}
    batch = [_event(2000 + n, [create.event_id, list(in_db)[n]]) for n in range(10)]
    loads: list[set[str]] = []

    async def load(ids: set[str]):
        loads.append(set(ids))
        return {i: in_db[i] for i in ids if i in in_db}

    d = defer.ensureDeferred(auth_events_for_batch(batch, cache, load, size))
    auth_map = d.result
    for ev in batch:
        assert all(a in auth_map for a in ev.auth_event_ids()), ev.event_id
    # Nothing was loaded that the cache had, and the cache kept its bound.
    assert loads == [set(in_db)]
    assert len(cache) == size
    # What the batch just used is the freshest in the cache.
    assert create.event_id in cache
