"""The engine's catch-up runs and changed verdicts (resync/engine.py): a run
of events re-checked against full state is written at its end, so it must end
after an event whose rejection status the re-check changed (a later event
naming it among its auth events would be checked against its old status), and
the user of a membership event whose verdict changed is remembered for the
device-list check at the end of the resync."""

from contextlib import asynccontextmanager
from typing import Any

import pytest
import synapse.server  # noqa: F401  (imports Synapse in the order the module does)
from synapse.api.room_versions import RoomVersions
from synapse.events import EventBase, make_event_from_dict

from synapse_fastjoin.resync import engine
from synapse_fastjoin.resync.engine import _RoomResync
from synapse_fastjoin.resync.progress import ResyncProgress
from synapse_fastjoin.storage.state_groups import (
    delete_unused_groups_txn,
    state_at_keys_txn,
    store_state_group_chain_txn,
)
from tests.harness.sync_run import run

V10 = RoomVersions.V10
ROOM = "!room:resident.test"
ELSIE = "@elsie:resident.test"
CHARLIE = "@charlie:resident.test"



def _event(depth: int, prev: list[str], member: str | None = None, rejected=None) -> EventBase:
    d: dict[str, Any] = {
        "room_id": ROOM,
        "depth": depth,
        "prev_events": prev,
        "auth_events": [],
        "origin_server_ts": 1_700_000_000_000 + depth,
        "hashes": {"sha256": "x"},
        "signatures": {},
    }
    if member:
        d.update(type="m.room.member", sender=CHARLIE, state_key=member, content={"membership": "leave"})
    else:
        d.update(type="m.room.message", sender=CHARLIE, content={"body": str(depth)})
    return make_event_from_dict(d, V10, rejected_reason=rejected)


class FakeMain:
    def __init__(self) -> None:
        self.written: list[str] = []
        # Per write, the callbacks its transaction runs after it commits.
        self.after_callbacks: list[list] = []
        self.warmed_events: set[str] = set()
        # event id -> (state group before, state group after), as written.
        self.groups: dict[str, tuple[int, int]] = {}
        # Flags cached as partial before the write (see _hold_partial_flags).
        self.held: set[str] = set()
        main = self

        class FlagCache:
            def prefill(_self, key: tuple, value: bool) -> None:  # noqa: N805
                assert value is True
                main.held.add(key[0])

        self.is_partial_state_event = FlagCache()

        class IdGen:
            @asynccontextmanager
            async def get_next_mult(_self, n: int):  # noqa: N805
                yield list(range(n))

        self._un_partial_stated_events_stream_id_gen = IdGen()

        class Txn:
            def __init__(self) -> None:
                self.after_callbacks: list = []

        class DbPool:
            async def runInteraction(self, desc: str, func: Any, *args: Any) -> Any:
                txn = Txn()
                result = func(txn, *args)
                main.after_callbacks.append([entry[0] for entry in txn.after_callbacks])
                return result

        self.db_pool = DbPool()
        self.main = main

    def flag_cleared(self, event_id: str) -> None:
        pass

    async def have_events_in_timeline(self, ids):
        return {i for i in ids if i == "$stored"}

    async def get_partial_state_events(self, ids):
        return {i: False for i in ids}

    async def get_events(self, ids, allow_rejected=False):
        # The run's caches are filled before its checks (one read).
        self.warmed_events.update(ids)
        return {}

    def un_partial_state_events_txn(self, txn, store, items):
        """Stands for storage/partial_state.py's (its rows are compared with
        Synapse's in test_un_partial_state_events.py): records the write."""
        assert store is self
        for event, context, _stream_id in items:
            # The partial flag must be cached before the write commits.
            assert event.event_id in self.held, event.event_id
            self.written.append(event.event_id)
            txn.after_callbacks.append((self.flag_cleared, (event.event_id,), {}))
            self.groups[event.event_id] = (context.state_group_before_event, context._state_group)
        # The replication listeners woken after the commit, once.
        txn.after_callbacks.append((self.notifier.on_new_replication_data, (), {}))


class FakeStateStorage:
    def __init__(self) -> None:
        self.next_group = 100

    async def get_state_group_for_events(self, ids, await_full_state=True):
        return {i: 1 for i in ids}

    async def store_state_group(self, event_id, room_id, prev_group, delta_ids, current_state_ids):
        self.next_group += 1
        return self.next_group

    def notify_event_un_partial_stated(self, event_id: str) -> None:
        pass


class FakeStorage:
    def __init__(self) -> None:
        self.state = FakeStateStorage()


class FakeDictionaryCache:
    def __init__(self) -> None:
        self.sequence = 1
        self.entries: dict[int, tuple[dict, set]] = {}

    def update(self, sequence, key, value, fetched_keys=None) -> None:
        assert sequence == self.sequence
        self.entries[key] = (dict(value), set(fetched_keys))


class FakeStateGroups:
    """The state-group store: a chain is written in one call, each group the
    next id (Synapse's own `store_state_group` is FakeStateStorage's); the
    auth state before a run is read once, for its first group."""

    def __init__(self, state: FakeStateStorage) -> None:
        self.chains: list[list] = []
        self.deleted: list[int] = []
        self.read: list[tuple[int, set]] = []
        self._state_group_members_cache = FakeDictionaryCache()
        self._state_group_cache = FakeDictionaryCache()
        groups = self

        class DbPool:
            async def runInteraction(_self, desc: str, func: Any, store: Any, *args: Any) -> Any:  # noqa: N805
                if func is store_state_group_chain_txn:
                    _room, chain = args
                    groups.chains.append(list(chain))
                    ids = []
                    for _ in chain:
                        state.next_group += 1
                        ids.append(state.next_group)
                    return ids
                if func is state_at_keys_txn:
                    group, keys = store, args[0]
                    groups.read.append((group, set(keys)))
                    # Everyone is a member at the first group.
                    return {k: f"$state-{k[1]}" for k in keys}
                assert func is delete_unused_groups_txn
                groups.deleted.extend(args[0])

        self.db_pool = DbPool()


class FakeFederationEventHandler:
    """Re-checks: flips the verdict of the events named in `flip`."""

    def __init__(self, flip: set[str]) -> None:
        self.flip = flip
        self.checked: list[str] = []

    async def _check_event_auth(self, origin, event, context) -> None:
        self.checked.append(event.event_id)
        was_rejected = event.rejected_reason is not None
        now_rejected = was_rejected != (event.event_id in self.flip)
        context.rejected = "auth_error" if now_rejected else None


class FakeNotifier:
    def notify_replication(self) -> None:
        pass

    def on_new_replication_data(self) -> None:
        pass


def _resync(flip: set[str]) -> tuple[_RoomResync, FakeMain, FakeFederationEventHandler]:
    r = object.__new__(_RoomResync)
    main = FakeMain()
    handler = FakeFederationEventHandler(flip)
    r._main = main
    r._storage = FakeStorage()
    r._state_groups = FakeStateGroups(r._storage.state)
    r._room_id = ROOM
    r._federation_event_handler = handler
    r._notifier = FakeNotifier()
    main.notifier = r._notifier
    r._progress = ResyncProgress(ROOM)
    r._membership_flipped = set()
    return r, main, handler


def _chain(kick_rejected=None):
    e1 = _event(10, ["$stored"])
    kick = _event(11, [e1.event_id], member=ELSIE, rejected=kick_rejected)
    e3 = _event(12, [kick.event_id])
    e4 = _event(13, [e3.event_id])
    return [e1, kick, e3, e4]


@pytest.fixture(autouse=True)
def _fake_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """The catch-up's write goes to the fake store's record of it."""
    monkeypatch.setattr(
        engine, "un_partial_state_events_txn", lambda txn, store, *args: store.un_partial_state_events_txn(txn, store, *args)
    )


def test_a_run_without_changed_verdicts_is_written_whole():
    events = _chain()
    r, main, _ = _resync(flip=set())
    assert run(r._catch_up_run(events)) == 4
    assert main.written == [e.event_id for e in events]
    assert r._membership_flipped == set()
    # The write wakes the replication listeners once, not once per event;
    # every other callback stays.
    (callbacks,) = main.after_callbacks
    assert callbacks.count(r._notifier.on_new_replication_data) == 1
    assert callbacks.count(main.flag_cleared) == 4


def test_a_run_ends_after_an_event_whose_verdict_changed():
    # The kick was rejected against partial state; full state accepts it.
    events = _chain(kick_rejected="auth_error")
    kick = events[1]
    r, main, handler = _resync(flip={kick.event_id})
    assert run(r._catch_up_run(events)) == 2
    # Written up to and including the kick; the events after it are checked
    # in the next run, against the kick's new status.
    assert main.written == [events[0].event_id, kick.event_id]
    assert handler.checked == [events[0].event_id, kick.event_id]
    assert r._membership_flipped == {ELSIE}


def test_a_message_whose_verdict_changed_names_no_user():
    events = _chain()
    r, main, _ = _resync(flip={events[0].event_id})
    assert run(r._catch_up_run(events)) == 1
    assert r._membership_flipped == set()


def _chain_with_two_state_events(kick_rejected=None):
    e1, kick, e3, _ = _chain(kick_rejected=kick_rejected)
    later = _event(13, [e3.event_id], member="@frank:resident.test")
    e5 = _event(14, [later.event_id])
    return [e1, kick, e3, later, e5]


def test_the_state_groups_of_a_run_are_written_as_one_chain():
    events = _chain_with_two_state_events()
    e1, kick, e3, later, e5 = events
    r, main, _ = _resync(flip=set())
    assert run(r._catch_up_run(events)) == 5
    # One write of both groups: the second a delta over the first.
    (chain,) = r._state_groups.chains
    assert [(item[0], item[1] if isinstance(item[1], int) else ("ref", item[1].index)) for item in chain] == [
        (kick.event_id, 1),
        (later.event_id, ("ref", 0)),
    ]
    assert chain[1][2] == {("m.room.member", "@frank:resident.test"): later.event_id}
    assert main.groups == {
        e1.event_id: (1, 1),
        kick.event_id: (1, 101),
        e3.event_id: (101, 101),
        later.event_id: (101, 102),
        e5.event_id: (102, 102),
    }
    assert r._state_groups.deleted == []
    # The auth state is read once, for the run's first group, at the auth
    # keys of all its events; the run's own groups are that state with their
    # deltas applied, and all three go into the state-group caches.
    ((group, keys),) = r._state_groups.read
    assert group == 1
    assert ("m.room.member", CHARLIE) in keys and ("m.room.member", ELSIE) in keys
    members = r._state_groups._state_group_members_cache.entries
    assert sorted(members) == [1, 101, 102]
    frank = ("m.room.member", "@frank:resident.test")
    assert members[1][0][("m.room.member", ELSIE)] == f"$state-{ELSIE}"
    assert members[101][0][("m.room.member", ELSIE)] == kick.event_id
    assert members[102][0][("m.room.member", ELSIE)] == kick.event_id
    assert members[102][0][frank] == later.event_id
    assert all(fetched == members[1][1] for _, fetched in members.values())
    # One read of the run's auth events and the state's events.
    assert {kick.event_id, later.event_id} <= main.warmed_events


def test_a_rejected_state_event_passes_its_state_on_unchanged():
    events = _chain_with_two_state_events(kick_rejected="auth_error")
    e1, kick, e3, later, e5 = events
    r, main, _ = _resync(flip=set())
    assert run(r._catch_up_run(events)) == 5
    # The kick still gets its own group (as in Synapse), but the events after
    # it have the state before it.
    assert main.groups[kick.event_id] == (1, 101)
    assert main.groups[e3.event_id] == (1, 1)
    assert main.groups[later.event_id] == (1, 102)
    assert r._state_groups.chains[0][1][1] == 1


def test_groups_written_ahead_of_a_changed_verdict_are_removed():
    # Full state accepts the kick the partial state rejected: the later
    # state event's group was chained on the kick's rejection and is removed.
    events = _chain_with_two_state_events(kick_rejected="auth_error")
    e1, kick = events[:2]
    r, main, handler = _resync(flip={kick.event_id})
    assert run(r._catch_up_run(events)) == 2
    assert main.written == [e1.event_id, kick.event_id]
    assert r._state_groups.deleted == [102]


def test_a_check_that_fails_leaves_no_state_group_of_the_run():
    events = _chain_with_two_state_events()
    r, main, handler = _resync(flip=set())

    async def fail_on_e3(origin, event, context):
        if event.event_id == events[2].event_id:
            raise RuntimeError("an auth event could not be loaded")
        context.rejected = None

    handler._check_event_auth = fail_on_e3
    try:
        run(r._catch_up_run(events))
    except RuntimeError:
        pass
    else:
        raise AssertionError("the failure was swallowed")
    assert main.written == []
    assert sorted(r._state_groups.deleted) == [101, 102]
