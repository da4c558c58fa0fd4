"""Auth events rejected against partial state only
(handlers/provisional_rejections.py, asked by patch 0019), on real events
and Synapse's own auth rules."""


import pytest

from synapse.api.errors import AuthError
from synapse.api.room_versions import RoomVersions
from synapse.event_auth import check_state_independent_auth_rules
from synapse.events import EventBase, make_event_from_dict

from synapse_fastjoin.handlers.provisional_rejections import ProvisionalRejections
from tests.harness.sync_run import run

V10 = RoomVersions.V10
ROOM = "!room:resident.test"
CHARLIE = "@charlie:resident.test"
DEREK = "@derek:resident.test"
ELSIE = "@elsie:resident.test"



_depth = [0]


def _event(type_, sender, content, auth, state_key="", rejected=None) -> EventBase:
    _depth[0] += 1
    return make_event_from_dict(
        {
            "type": type_,
            "room_id": ROOM,
            "sender": sender,
            "state_key": state_key,
            "content": content,
            "auth_events": [e.event_id for e in auth],
            "prev_events": [],
            "depth": _depth[0],
            "origin_server_ts": 1_700_000_000_000 + _depth[0],
            "hashes": {"sha256": "x"},
            "signatures": {},
        },
        V10,
        rejected_reason=rejected,
    )


def _member(user, membership, auth, sender=None, rejected=None) -> EventBase:
    return _event(
        "m.room.member", sender or user, {"membership": membership}, auth, user, rejected
    )


class Room:
    """create, charlie joins and sets power (derek moderator), public;
    derek and elsie join."""

    def __init__(self) -> None:
        self.create = _event("m.room.create", CHARLIE, {"creator": CHARLIE, "room_version": "10"}, [])
        self.charlie = _member(CHARLIE, "join", [self.create])
        self.pl = _event(
            "m.room.power_levels",
            CHARLIE,
            {"users": {CHARLIE: 100, DEREK: 50}},
            [self.create, self.charlie],
        )
        self.jr = _event(
            "m.room.join_rules", CHARLIE, {"join_rule": "public"}, [self.create, self.pl, self.charlie]
        )
        self.derek = _member(DEREK, "join", [self.create, self.pl, self.jr])
        self.elsie = _member(ELSIE, "join", [self.create, self.pl, self.jr])

    def kick(self, rejected: str | None) -> EventBase:
        """Derek (a moderator) kicks Elsie: valid on its own."""
        return _member(
            ELSIE, "leave", [self.create, self.pl, self.derek, self.elsie], sender=DEREK,
            rejected=rejected,
        )

    def bad_kick(self, rejected: str | None) -> EventBase:
        """Elsie (power 0) kicks Derek: invalid on its own."""
        return _member(
            DEREK, "leave", [self.create, self.pl, self.elsie, self.derek], sender=ELSIE,
            rejected=rejected,
        )

    def rejoin(self, after: EventBase) -> EventBase:
        return _member(ELSIE, "join", [self.create, self.pl, self.jr, after])


class FakeStore:
    def __init__(self, events: list[EventBase], partial: set[str]) -> None:
        self.events = {e.event_id: e for e in events}
        self.partial = partial

    async def get_events(self, event_ids, redact_behaviour=None, allow_rejected=False):
        return {
            i: self.events[i]
            for i in event_ids
            if i in self.events and (allow_rejected or not self.events[i].rejected_reason)
        }

    async def get_events_as_list(self, event_ids, redact_behaviour=None, allow_rejected=False):
        found = await self.get_events(event_ids, allow_rejected=allow_rejected)
        return [found[i] for i in event_ids if i in found]

    async def get_partial_state_events(self, event_ids):
        return {i: i in self.partial for i in event_ids}


def _handler(store: FakeStore) -> ProvisionalRejections:
    class Hs:
        def get_datastores(self):
            class D:
                main = store

            return D()

    return ProvisionalRejections(Hs())  # type: ignore[arg-type]


def _setup(room: Room, kick: EventBase, partial: bool):
    rejoin = room.rejoin(kick)
    base = [room.create, room.charlie, room.pl, room.jr, room.derek, room.elsie]
    store = FakeStore(base + [kick, rejoin], {kick.event_id, rejoin.event_id} if partial else set())
    claimed = [store.events[i] for i in rejoin.auth_event_ids()]
    return store, rejoin, claimed


def test_stock_rule_rejects_the_rejoin():
    room = Room()
    store, rejoin, _ = _setup(room, room.kick("auth_error"), partial=True)
    with pytest.raises(AuthError):
        run(check_state_independent_auth_rules(store, rejoin))


def test_kick_rejected_against_partial_state_is_provisional():
    room = Room()
    kick = room.kick("auth_error")
    store, rejoin, claimed = _setup(room, kick, partial=True)
    given = run(_handler(store).auth_events_while_partial(rejoin, claimed))
    assert given is not None and set(given) == set(rejoin.auth_event_ids())
    assert given[kick.event_id].rejected_reason is None
    assert given[kick.event_id].event_id == kick.event_id
    # The others are the stored events themselves.
    assert given[room.create.event_id] is store.events[room.create.event_id]
    # The state-independent checks now pass (the rest of the checks still run).
    run(check_state_independent_auth_rules(store, rejoin, batched_auth_events=given))


def test_rejection_decided_with_full_state_is_final():
    room = Room()
    store, rejoin, claimed = _setup(room, room.kick("auth_error"), partial=False)
    assert run(_handler(store).auth_events_while_partial(rejoin, claimed)) is None


def test_event_invalid_on_its_own_stays_rejected():
    room = Room()
    store, rejoin, claimed = _setup(room, room.bad_kick("auth_error"), partial=True)
    assert run(_handler(store).auth_events_while_partial(rejoin, claimed)) is None


def test_nothing_rejected_nothing_given():
    room = Room()
    store, rejoin, claimed = _setup(room, room.kick(None), partial=True)
    assert run(_handler(store).auth_events_while_partial(rejoin, claimed)) is None
