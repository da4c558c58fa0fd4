"""Generated rooms: a validly signed event DAG of any size, cached on disk.

A room is a create event, the creator's join, power levels, join rules,
history visibility, optionally a name and topic, some moderators, `history`
power-level and topic changes (so the auth chain of the non-member state has
depth), then `members` joins by users spread over `servers` server names.
Every event is signed by its sender's server with that server's own key
(`keys.signing_key`), with correct hashes, auth_events, prev_events and depth.

The DAG the generator writes is a single chain. Events added later (live
traffic, events received from the joining server) may fork it; the state this
fake computes is then the last-writer-wins union of the state events among an
event's ancestors, which is the real state unless two branches change the same
state key, something the scenarios here never do.

Room versions 10, 11 and 12 (the default, as in Synapse 1.163). In 12 (MSC4291,
MSC4289) the room id is `!` + the create event's id (the create event has no
`room_id` and is never listed in `auth_events`), and the creator's power comes
from being the creator: the power levels do not list them.
"""

import json
import logging
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

import attr
from canonicaljson import encode_canonical_json

from tests.harness.fakehs.events import finalise_event, room_version

logger = logging.getLogger(__name__)

# Bump when the generator's output changes, so stale caches are not reused.
GENERATOR_VERSION = 2

ORIGIN = "hq.fake"
"""The server name of the room's creator and moderators."""

_BASE_TS = 1_700_000_000_000

StateKey = tuple[str, str]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class RoomSpec:
    """What room to generate. Equal specs give byte-identical rooms."""

    members: int
    """Joins by ordinary members (the creator and moderators come on top)."""
    servers: int
    """Distinct server names the members are spread over."""
    history: int = 40
    """Historical power-level and topic changes before the members join."""
    moderators: int = 4
    room_version: str = "12"
    named: bool = True
    """Give the room a name and topic; a nameless room makes residents send heroes."""

    def __attrs_post_init__(self) -> None:
        room_version(self.room_version)  # validates
        if self.members < 0 or self.servers < 1 or self.history < 0:
            raise ValueError(f"bad room spec {self}")

    @property
    def cache_name(self) -> str:
        return (
            f"room-g{GENERATOR_VERSION}-v{self.room_version}-m{self.members}"
            f"-s{self.servers}-h{self.history}-mod{self.moderators}"
            f"-{'named' if self.named else 'nameless'}"
        )

    @property
    def room_id(self) -> str:
        if room_version(self.room_version).msc4291_room_ids_as_hashes:
            # MSC4291: the create event's id, as a room id.
            return "!" + _create_event(self)[0][1:]
        return f"!{self.cache_name}:{ORIGIN}"

    @property
    def creator(self) -> str:
        return f"@creator:{ORIGIN}"

    def moderator(self, i: int) -> str:
        return f"@mod{i}:{ORIGIN}"

    def server_name(self, j: int) -> str:
        return f"s{j:05d}.fake"

    def member(self, i: int) -> str:
        return f"@u{i:07d}:{self.server_name(i % self.servers)}"

    def server_names(self) -> list[str]:
        """Every server with a member in the generated room."""
        return [ORIGIN] + [self.server_name(j) for j in range(min(self.servers, self.members))]


@attr.s(slots=True, auto_attribs=True)
class StoredEvent:
    """One event: the fields the fake needs, and the exact JSON it serves."""

    event_id: str
    type: str
    state_key: str | None
    sender: str
    depth: int
    prev_events: tuple[str, ...]
    auth_events: tuple[str, ...]
    json: bytes
    membership: str | None = None

    @property
    def is_state(self) -> bool:
        return self.state_key is not None

    @classmethod
    def from_dict(cls, event_id: str, event: dict[str, Any], raw: bytes | None = None) -> "StoredEvent":
        return cls(
            event_id=event_id,
            type=event["type"],
            state_key=event.get("state_key"),
            sender=event["sender"],
            depth=int(event["depth"]),
            prev_events=tuple(event["prev_events"]),
            auth_events=tuple(event["auth_events"]),
            json=raw if raw is not None else encode_canonical_json(event),
            membership=(
                event.get("content", {}).get("membership")
                if event["type"] == "m.room.member"
                else None
            ),
        )

    def as_dict(self) -> dict[str, Any]:
        return json.loads(self.json)


class Room:
    """An event DAG with the queries a resident server answers from it."""

    def __init__(self, spec: RoomSpec) -> None:
        self.spec = spec
        self.room_id = spec.room_id
        self.version = room_version(spec.room_version)
        self.events: list[StoredEvent] = []
        self.by_id: dict[str, StoredEvent] = {}
        self._index: dict[str, int] = {}
        self._children: set[str] = set()
        # Events with no children yet, in the order they were added.
        self._extremities: dict[str, None] = {}
        self.current_state: dict[StateKey, str] = {}
        """State after the newest event (the tip of the generated chain and what
        followed it)."""

    # Building.

    def add(self, event: StoredEvent) -> bool:
        """Append an event; False if it was already there."""
        if event.event_id in self.by_id:
            return False
        self._index[event.event_id] = len(self.events)
        self.events.append(event)
        self.by_id[event.event_id] = event
        self._children.update(event.prev_events)
        for prev in event.prev_events:
            self._extremities.pop(prev, None)
        if event.event_id not in self._children:
            self._extremities[event.event_id] = None
        if event.is_state:
            self.current_state[(event.type, event.state_key)] = event.event_id
        return True

    def forward_extremities(self) -> list[str]:
        return list(self._extremities)[-10:]

    def create_event(
        self,
        sender: str,
        event_type: str,
        content: dict[str, Any],
        state_key: str | None = None,
        origin_server_ts: int | None = None,
        prev_events: list[str] | None = None,
    ) -> StoredEvent:
        """Build, sign (by the sender's server) and append an event that follows
        the current forward extremities, with the auth events the rules need."""
        prev = prev_events if prev_events is not None else self.forward_extremities()
        depth = max((self.by_id[p].depth for p in prev), default=0) + 1
        event: dict[str, Any] = {
            "type": event_type,
            "sender": sender,
            "content": content,
            "origin_server_ts": origin_server_ts or int(time.time() * 1000),
            "depth": depth,
            "prev_events": prev,
            "auth_events": self.auth_events_for(event_type, sender, state_key, content),
        }
        if state_key is not None:
            event["state_key"] = state_key
        if not (event_type == "m.room.create" and self.version.msc4291_room_ids_as_hashes):
            # MSC4291: the create event has no room id; its id is the room's.
            event["room_id"] = self.room_id
        event_id = finalise_event(self.version, event, sender.split(":", 1)[1])
        stored = StoredEvent.from_dict(event_id, event)
        self.add(stored)
        return stored

    def auth_events_for(
        self, event_type: str, sender: str, state_key: str | None, content: dict[str, Any]
    ) -> list[str]:
        """The auth events the auth rules select for a new event, from the current state."""
        if event_type == "m.room.create":
            return []
        wanted: list[StateKey] = [("m.room.power_levels", "")]
        if not self.version.msc4291_room_ids_as_hashes:
            # MSC4291: the create event is implied by the room id, never listed.
            wanted.insert(0, ("m.room.create", ""))
        wanted.append(("m.room.member", sender))
        if event_type == "m.room.member":
            assert state_key is not None
            wanted.append(("m.room.member", state_key))
            if content.get("membership") in ("join", "invite", "knock"):
                wanted.append(("m.room.join_rules", ""))
        ids: list[str] = []
        for key in wanted:
            event_id = self.current_state.get(key)
            if event_id is not None and event_id not in ids:
                ids.append(event_id)
        return ids

    # Queries.

    def index_of(self, event_id: str) -> int:
        return self._index[event_id]

    def ancestors(self, event_id: str) -> set[str]:
        """Every event reachable from `event_id` through prev_events (not itself)."""
        seen: set[str] = set()
        todo = list(self.by_id[event_id].prev_events)
        while todo:
            current = todo.pop()
            if current in seen or current not in self.by_id:
                continue
            seen.add(current)
            todo.extend(self.by_id[current].prev_events)
        return seen

    def state_before(self, event_id: str) -> dict[StateKey, str]:
        """The room state before `event_id` (what /state_ids answers)."""
        ancestors = self.ancestors(event_id)
        state: dict[StateKey, str] = {}
        for event in self.events[: self._index[event_id]]:
            if event.is_state and event.event_id in ancestors:
                state[(event.type, event.state_key)] = event.event_id  # type: ignore[index]
        return state

    def auth_chain(self, event_ids: Iterable[str]) -> list[str]:
        """The auth chain of `event_ids` (not including them unless reachable),
        in DAG order."""
        seen: set[str] = set()
        todo = [a for e in event_ids for a in self.by_id[e].auth_events]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            todo.extend(self.by_id[current].auth_events)
        return sorted(seen, key=self._index.__getitem__)

    def joined_members(self, state: dict[StateKey, str] | None = None) -> list[str]:
        state = self.current_state if state is None else state
        return sorted(
            key[1]
            for key, event_id in state.items()
            if key[0] == "m.room.member" and self.by_id[event_id].membership == "join"
        )

    def servers_in_room(self, state: dict[StateKey, str] | None = None) -> list[str]:
        return sorted({user.split(":", 1)[1] for user in self.joined_members(state)})

    def json_list(self, event_ids: Iterable[str]) -> bytes:
        """A JSON array of the events, built from their stored bytes."""
        return b"[" + b",".join(self.by_id[e].json for e in event_ids) + b"]"


def _generate_into(room: Room) -> None:
    spec = room.spec
    ts = iter(range(_BASE_TS, _BASE_TS + 10**9))

    def create(sender: str, event_type: str, content: dict[str, Any], state_key: str | None = None) -> StoredEvent:
        return room.create_event(sender, event_type, content, state_key, next(ts))

    creator = spec.creator
    create_event_id, create_event = _create_event(spec)
    stored = room.create_event(
        creator, "m.room.create", create_event["content"], "", create_event["origin_server_ts"]
    )
    assert stored.event_id == create_event_id
    next(ts)
    create(creator, "m.room.member", {"membership": "join", "displayname": "Creator"}, creator)
    moderators = [spec.moderator(i) for i in range(spec.moderators)]
    users = {m: 50 for m in moderators}
    if not room.version.msc4289_creator_power_enabled:
        users = {creator: 100, **users}
    # else MSC4289: creators have infinite power, and the power levels must
    # not list them.
    power_levels: dict[str, Any] = {
        "users": users,
        "users_default": 0,
        "events_default": 0,
        "state_default": 50,
        "ban": 50,
        "kick": 50,
        "redact": 50,
        "invite": 0,
        "events": {"m.room.power_levels": 100, "m.room.history_visibility": 100},
    }
    create(creator, "m.room.power_levels", power_levels, "")
    create(creator, "m.room.join_rules", {"join_rule": "public"}, "")
    create(creator, "m.room.history_visibility", {"history_visibility": "shared"}, "")
    if spec.named:
        create(creator, "m.room.name", {"name": f"Generated room of {spec.members} members"}, "")
        create(creator, "m.room.topic", {"topic": "topic 0"}, "")
    for i, moderator in enumerate(moderators):
        create(moderator, "m.room.member", {"membership": "join", "displayname": f"Moderator {i}"}, moderator)
    for k in range(spec.history):
        if k % 2 == 0 or not moderators:
            power_levels = dict(power_levels, events=dict(power_levels["events"]))
            power_levels["events"][f"org.example.event{k}"] = 50
            create(creator, "m.room.power_levels", power_levels, "")
        else:
            create(moderators[k % len(moderators)], "m.room.topic", {"topic": f"topic {k}"}, "")
    for i in range(spec.members):
        user = spec.member(i)
        create(user, "m.room.member", {"membership": "join", "displayname": f"User {i}"}, user)


@lru_cache(maxsize=64)
def _create_event(spec: RoomSpec) -> tuple[str, dict[str, Any]]:
    """The room's create event (deterministic, so the room id of an MSC4291
    room is known without generating the room) and its id."""
    content: dict[str, Any] = {"room_version": spec.room_version}
    version = room_version(spec.room_version)
    if not version.implicit_room_creator:
        content["creator"] = spec.creator
    if version.msc4291_room_ids_as_hashes:
        # The room id is the create event's hash: keep rooms of different
        # specs apart.
        content["org.example.generated"] = spec.cache_name
    event: dict[str, Any] = {
        "type": "m.room.create",
        "state_key": "",
        "sender": spec.creator,
        "content": content,
        "origin_server_ts": _BASE_TS,
        "depth": 1,
        "prev_events": [],
        "auth_events": [],
    }
    if not version.msc4291_room_ids_as_hashes:
        event["room_id"] = spec.room_id
    return finalise_event(version, event, ORIGIN), event


def _cache_dir() -> Path:
    root = os.environ.get("FASTJOIN_CACHE") or str(Path(__file__).resolve().parents[3] / ".cache")
    return Path(root) / "fakehs-rooms"


def load_or_generate(spec: RoomSpec, cache_dir: Path | None = None) -> Room:
    """The room for `spec`, from the disk cache when it is there; generated
    (and cached) otherwise."""
    directory = cache_dir or _cache_dir()
    path = directory / f"{spec.cache_name}.jsonl"
    room = Room(spec)
    if path.exists():
        started = time.monotonic()
        for event_id, raw in _read_jsonl(path):
            room.add(StoredEvent.from_dict(event_id, json.loads(raw), raw))
        logger.info("Loaded %d events of %s in %.1fs", len(room.events), spec.cache_name, time.monotonic() - started)
        return room
    started = time.monotonic()
    _generate_into(room)
    logger.info("Generated %d events of %s in %.1fs", len(room.events), spec.cache_name, time.monotonic() - started)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        for event in room.events:
            f.write(event.event_id.encode() + b"\t" + event.json + b"\n")
    os.replace(tmp, path)
    return room


def _read_jsonl(path: Path) -> Iterator[tuple[str, bytes]]:
    with open(path, "rb") as f:
        for line in f:
            event_id, raw = line.rstrip(b"\n").split(b"\t", 1)
            yield event_id.decode(), raw
