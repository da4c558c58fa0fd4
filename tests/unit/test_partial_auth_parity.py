"""The auth state of an event received while partial: the module's answer
(`synapse_fastjoin.handlers.partial_auth`, patch 0016) against Synapse's own
resolution of the whole partial state, on the same inputs.

One real, in-process HomeServer (SQLite, the real reactor, patched Synapse)
holds two rooms (versions 10 and 12) whose events are persisted as outliers:
joins, power-level changes, a ban, a kick, a self-leave, a fork (a power-level
demotion of the moderator against a ban by him), and a power-levels event
stored as rejected. Partial states are stored as real state groups: the
non-member state with no, some or all memberships (members the partial state
omits, as MSC3706 does, and members it holds), on either side of the fork.

Incoming events (accepted and rejected; messages, bans, kicks, power-level
changes, joins of users whose membership is and is not in the partial state,
stale claimed auth events) go through Synapse's real `_check_event_auth` twice
per partial state: once with the module's callback, once with Synapse's own
resolution. The verdicts (rejected or not, or the error raised) and the auth
events `compute_auth_events` calculates from each answer must be identical;
and, key by key, the module's answer must equal Synapse's resolution wherever
the module answers at all. Both ways must be taken (the shortcut and the
resolution), with accepted and rejected events on each. The module's
resolution is the one computed at the auth keys
(`synapse_fastjoin.state.partial_resolution`), never Synapse's whole one.
"""

import collections
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from synapse.api.room_versions import KNOWN_ROOM_VERSIONS, RoomVersion
from synapse.app.homeserver import SynapseHomeServer
from synapse.event_auth import auth_types_for_event
from synapse.events import EventBase, make_event_from_dict
from synapse.events.snapshot import EventContext
from synapse.api.constants import EventTypes
from synapse.state import StateResolutionStore

from synapse_fastjoin.handlers.partial_auth import (
    PartialStateAuth,
    auth_state_from_unconflicted,
)
from tests.harness.inprocess import make_homeserver, shut_down
from tests.harness.fakehs.events import finalise_event

JOINER = "joiner.test"
A = "a.test"
B = "b.test"
BASE_TS = 1_700_000_000_000

CREATOR = f"@c:{A}"
MOD = f"@m:{A}"


def user(i: int) -> str:
    return f"@u{i}:{B}"


# The HomeServer.


def _make_homeserver(data_dir: str) -> SynapseHomeServer:
    return make_homeserver(data_dir, JOINER)


class Hook:
    """The callback registered with patched Synapse: the module's answer, or
    (`ours = False`) Synapse's own resolution, recording the auth events
    `compute_auth_events` calculates from the answer."""

    def __init__(self, hs: SynapseHomeServer) -> None:
        self.module = PartialStateAuth(hs)
        self.ours = True
        self.calculated: list[str] | None = None
        self._auth = hs.get_event_auth_handler()

    async def __call__(self, event, context, claimed, resolve):
        if self.ours:
            answer = await self.module.state_for_auth_while_partial(event, context, claimed, resolve)
        else:
            answer = await resolve()
        self.calculated = self._auth.compute_auth_events(event, answer, for_verification=True)
        return answer


@pytest.fixture(scope="module")
def hs_and_hook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SynapseHomeServer, Hook]]:
    hs = _make_homeserver(str(tmp_path_factory.mktemp("partial-auth-hs")))
    hook = Hook(hs)
    hs.get_module_api().register_fastjoin_callbacks(state_for_auth_while_partial=hook)
    yield hs, hook
    shut_down(hs)


# Rooms.


class Room:
    """A room built event by event, with the state after each branch tip."""

    def __init__(self, version: str, name: str = "parity") -> None:
        self.version: RoomVersion = KNOWN_ROOM_VERSIONS[version]
        self.msc4291 = self.version.msc4291_room_ids_as_hashes
        self.ts = iter(range(BASE_TS, BASE_TS + 10**6))
        self.events: list[EventBase] = []
        self.rejected: set[str] = set()
        self.depth = 0
        content: dict[str, Any] = {"room_version": version, "org.example.name": name}
        create: dict[str, Any] = {
            "type": "m.room.create", "state_key": "", "sender": CREATOR, "content": content,
            "depth": 1, "prev_events": [], "auth_events": [], "origin_server_ts": next(self.ts),
        }
        if not self.msc4291:
            content["creator"] = CREATOR
            create["room_id"] = f"!{name}{version}:{A}"
        create_id = finalise_event(self.version, create, A)
        self.room_id = "!" + create_id[1:] if self.msc4291 else create["room_id"]
        self.state: dict[tuple[str, str], str] = {}
        self.tip = [create_id]
        self._store(create_id, create)

    def _store(self, event_id: str, event: dict[str, Any], rejected: bool = False) -> EventBase:
        built = make_event_from_dict(event, self.version)
        assert built.event_id == event_id
        self.events.append(built)
        if rejected:
            self.rejected.add(event_id)
        else:
            self.state[(built.type, built.state_key)] = event_id
            self.tip = [event_id]
        return built

    def build(
        self,
        sender: str,
        event_type: str,
        content: dict[str, Any],
        state_key: str | None = None,
        claim: dict[tuple[str, str], str] | None = None,
    ) -> EventBase:
        """An event after the tip, with the auth events the rules select from
        `claim` (default: the state now)."""
        state = self.state if claim is None else claim
        wanted = [(EventTypes.PowerLevels, ""), (EventTypes.Member, sender)]
        if not self.msc4291:
            wanted.insert(0, (EventTypes.Create, ""))
        if event_type == EventTypes.Member:
            wanted.append((EventTypes.Member, state_key))
            if content["membership"] in ("join", "invite", "knock"):
                wanted.append((EventTypes.JoinRules, ""))
        auth: list[str] = []
        for key in wanted:
            if key in state and state[key] not in auth:
                auth.append(state[key])
        self.depth += 1
        event: dict[str, Any] = {
            "type": event_type, "room_id": self.room_id, "sender": sender, "content": content,
            "depth": 2 + self.depth, "prev_events": list(self.tip), "auth_events": auth,
            "origin_server_ts": next(self.ts),
        }
        if state_key is not None:
            event["state_key"] = state_key
        finalise_event(self.version, event, sender.split(":", 1)[1])
        return make_event_from_dict(event, self.version)

    def add(self, *args: Any, rejected: bool = False, **kwargs: Any) -> EventBase:
        event = self.build(*args, **kwargs)
        return self._store(event.event_id, event.get_pdu_json(), rejected=rejected)

    def member(self, user_id: str, membership: str, sender: str | None = None) -> EventBase:
        return self.add(sender or user_id, EventTypes.Member, {"membership": membership}, user_id)

    def power_levels(self, users: dict[str, int], sender: str = CREATOR, **kwargs: Any) -> EventBase:
        if not self.msc4291:
            users = {CREATOR: 100, **users}
        content = {
            "users": users, "users_default": 0, "events_default": 0, "state_default": 50,
            "ban": 50, "kick": 50, "redact": 50, "invite": 0,
            "events": {"m.room.power_levels": 100},
        }
        return self.add(sender, EventTypes.PowerLevels, content, "", **kwargs)


def build_room(version: str) -> tuple[Room, dict[str, dict[tuple[str, str], str]]]:
    """The room, and the full state at the named points of its history."""
    room = Room(version)
    room.member(CREATOR, "join")
    room.power_levels({MOD: 50})
    room.add(CREATOR, EventTypes.JoinRules, {"join_rule": "public"}, "")
    room.member(MOD, "join")
    for i in range(10):
        room.member(user(i), "join")
    early = dict(room.state)  # everyone joined, the first power levels
    room.add(MOD, EventTypes.Topic, {"topic": "hello"}, "")
    room.power_levels({MOD: 50, user(1): 50})
    room.member(user(2), "ban", MOD)
    room.member(user(3), "leave", MOD)
    room.member(user(4), "leave")
    # Stored, but rejected: u6 has no power to change the power levels.
    room.power_levels({user(6): 100}, sender=user(6), rejected=True)
    fork = list(room.tip)
    before_fork = dict(room.state)
    # One side: the moderator demoted. The other: the moderator bans u5.
    room.power_levels({user(1): 50})
    side_x = dict(room.state)
    room.state, room.tip = dict(before_fork), fork
    room.member(user(5), "ban", MOD)
    side_y = dict(room.state)
    return room, {"early": early, "x": side_x, "y": side_y}


def partial(full: dict[tuple[str, str], str], members: list[str]) -> dict[tuple[str, str], str]:
    """`full` without the memberships of anyone but `members` (MSC3706)."""
    return {
        key: event_id
        for key, event_id in full.items()
        if key[0] != EventTypes.Member or key[1] in members
    }


def incoming(room: Room, states: dict[str, dict[tuple[str, str], str]]) -> list[tuple[str, EventBase]]:
    """The events to check, each with a name; auth events claimed from the
    newest state unless said otherwise."""
    now = states["y"]
    early = states["early"]
    message = {"msgtype": "m.text", "body": "hi"}
    m = EventTypes.Member
    return [
        ("message by a member the partial state holds", room.build(user(1), "m.room.message", message, claim=now)),
        ("message by a member it omits", room.build(user(6), "m.room.message", message, claim=now)),
        ("message by the creator", room.build(CREATOR, "m.room.message", message, claim=now)),
        ("message by a banned user, claiming his old join", room.build(user(2), "m.room.message", message, claim=early)),
        ("message by a banned user, claiming the ban", room.build(user(2), "m.room.message", message, claim=now)),
        ("message by a kicked user, claiming his old join", room.build(user(3), "m.room.message", message, claim=early)),
        ("message by u5, banned on one side of the fork", room.build(user(5), "m.room.message", message, claim=states["x"])),
        ("power levels by u1 (50 of 100)", room.build(user(1), EventTypes.PowerLevels, {"users": {user(1): 100}}, "", claim=now)),
        ("power levels by the creator", room.build(CREATOR, EventTypes.PowerLevels, {"users": {MOD: 50}, "state_default": 50}, "", claim=now)),
        ("power levels by the moderator, claiming the early power levels", room.build(MOD, EventTypes.PowerLevels, {"users": {MOD: 100}}, "", claim=early)),
        ("topic by the moderator", room.build(MOD, EventTypes.Topic, {"topic": "t"}, "", claim=now)),
        ("topic by the moderator, demoted on one side", room.build(MOD, EventTypes.Topic, {"topic": "t"}, "", claim=states["x"])),
        ("kick of u0 by the moderator", room.build(MOD, m, {"membership": "leave"}, user(0), claim=now)),
        ("kick of u0 by the moderator, claiming the early power levels", room.build(MOD, m, {"membership": "leave"}, user(0), claim=early)),
        ("kick of u0 by the demoted moderator", room.build(MOD, m, {"membership": "leave"}, user(0), claim=states["x"])),
        ("ban of u6 by u1", room.build(user(1), m, {"membership": "ban"}, user(6), claim=now)),
        ("ban of the moderator by u0", room.build(user(0), m, {"membership": "ban"}, MOD, claim=now)),
        ("ban of the creator by the moderator", room.build(MOD, m, {"membership": "ban"}, CREATOR, claim=now)),
        ("join of a new user", room.build(user(99), m, {"membership": "join"}, user(99), claim=now)),
        ("join of the kicked u3", room.build(user(3), m, {"membership": "join"}, user(3), claim=now)),
        ("join of the banned u2", room.build(user(2), m, {"membership": "join"}, user(2), claim=now)),
        ("join of the banned u2, claiming his old join", room.build(user(2), m, {"membership": "join"}, user(2), claim=early)),
        ("rejoin of u1", room.build(user(1), m, {"membership": "join", "displayname": "one"}, user(1), claim=now)),
        ("invite of a new user by u0", room.build(user(0), m, {"membership": "invite"}, user(98), claim=now)),
        ("leave of u7", room.build(user(7), m, {"membership": "leave"}, user(7), claim=now)),
    ]


def partial_states(room: Room, states: dict[str, dict[tuple[str, str], str]]) -> dict[str, dict[tuple[str, str], str]]:
    everyone = [CREATOR, MOD, *(user(i) for i in range(100))]
    heroes = [CREATOR, MOD, user(1)]
    return {
        "x, creator only": partial(states["x"], [CREATOR]),
        "x, heroes": partial(states["x"], heroes),
        "y, heroes": partial(states["y"], heroes),
        "y, heroes and the banned and kicked": partial(states["y"], [*heroes, user(2), user(3), user(5)]),
        "y, no member": partial(states["y"], []),
        "y, all members": partial(states["y"], everyone),
        "early, all members": partial(states["early"], everyone),
    }


# The comparison.


async def _persist(hs: SynapseHomeServer, room: Room) -> None:
    store = hs.get_datastores().main
    storage = hs.get_storage_controllers()
    await store.store_room(room.room_id, CREATOR, False, room.version)
    pairs = []
    for event in room.events:
        event.internal_metadata.outlier = True
        context = EventContext.for_outlier(storage)
        if event.event_id in room.rejected:
            context.rejected = "auth_error"
        pairs.append((event, context))
    await storage.persistence.persist_events(pairs)


async def _verdict(hs: SynapseHomeServer, hook: Hook, event: EventBase, state_group: int, ours: bool) -> tuple[Any, Any]:
    """Synapse's `_check_event_auth` on `event` with a partial context."""
    hook.ours = ours
    hook.calculated = None
    built = make_event_from_dict(event.get_pdu_json(), event.room_version)
    context = EventContext.with_state(
        storage=hs.get_storage_controllers(),
        state_group=None,
        state_group_before_event=state_group,
        state_delta_due_to_event=None,
        partial_state=True,
        state_group_deltas={},
    )
    try:
        await hs.get_federation_event_handler()._check_event_auth(None, built, context)
        outcome: Any = context.rejected
    except Exception as e:  # the same error either way is the same verdict
        outcome = f"raised {type(e).__name__}: {e}"
    calculated = None if hook.calculated is None else sorted(hook.calculated)
    return outcome, calculated


@pytest.mark.parametrize("version", ["10", "12"])
@pytest_twisted.ensureDeferred
async def test_partial_state_auth_matches_synapse(hs_and_hook, version: str) -> None:
    hs, hook = hs_and_hook
    room, states = build_room(version)
    await _persist(hs, room)
    storage = hs.get_storage_controllers()
    resolver = hs.get_state_resolution_handler()
    auth_handler = hs.get_event_auth_handler()
    state_res_store = StateResolutionStore(hs.get_datastores().main, hs.get_datastores().state_deletion)

    taken: collections.Counter = collections.Counter()
    mismatches = []
    for p_name, p_state in partial_states(room, states).items():
        group = await storage.state.store_state_group(
            room.events[-1].event_id, room.room_id, None, None, p_state
        )
        for e_name, event in incoming(room, states):
            # Key by key, where the module answers, against the resolution.
            claimed = {}
            for event_id in event.auth_event_ids():
                ev = await hs.get_datastores().main.get_event(event_id, allow_rejected=True)
                claimed[(ev.type, ev.state_key)] = ev.event_id
            resolved = await resolver.resolve_events_with_store(
                room.room_id, version, [p_state, claimed], None, state_res_store
            )
            ours = auth_state_from_unconflicted(event, p_state, claimed)
            way = "unconflicted" if ours is not None else "resolved"
            if ours is not None:
                at_keys = {k: resolved.get(k) for k in auth_types_for_event(room.version, event)}
                if ours != at_keys or auth_handler.compute_auth_events(
                    event, ours, for_verification=True
                ) != auth_handler.compute_auth_events(event, resolved, for_verification=True):
                    mismatches.append((p_name, e_name, "answer", ours, at_keys))

            # The verdict, through Synapse's _check_event_auth, both ways.
            before = (hook.module.unconflicted, hook.module.resolved_at_auth_keys + hook.module.resolved)
            synapse_verdict = await _verdict(hs, hook, event, group, ours=False)
            module_verdict = await _verdict(hs, hook, event, group, ours=True)
            if synapse_verdict != module_verdict:
                mismatches.append((p_name, e_name, "verdict", synapse_verdict, module_verdict))
            after = (hook.module.unconflicted, hook.module.resolved_at_auth_keys + hook.module.resolved)
            if after != before:  # the module was asked (the claimed auth events passed)
                used = "unconflicted" if after[0] > before[0] else "resolved"
                assert used == way, (p_name, e_name, used, way)
            else:
                used = "rejected on its claimed auth events"
            taken[(used, "rejected" if module_verdict[0] else "accepted")] += 1

    assert not mismatches, "\n".join(map(str, mismatches))
    # The resolutions were all computed at the auth keys, none left to
    # Synapse's whole resolution.
    assert hook.module.resolved_at_auth_keys > 0 and hook.module.resolved == 0
    # Both ways were taken; the resolution with accepted and rejected events.
    # (Where every auth key is unconflicted the answer is the claimed auth
    # events, which passed the auth rules just before: such an event is never
    # rejected at this step. Its rejections happen on the claimed auth events,
    # before the module is asked.)
    assert taken[("unconflicted", "rejected")] == 0
    for key in [
        ("unconflicted", "accepted"),
        ("resolved", "accepted"),
        ("resolved", "rejected"),
        ("rejected on its claimed auth events", "rejected"),
    ]:
        assert taken[key] > 0, f"never {key}: {dict(taken)}"


@pytest.mark.parametrize("version", ["10", "12"])
@pytest_twisted.ensureDeferred
async def test_the_partial_state_restricted_to_the_auth_keys_is_not_enough(hs_and_hook, version: str) -> None:
    """Why the module does not resolve only the auth keys of the partial state.

    X (power 50, enough to change the power levels) raises S with power levels
    PL_a while, concurrently, the creator bans X. The partial state holds the
    ban and the older power levels PL_p; S's topic change claims PL_a. In the
    full resolution the ban of X, at a key the topic change never reads, is a
    power event sorted before PL_a (its sender has more power), so PL_a is
    rejected and S's topic change with it. Resolving the auth keys alone
    leaves the ban out and accepts PL_a. The module, seeing the power levels
    conflicted, lets Synapse resolve: the verdicts agree (rejected).
    """
    hs, hook = hs_and_hook
    x, s = user(50), user(51)
    room = Room(version, name="restricted")
    room.member(CREATOR, "join")

    def levels(users: dict[str, int]) -> dict[str, Any]:
        if not room.msc4291:
            users = {CREATOR: 100, **users}
        return {
            "users": users, "users_default": 0, "events_default": 0, "state_default": 50,
            "ban": 50, "kick": 50, "redact": 50, "invite": 0,
            "events": {"m.room.power_levels": 50},
        }

    room.add(CREATOR, EventTypes.PowerLevels, levels({x: 50}), "")
    room.add(CREATOR, EventTypes.JoinRules, {"join_rule": "public"}, "")
    room.member(x, "join")
    room.member(s, "join")
    fork, before = list(room.tip), dict(room.state)
    room.member(x, "ban", CREATOR)
    banned = dict(room.state)
    room.state, room.tip = dict(before), fork
    room.add(x, EventTypes.PowerLevels, levels({x: 50, s: 50}), "")
    raised = dict(room.state)
    await _persist(hs, room)

    topic = room.build(s, EventTypes.Topic, {"topic": "by s"}, "", claim=raised)
    p_state = partial(banned, [CREATOR, x, s])
    claimed = {k: raised[k] for k in raised if raised[k] in topic.auth_event_ids()}
    keys = auth_types_for_event(room.version, topic)
    resolver = hs.get_state_resolution_handler()
    auth_handler = hs.get_event_auth_handler()
    store = StateResolutionStore(hs.get_datastores().main, hs.get_datastores().state_deletion)
    full = await resolver.resolve_events_with_store(room.room_id, version, [p_state, claimed], None, store)
    restricted = await resolver.resolve_events_with_store(
        room.room_id, version, [{k: v for k, v in p_state.items() if k in keys}, claimed], None, store
    )
    pl = (EventTypes.PowerLevels, "")
    assert full[pl] == banned[pl] and restricted[pl] == raised[pl]
    assert auth_handler.compute_auth_events(topic, full, True) != auth_handler.compute_auth_events(
        topic, restricted, True
    )

    assert auth_state_from_unconflicted(topic, p_state, claimed) is None
    group = await hs.get_storage_controllers().state.store_state_group(
        room.events[-1].event_id, room.room_id, None, None, p_state
    )
    synapse_verdict = await _verdict(hs, hook, topic, group, ours=False)
    module_verdict = await _verdict(hs, hook, topic, group, ours=True)
    assert synapse_verdict == module_verdict
    assert synapse_verdict[0] == "auth_error"
