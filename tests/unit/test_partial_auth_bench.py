"""What authorising an event received while partial costs, by the size of the
partial state (run with FASTJOIN_PARTIAL_AUTH_BENCH=1; prints a table).

A real in-process HomeServer (SQLite) holds a room (version 10) with N
non-member state events besides its create event, power levels, join rules
and members, persisted as outliers; its partial state (everything but the
memberships of ten members) is stored as a state group. Each incoming message
goes through Synapse's `_check_event_auth` with a partial context:

- `resolved, distinct senders`: the sender's membership is not in the partial
  state, so Synapse resolves the whole partial state with the claimed auth
  events (each sender a different conflicted set: no cache helps);
- `resolved, same sender`: the same, one sender again and again (Synapse's
  own cache of resolved conflicted sets hits);
- `sender in the partial state`: every auth key is unconflicted; Synapse
  still resolves the whole partial state, the module answers from the
  partial state at the auth keys.

Measured on 2026-12-02 (2 shared cores, a long benchmark running beside it, so
absolute numbers are high; the ratios are the point):

    partial state      Synapse, distinct   Synapse, same   Synapse, sender   module, sender
    keys               senders             sender          in partial state  in partial state
    5,005              1.3 s/event         0.57 s/event    0.43 s/event      1.4 ms/event
    50,005             31 s/event          25 s/event      12 s/event        1.0 ms/event
"""

import os
import time

import pytest
import pytest_twisted

from synapse.api.constants import EventTypes
from synapse.events import make_event_from_dict
from synapse.events.snapshot import EventContext

from tests.harness.inprocess import shut_down
from tests.unit.test_partial_auth_parity import CREATOR, Hook, Room, _make_homeserver, partial, user

pytestmark = pytest.mark.skipif(
    not os.environ.get("FASTJOIN_PARTIAL_AUTH_BENCH"), reason="set FASTJOIN_PARTIAL_AUTH_BENCH=1"
)

# Events timed per way, by partial-state size (a resolution of 50,000 keys
# takes seconds).
SIZES = {5_000: 10, 50_000: 3}
EVENTS = max(SIZES.values())
# Events timed through the module's own resolution (distinct senders).
MODULE_EVENTS = 100


@pytest.fixture(scope="module")
def hs_and_hook(tmp_path_factory: pytest.TempPathFactory):
    hs = _make_homeserver(str(tmp_path_factory.mktemp("partial-auth-bench")))
    hook = Hook(hs)
    hs.get_module_api().register_fastjoin_callbacks(state_for_auth_while_partial=hook)
    yield hs, hook
    shut_down(hs)


async def _persist_in_batches(hs, room: Room, start: int) -> None:
    storage = hs.get_storage_controllers()
    events = room.events[start:]
    for i in range(0, len(events), 1000):
        pairs = []
        for event in events[i : i + 1000]:
            event.internal_metadata.outlier = True
            pairs.append((event, EventContext.for_outlier(storage)))
        await storage.persistence.persist_events(pairs)


@pytest.mark.parametrize("size", list(SIZES))
@pytest_twisted.ensureDeferred
async def test_partial_state_auth_cost(hs_and_hook, size: int) -> None:
    hs, hook = hs_and_hook
    room = Room("10", name=f"bench{size}")
    room.member(CREATOR, "join")
    room.power_levels({})
    room.add(CREATOR, EventTypes.JoinRules, {"join_rule": "public"}, "")
    for i in range(MODULE_EVENTS + 2):
        room.member(user(i), "join")
    for i in range(size):
        room.add(CREATOR, "org.example.state", {"i": i}, str(i))
    store = hs.get_datastores().main
    await store.store_room(room.room_id, CREATOR, False, room.version)
    began = time.monotonic()
    await _persist_in_batches(hs, room, 0)
    persisted = time.monotonic() - began

    storage = hs.get_storage_controllers()
    known = [CREATOR, user(0)]
    p_state = partial(room.state, known)
    group = await storage.state.store_state_group(
        room.events[-1].event_id, room.room_id, None, None, p_state
    )
    handler = hs.get_federation_event_handler()
    message = {"msgtype": "m.text", "body": "hi"}

    async def run(senders: list[str], ours: bool = True) -> float:
        hook.ours = ours
        began = time.monotonic()
        for sender in senders:
            event = room.build(sender, "m.room.message", message)
            built = make_event_from_dict(event.get_pdu_json(), room.version)
            context = EventContext.with_state(
                storage=storage,
                state_group=None,
                state_group_before_event=group,
                state_delta_due_to_event=None,
                partial_state=True,
                state_group_deltas={},
            )
            await handler._check_event_auth(None, built, context)
            assert not context.rejected
        return (time.monotonic() - began) / len(senders) * 1e6

    n = SIZES[size]
    await run([user(MODULE_EVENTS + 1)], ours=False)  # warm the caches (state group, events)
    distinct = await run([user(i) for i in range(1, n + 1)], ours=False)
    print(f"\n{size}: resolved, distinct senders {distinct:,.0f} us/event", flush=True)
    same = await run([user(1)] * n, ours=False)
    resolved_before = hook.module.resolved_at_auth_keys
    await run([user(MODULE_EVENTS + 1)])  # the module's first event: its caches of the partial state
    module_distinct = await run([user(i) for i in range(1, MODULE_EVENTS + 1)])
    assert hook.module.resolved_at_auth_keys == resolved_before + MODULE_EVENTS + 1
    stock_unconflicted = await run([user(0)] * n, ours=False)
    unconflicted = await run([user(0)] * 100)
    assert hook.module.unconflicted >= 100
    print(
        f"\npartial state of {len(p_state)} keys (persisted in {persisted:.0f} s): "
        f"resolved, distinct senders: Synapse {distinct:,.0f} us/event, module {module_distinct:,.0f} us/event; "
        f"resolved, same sender (Synapse) {same:,.0f} us/event; "
        f"sender in the partial state: Synapse {stock_unconflicted:,.0f} us/event,"
        f" module {unconflicted:,.0f} us/event"
    )
