"""The engine's catch-up runs and changed verdicts (resync/engine.py): a run
of events re-checked against full state is written at its end, so it must end
after an event whose rejection status the re-check changed (a later event
naming it among its auth events would be checked against its old status), and
the user of a membership event whose verdict changed is remembered for the
device-list check at the end of the resync."""

from contextlib import asynccontextmanager
from typing import Any

import synapse.server  # noqa: F401  (imports Synapse in the order the module does)
from synapse.api.room_versions import RoomVersions
from synapse.events import EventBase, make_event_from_dict

from synapse_fastjoin.resync.engine import _RoomResync
from synapse_fastjoin.resync.progress import ResyncProgress
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

        class DbPool:
            async def runInteraction(self, desc: str, func: Any, *args: Any) -> Any:
                return func(None, *args)

        self.db_pool = DbPool()
        self.main = main

    async def have_events_in_timeline(self, ids):
        return {i for i in ids if i == "$stored"}

    async def get_partial_state_events(self, ids):
        return {i: False for i in ids}

    def _update_state_for_partial_state_event_txn(self, txn, event, context, stream_id):
        # The partial flag must be cached before the write commits.
        assert event.event_id in self.held, event.event_id
        self.written.append(event.event_id)


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


def _resync(flip: set[str]) -> tuple[_RoomResync, FakeMain, FakeFederationEventHandler]:
    r = object.__new__(_RoomResync)
    main = FakeMain()
    handler = FakeFederationEventHandler(flip)
    r._main = main
    r._storage = FakeStorage()
    r._federation_event_handler = handler
    r._notifier = FakeNotifier()
    r._progress = ResyncProgress(ROOM)
    r._membership_flipped = set()
    return r, main, handler


def _chain(kick_rejected=None):
    e1 = _event(10, ["$stored"])
    kick = _event(11, [e1.event_id], member=ELSIE, rejected=kick_rejected)
    e3 = _event(12, [kick.event_id])
    e4 = _event(13, [e3.event_id])
    return [e1, kick, e3, e4]


def test_a_run_without_changed_verdicts_is_written_whole():
    events = _chain()
    r, main, _ = _resync(flip=set())
    assert run(r._catch_up_run(events)) == 4
    assert main.written == [e.event_id for e in events]
    assert r._membership_flipped == set()


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
