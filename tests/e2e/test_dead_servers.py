"""The resync engine in a room whose server list is mostly dead servers.

The joining Synapse runs in a network of its own (tests/harness/netsim.py):
every server of the generated room other than the fake's residents is one of
the kinds the real federation is full of (see `fakehs.world`): names that do
not resolve (slowly), hosts that refuse connections, hosts that accept and
never answer, servers that answer 5xx or 404 to everything, servers that have
some events and not others. With nothing else wrong, none of them may hold the
resync up: it gets everything from the server it joined through, and the dead
ones are not even asked for the bulk of the state. When the server joined
through dies too, the live server is found, wherever it is in the list.
"""

import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.e2e.test_resync_bad_input import (
    ADMIN_ROOMS,
    TIMEOUT,
    Joined,
    assert_complete,
    module_config,
)
from tests.harness.client import quote, sleep
from tests.harness.fakehs.room import RoomSpec, load_or_generate
from tests.harness.fakehs.server import DEAD_KINDS, FakeResident, Rule
from tests.harness.fakehs.world import plan_world

# 300 members over 30 servers (plus the creator's): 31 other servers.
SPEC = RoomSpec(members=300, servers=30, history=10)
EVENT = r"^/_matrix/federation/v1/event/"
STATE_ANY = r"^/_matrix/federation/v1/(state|state_ids|event)/"


async def start_world(
    tls_files, tmp_path: Path, world: dict[str, str], slow_dns_seconds: float = 3.0
) -> FakeResident:
    room = load_or_generate(SPEC, tmp_path / "rooms")
    resident = FakeResident(
        room,
        tls_files,
        world=world,
        netsim_table=tmp_path / "netsim.json",
        slow_dns_seconds=slow_dns_seconds,
    )
    resident.start()
    return resident


async def join(synapse_factory, resident: FakeResident, tmp_path: Path, **resync: Any) -> Joined:
    joiner = synapse_factory(
        variant="patched",
        name="joiner",
        config=module_config(resident, **resync),
        netsim_table=tmp_path / "netsim.json",
    )
    user_id, token = joiner.register_user("joiner", admin=True)
    client = joiner.client(token)
    await client.join(resident.room.room_id, server_name=resident.server_name, timeout=TIMEOUT)
    return Joined(joiner, user_id, client, resident.room)


def state_requests_to(resident: FakeResident, servers: set[str]) -> int:
    """/state_ids, /state and /event requests that reached these servers of
    the world (the served kinds: the others are never reached)."""
    return sum(n for s, n in resident.requests_per_server.items() if s in servers)


@pytest.mark.parametrize("kind", DEAD_KINDS)
@pytest.mark.parametrize("method", ["state", "events"])
@pytest_twisted.ensureDeferred
async def test_dead_servers_of_every_kind_do_not_hold_the_resync_up(
    synapse_factory, tls_files, tmp_path, kind, method
):
    """Every other server of the room is dead in the same way; the resident
    we joined through is fine. The state (by /state, or by /event for each
    missing event) comes from it alone."""
    world = plan_world(SPEC, 1.0, [kind])
    resident = await start_world(tls_files, tmp_path, world)
    try:
        j = await join(synapse_factory, resident, tmp_path, fetch_method=method)
        await assert_complete(j)
        # (Synapse's federation sender sends the join event to each of them;)
        # the resync itself asked none of them for anything.
        dead = {s for s, k in world.items() if k != "live"}
        log = j.joiner.read_log()
        asked_dead = [s for s in dead if f"from {s} failed" in log]
        assert not asked_dead, f"the resync asked dead servers: {asked_dead[:5]}"
        assert "from " + resident.server_name + " failed" not in log
    finally:
        await resident.stop()


@pytest_twisted.ensureDeferred
async def test_joined_server_dying_after_send_join_fails_over_to_a_live_one(
    synapse_factory, tls_files, tmp_path
):
    """The server we joined through stops answering (it accepts requests and
    never answers them) right after /send_join; half the others are dead of
    every kind, the rest alive. The resync hedges to a live server after one
    hedge delay and completes from it."""
    world = plan_world(SPEC, 0.5)
    resident = await start_world(tls_files, tmp_path, world)
    try:
        primary = resident.server_name
        resident.add_rule(Rule("hold", STATE_ANY, server=primary))
        j = await join(synapse_factory, resident, tmp_path, hedge_seconds=1)
        await assert_complete(j)
        live = {s for s, k in world.items() if k == "live"}
        assert state_requests_to(resident, live) >= 2  # /state_ids and /state at least
    finally:
        await resident.stop()


@pytest_twisted.ensureDeferred
async def test_the_only_live_server_is_the_last_in_the_list(synapse_factory, tls_files, tmp_path):
    """Every server but the last one of the room's list is dead (of every
    kind, the slow-DNS ones included), and the server we joined through dies
    after /send_join: the resync still finds the last one."""
    names = sorted(SPEC.server_names())
    last = names[-1]
    world = plan_world(SPEC, 1.0, overrides={last: "live"})
    resident = await start_world(tls_files, tmp_path, world, slow_dns_seconds=2.0)
    try:
        resident.add_rule(Rule("fail", STATE_ANY, status=503, server=resident.server_name))
        j = await join(
            synapse_factory, resident, tmp_path, hedge_seconds=0.5, servers_per_attempt=40
        )
        await assert_complete(j)
        assert resident.requests_per_server.get(last, 0) >= 2
    finally:
        await resident.stop()


@pytest.mark.parametrize(
    "misbehaviour",
    [
        pytest.param(Rule("stall", EVENT, after_bytes=20), id="hangs-mid-body"),
        pytest.param(Rule("forge", EVENT, mode="other_event"), id="serves-another-event"),
        pytest.param(Rule("forge", EVENT, mode="empty"), id="empty-pdus"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_bad_event_server_is_set_aside_and_another_serves(
    synapse_factory, tls_files, tmp_path, misbehaviour
):
    """The server we joined through misbehaves on every /event; one other
    server is alive. Each missing event comes from the live one, and nothing
    the bad one sent is stored as an event it is not."""
    names = sorted(SPEC.server_names())
    world = plan_world(SPEC, 1.0, overrides={names[0]: "live"})
    resident = await start_world(tls_files, tmp_path, world)
    try:
        misbehaviour.server = resident.server_name
        resident.add_rule(misbehaviour)
        j = await join(
            synapse_factory, resident, tmp_path, fetch_method="events", hedge_seconds=1
        )
        await assert_complete(j)
        assert resident.requests_per_server.get(names[0], 0) >= 1
    finally:
        await resident.stop()


@pytest_twisted.ensureDeferred
async def test_progress_moves_while_events_arrive(synapse_factory, tls_files, tmp_path):
    """The admin API's counters change while /event answers trickle in, not
    only at the end of a batch: an admin can tell slow from stuck."""
    world = plan_world(SPEC, 0.0)
    resident = await start_world(tls_files, tmp_path, world)
    try:
        # Every /event answer takes 0.5 s; 4 in flight: ~40 s for ~300.
        resident.add_rule(Rule("delay", EVENT, seconds=0.5))
        j = await join(
            synapse_factory,
            resident,
            tmp_path,
            fetch_method="events",
            event_fetch_concurrency=4,
            hedge_seconds=30,
        )
        seen: list[int] = []
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            status, body = await j.client.get(f"{ADMIN_ROOMS}/{quote(j.room_id)}", timeout=10)
            if status == 404:
                break
            progress = (body.get("resync") or {}).get("progress") or {}
            if progress.get("phase") == "fetching_events":
                seen.append(int(progress.get("fetched", 0)))
            if len(set(seen)) >= 4:
                break
            await sleep(1.0)
        assert len(set(seen)) >= 4, f"fetched did not move while events arrived: {seen}"
        assert seen == sorted(seen)
        resident.clear_rules()
        await assert_complete(j)
    finally:
        await resident.stop()
