"""The resync engine against a hostile or broken resident.

A patched Synapse with the module joins a generated room served by the fake
resident, which misbehaves on the endpoints the resync uses (`/state_ids`,
`/state`): it cuts the connection half-way, sends events nobody asked for,
forges signatures and content hashes, streams a body that never ends, fails
every request, or holds them while the joining server restarts. In every case
nothing wrong is stored, nothing is lost, and the room ends up with exactly
the resident's state and member list, from another server or from the same
one once it behaves.

The joiner streams `/state` for the bulk of the state (`event_fetch_threshold`
is small, see `STREAM_THRESHOLD`); `test_streamed_state_path_alone_completes`
checks the engine with the /event path switched off entirely.
"""

import json
import re
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from canonicaljson import encode_canonical_json
from twisted.internet import defer

from tests.e2e.test_fake_resident import trusting
from tests.harness.client import ClientAPI, poll_until, quote, sleep
from tests.harness.fakehs.room import Room, RoomSpec, load_or_generate
from tests.harness.fakehs.server import FakeResident, Rule
from tests.harness.synapse import merge_config

# The members are on one server (besides the creator's): the servers of the
# room other than the fake's personas do not exist, and every one of them
# costs the joiner a failed request or two (see
# `test_completes_from_the_only_live_server_among_many_dead_ones`).
SPEC = RoomSpec(members=300, servers=1, history=10)
MANY_SERVERS_SPEC = RoomSpec(members=300, servers=20, history=10)
STATE = r"^/_matrix/federation/v1/state/[^/]+$"
STATE_IDS = r"^/_matrix/federation/v1/state_ids/[^/]+$"
ANY_STATE = r"^/_matrix/federation/v1/state(_ids)?/[^/]+$"
ADMIN_ROOMS = "/_synapse/admin/v1/fastjoin/rooms"
TIMEOUT = 120.0
# Above this many missing events the engine streams /state; at or below it,
# it fetches them one by one with /event. The ~300 member events of the room
# come from /state; the last missing event, the join's prev event (which
# /state, being the state *before* it, does not contain), from /event.
STREAM_THRESHOLD = 5
# 86 "A"s: the signature the fake puts on events in "bad_signature" mode.
FORGED_SIGNATURE = "A" * 86

_ROUND_LOG = re.compile(r"round done, (\d+) events stored, (\d+) still missing")
_STATE_IDS_LOG = re.compile(
    r"/state_ids at \S+ lists (\d+) state and (\d+) auth events; "
    r"(\d+) of them are already stored, (\d+) to fetch"
)


# Setting up.


def module_config(resident: FakeResident, **resync: Any) -> dict[str, Any]:
    """homeserver.yaml extras: the module with quick retries, /state streamed
    for anything but the last few events, the resident as notary, and client
    requests that wait for the full state as long as it takes (the tests read
    the outcome through /members)."""
    resync_config = {
        "backoff_initial_seconds": 1,
        "backoff_max_seconds": 2,
        "event_fetch_threshold": STREAM_THRESHOLD,
        "log_interval_seconds": 1,
        **resync,
    }
    return merge_config(
        trusting(resident),
        {
            "modules": [
                {
                    "module": "synapse_fastjoin.FastJoinModule",
                    "config": {"resync": resync_config, "client_wait_timeout_seconds": 0},
                }
            ]
        },
    )


class Joined:
    """A patched joiner whose admin user has (partially) joined the room."""

    def __init__(self, joiner: Any, user_id: str, client: ClientAPI, room: Room) -> None:
        self.joiner = joiner
        self.user_id = user_id
        self.client = client
        self.room = room

    @property
    def room_id(self) -> str:
        return self.room.room_id

    def q(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Run `sql` (with `?` placeholders) on the joiner's database."""
        return self.joiner.database.query(
            sql.replace("?", self.joiner.database.placeholder), tuple(args)
        )

    async def admin_room(self) -> tuple[int, Any]:
        return await self.client.get(f"{ADMIN_ROOMS}/{quote(self.room_id)}", timeout=10)

    async def progress(self) -> dict[str, Any] | None:
        """The resync's progress as the admin API shows it; None once the
        room is no longer partial."""
        status, body = await self.admin_room()
        if status == 404:
            return None
        assert status == 200, body
        return body["resync"]["progress"] or {}

    def rounds_log(self) -> list[tuple[int, int]]:
        """(events stored, still missing) after each fetch round the engine
        logged, across restarts."""
        return [
            (int(m.group(1)), int(m.group(2)))
            for m in _ROUND_LOG.finditer(self.joiner.read_log())
        ]

    def state_ids_log(self) -> list[tuple[int, int, int, int]]:
        """(state, auth, already stored, to fetch) of each /state_ids answer
        the engine logged, across restarts."""
        return [
            tuple(int(x) for x in m.groups())  # type: ignore[misc]
            for m in _STATE_IDS_LOG.finditer(self.joiner.read_log())
        ]


async def start_resident(
    tls_files, tmp_path: Path, personas: int = 1, cls: type = FakeResident, spec: RoomSpec = SPEC
) -> FakeResident:
    room = load_or_generate(spec, tmp_path / "rooms")
    resident = cls(room, tls_files, personas=personas)
    resident.start()
    return resident


async def join(synapse_factory, resident: FakeResident, **resync: Any) -> Joined:
    joiner = synapse_factory(
        variant="patched", name="joiner", config=module_config(resident, **resync)
    )
    user_id, token = joiner.register_user("joiner", admin=True)
    client = joiner.client(token)
    await client.join(resident.room.room_id, server_name=resident.server_name, timeout=TIMEOUT)
    return Joined(joiner, user_id, client, resident.room)


# Checking the outcome.


async def assert_complete(j: Joined) -> list[dict[str, Any]]:
    """The room left partial state with exactly the resident's members and
    current state; every event stored is one of the room's, and none of the
    state is rejected. Returns the /members chunk."""
    members = await j.client.members(j.room_id, timeout=TIMEOUT)
    joined = sorted(m["state_key"] for m in members if m["content"]["membership"] == "join")
    expected = sorted(j.room.joined_members())
    assert j.user_id in expected
    spec = j.room.spec
    residents = [u for u in expected if u.startswith("@resident:")]
    assert len(expected) == spec.members + spec.moderators + 1 + 1 + len(residents)
    assert joined == expected, (
        f"{len(joined)} joined members instead of {len(expected)}: "
        f"missing {sorted(set(expected) - set(joined))[:10]}, "
        f"extra {sorted(set(joined) - set(expected))[:10]}"
    )

    async def left_partial() -> bool:
        status, _ = await j.admin_room()
        return status == 404

    await poll_until(left_partial, timeout=TIMEOUT, description="the admin API to forget the room")
    assert j.q("SELECT count(*) FROM partial_state_rooms") == [(0,)]
    # The history row is written a moment after the room leaves the admin
    # API's list (the engine's last step); the tests read it next.
    await poll_until(
        lambda: j.q("SELECT count(*) FROM fastjoin_resync_history WHERE room_id = ?", j.room_id) != [(0,)],
        timeout=TIMEOUT,
        description="the resync's history row",
    )
    assert j.q("SELECT count(*) FROM partial_state_events") == [(0,)]

    # Nothing lost: the resident's whole current state is stored, accepted,
    # and is the joiner's current state.
    wanted = set(j.room.current_state.values())
    stored = {eid for (eid,) in j.q("SELECT event_id FROM events WHERE room_id = ?", j.room_id)}
    missing = wanted - stored
    assert not missing, f"{len(missing)} state events not stored: {sorted(missing)[:5]}"
    rejected = {eid for (eid,) in j.q("SELECT event_id FROM rejections")}
    assert not wanted & rejected, f"state events rejected: {sorted(wanted & rejected)[:5]}"
    current = {
        eid
        for (eid,) in j.q(
            "SELECT event_id FROM current_state_events WHERE room_id = ?", j.room_id
        )
    }
    assert current == wanted, (
        f"current state differs: {len(wanted - current)} missing, {len(current - wanted)} extra"
    )
    # Nothing foreign: every event stored is one the resident has.
    foreign = stored - set(j.room.by_id)
    assert not foreign, f"{len(foreign)} events the room does not have were stored: {sorted(foreign)[:5]}"
    assert j.q("SELECT count(*) FROM events WHERE sender LIKE ?", "@stranger%") == [(0,)]
    return members


def served(resident: FakeResident, pattern: str, status: int | None = None) -> int:
    """How many requests matching `pattern` the resident answered (with `status`).
    Endless bodies are not counted (they never finish)."""
    regex = re.compile(pattern)
    return sum(
        1
        for _, path, code in resident.requests
        if regex.search(path) and (status is None or code == status)
    )


def received(resident: FakeResident, endpoint: str) -> int:
    """How many `endpoint` requests reached the resident (whatever became of them)."""
    return int(resident.stats()["requests"].get(endpoint, 0))


def state_response_events(room: Room) -> tuple[list[str], list[str]]:
    """The (pdus, auth_chain) event ids, in the order it serves them, of the
    resident's /state answer at the room's forward extremity: what the
    joiner will ask for if it joins now (call it before the join)."""
    [at] = room.forward_extremities()
    state = sorted(room.state_before(at).values(), key=room.index_of)
    return state, room.auth_chain(state)


def state_body_size(room: Room) -> int:
    """Bytes of the /state body the resident will serve for a join made now."""
    pdus, chain = state_response_events(room)
    return len(
        b'{"pdus":' + room.json_list(pdus) + b',"auth_chain":' + room.json_list(chain) + b"}"
    )


# Watching a running resync.


class Watcher:
    """Polls the admin API (and optionally the joiner's RSS) in the background."""

    def __init__(self, j: Joined, interval: float = 0.05, rss: bool = False) -> None:
        self.j = j
        self.interval = interval
        self.snapshots: list[dict[str, Any]] = []
        self.max_rss_kib = 0
        self.rss_samples = 0
        self._rss = rss
        self._stopped = False
        self._d = defer.ensureDeferred(self._run())

    async def _run(self) -> None:
        while not self._stopped:
            if self._rss:
                self._sample_rss()
            try:
                progress = await self.j.progress()
            except Exception:  # restarting, or busy: try again
                progress = None
            if progress:
                self.snapshots.append(progress)
            await sleep(self.interval)

    def _sample_rss(self) -> None:
        pid = self.j.joiner.pid
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        if m:
            self.rss_samples += 1
            self.max_rss_kib = max(self.max_rss_kib, int(m.group(1)))

    async def stop(self) -> None:
        self._stopped = True
        await self._d

    def seen(self, check: Callable[[dict[str, Any]], bool]) -> bool:
        return any(check(p) for p in self.snapshots)

    def max(self, key: str) -> int:
        return max((int(p.get(key) or 0) for p in self.snapshots), default=0)

    async def wait_for(self, check: Callable[[dict[str, Any]], bool], description: str) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((p for p in self.snapshots if check(p)), None)

        return await poll_until(found, timeout=TIMEOUT, interval=self.interval, description=description)


class LogFollower:
    """Reads a growing log file from where it was when created."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = path.stat().st_size if path.exists() else 0
        self._text = ""

    def seen(self, needle: str) -> bool:
        with open(self._path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        self._text += data.decode("utf-8", "replace")
        return needle in self._text


# 1. The connection is cut half-way through /state.


@pytest_twisted.ensureDeferred
async def test_state_cut_half_way_keeps_what_arrived_and_completes(
    synapse_factory, tls_files, tmp_path, db_backend
):
    resident = await start_resident(tls_files, tmp_path)
    try:
        half = state_body_size(resident.room) // 2
        cut = resident.add_rule(Rule("cut", STATE, times=1, after_bytes=half))
        # Small chunks, so that what arrived before the cut is checked and
        # persisted, and must not be fetched again.
        j = await join(synapse_factory, resident, chunk_size=20)
        await assert_complete(j)

        assert cut not in resident.rules, "the cut was never applied"
        assert received(resident, "state") >= 2
        assert served(resident, STATE, 200) >= 1
        assert f"StreamAborted: connection lost after {half} bytes" in j.joiner.read_log()
        # The second /state_ids round found the events of the first half stored.
        log = j.state_ids_log()
        assert len(log) >= 2, log
        (_, _, stored_first, to_fetch_first), (_, _, stored_again, to_fetch_again) = log[0], log[-1]
        assert stored_again > stored_first, log
        assert 0 < to_fetch_again < to_fetch_first, log
        assert resident.stats()["unknown_routes"] == []
    finally:
        await resident.stop()


# 2. /state carries validly signed events /state_ids did not list.


@pytest_twisted.ensureDeferred
async def test_extra_events_in_state_are_never_stored(
    synapse_factory, tls_files, tmp_path, db_backend
):
    resident = await start_resident(tls_files, tmp_path)
    try:
        # Every /state answer, not just the first: the room must complete
        # from a server that keeps adding strangers.
        resident.add_rule(Rule("forge", STATE, mode="extra_events"))
        j = await join(synapse_factory, resident)
        members = await assert_complete(j)

        assert served(resident, STATE, 200) >= 1, "no /state was served, the forge never applied"
        assert not [m for m in members if m["state_key"].startswith("@stranger")]
        assert j.q("SELECT count(*) FROM events WHERE sender LIKE ?", "@stranger%") == [(0,)]
        assert j.q("SELECT count(*) FROM event_json WHERE json LIKE ?", "%@stranger%") == [(0,)]
        assert j.q("SELECT count(*) FROM room_memberships WHERE user_id LIKE ?", "@stranger%") == [(0,)]
        assert j.q("SELECT count(*) FROM state_events WHERE state_key LIKE ?", "@stranger%") == [(0,)]
    finally:
        await resident.stop()


# 3. Forged signatures on the first /state.


@pytest_twisted.ensureDeferred
async def test_events_with_bad_signatures_are_dropped_and_fetched_again(
    synapse_factory, tls_files, tmp_path, db_backend
):
    resident = await start_resident(tls_files, tmp_path)
    try:
        forge = resident.add_rule(Rule("forge", STATE, times=1, mode="bad_signature"))
        j = await join(synapse_factory, resident)
        await assert_complete(j)

        assert forge not in resident.rules, "the forged answer was never served"
        assert served(resident, STATE, 200) >= 2, "the dropped events were not fetched again"
        # None of the stored events carries a forged signature, and every
        # stored event is the resident's, byte for byte in what is signed.
        assert j.q("SELECT count(*) FROM event_json WHERE json LIKE ?", f"%{FORGED_SIGNATURE[:40]}%") == [(0,)]
        log = j.joiner.read_log()
        assert "bad signature" in log, "the engine never saw a bad signature"
        rows = j.q("SELECT event_id, json FROM event_json WHERE room_id = ?", j.room_id)
        for event_id, raw in rows:
            original = json.loads(j.room.by_id[event_id].json)
            stored = json.loads(raw)
            assert stored.get("signatures") == original.get("signatures"), event_id
        # The first round stored the good half and dropped the rest, which a
        # second /state round brought.
        rounds = j.rounds_log()
        assert len(rounds) >= 2, rounds
        stored_first, missing_after_first = rounds[0]
        assert stored_first > 0 and missing_after_first > STREAM_THRESHOLD, rounds
        assert rounds[-1][1] == 0, rounds
    finally:
        await resident.stop()


# 4. Wrong content hashes: redacted, as the spec says, not dropped.


@pytest_twisted.ensureDeferred
async def test_events_with_bad_content_hashes_are_stored_redacted(
    synapse_factory, tls_files, tmp_path, db_backend
):
    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.add_rule(Rule("forge", STATE, mode="bad_hash"))
        pdus, _ = state_response_events(resident.room)
        # The fake forges every other event of the list it serves.
        forged_users = {
            resident.room.by_id[e].state_key
            for i, e in enumerate(pdus)
            if i % 2 == 0 and resident.room.by_id[e].type == "m.room.member"
        }
        ordinary = {u for u in forged_users if u.startswith("@u")}
        assert len(ordinary) > 100

        j = await join(synapse_factory, resident)
        members = await assert_complete(j)

        assert served(resident, STATE, 200) >= 1, "no /state was served, the forge never applied"
        assert j.q("SELECT count(*) FROM event_json WHERE json LIKE ?", '%"forged"%') == [(0,)]
        # The events whose hash did not match are stored redacted (their
        # membership kept, their display name gone); all others are intact.
        redacted = {m["state_key"] for m in members if "displayname" not in m["content"]}
        assert redacted, "no event was redacted"
        assert redacted <= forged_users, sorted(redacted - forged_users)[:5]
        assert ordinary <= redacted, sorted(ordinary - redacted)[:5]
        for m in members:
            if m["state_key"] not in forged_users:
                assert m["content"].get("displayname"), m
    finally:
        await resident.stop()


# 5. A /state body that never ends.


@pytest_twisted.ensureDeferred
async def test_endless_state_body_is_cut_off_with_bounded_memory(
    synapse_factory, tls_files, tmp_path, db_backend
):
    resident = await start_resident(tls_files, tmp_path)
    try:
        endless = resident.add_rule(Rule("endless", STATE, times=1))
        j = await join(synapse_factory, resident)
        watcher = Watcher(j, interval=0.02, rss=True)
        try:
            await assert_complete(j)
        finally:
            await watcher.stop()

        assert endless not in resident.rules, "the endless body was never served"
        assert received(resident, "state") >= 2
        assert served(resident, STATE, 200) >= 1
        sent = resident.stats()["bytes_served"].get("state", 0)
        # The fake would stop at 8 GiB; the joiner hung up long before.
        assert sent < 1024**3, f"the joiner read {sent} bytes of the endless body"
        assert watcher.rss_samples > 10
        assert watcher.max_rss_kib < 1024 * 1024, f"joiner RSS reached {watcher.max_rss_kib} KiB"
        assert "StreamAborted" in j.joiner.read_log()
    finally:
        await resident.stop()


# 6. A server that fails everything to do with state.


class PickyResident(FakeResident):
    """A fake resident whose personas named in `broken` answer every
    /state_ids and /state request with a 500 (rules apply to every persona;
    this picks one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.broken: set[str] = set()
        self.state_requests: dict[str, int] = {}
        """Server name -> /state_ids and /state requests received."""

    def handle(self, persona: Any, request: Any) -> None:
        path = urllib.parse.unquote(request.path.decode("ascii", "replace"))
        if re.search(ANY_STATE, path):
            self.state_requests[persona.server_name] = self.state_requests.get(persona.server_name, 0) + 1
            if persona.server_name in self.broken:
                endpoint = "state_ids" if "/state_ids/" in path else "state"
                self.requests_per_endpoint[endpoint] = self.requests_per_endpoint.get(endpoint, 0) + 1
                body = encode_canonical_json({"errcode": "M_UNKNOWN", "error": "broken persona"})
                self._write(request, endpoint, path, 500, body)
                return
        super().handle(persona, request)


@pytest.mark.parametrize("fetch_method", ["state", "events"], ids=["streamed", "events"])
@pytest_twisted.ensureDeferred
async def test_state_comes_from_another_server_when_the_first_fails(
    synapse_factory, tls_files, tmp_path, db_backend, fetch_method
):
    """The server joined through fails every /state_ids and /state; the other
    persona answers. The failing one is also the joiner's notary, so once
    Synapse backs off from it, key queries through it fail too for a while:
    events whose keys cannot be had yet must be fetched again later, not left
    out of the state. With `fetch_method: events` the ~300 missing events
    come from /event instead of /state."""
    resident = await start_resident(tls_files, tmp_path, personas=2, cls=PickyResident)
    try:
        bad, good = (p.server_name for p in resident.personas)
        resident.broken.add(bad)
        j = await join(synapse_factory, resident, fetch_method=fetch_method)  # via the bad one
        await assert_complete(j)

        assert resident.state_requests.get(bad, 0) >= 1, "the server joined via was never asked"
        assert resident.state_requests.get(good, 0) >= 1, resident.state_requests
        assert served(resident, STATE_IDS, 200) >= 1
        if fetch_method == "state":
            assert served(resident, STATE, 200) >= 1
        else:
            assert served(resident, r"/v1/event/", 200) >= SPEC.members
        # Every 200 came from the good persona: the bad one answered its
        # share with 500s.
        assert served(resident, ANY_STATE, 500) == resident.state_requests[bad]
        rows = j.q("SELECT joined_via FROM fastjoin_resync_history WHERE room_id = ?", j.room_id)
        assert rows == [(bad,)]
    finally:
        await resident.stop()


@pytest_twisted.ensureDeferred
async def test_resync_waits_and_retries_until_the_only_server_recovers(
    synapse_factory, tls_files, tmp_path, db_backend
):
    """The only live server answers every /state_ids and /state with a 500
    for a while: the admin API shows the room waiting to retry, with the
    error, pass after pass. Once the server behaves, the next attempts (every
    `backoff_max_seconds`, 2 s here) reach it and the room completes."""
    resident = await start_resident(tls_files, tmp_path)
    try:
        failing = resident.add_rule(Rule("fail", ANY_STATE, status=500))
        j = await join(synapse_factory, resident)
        watcher = Watcher(j)
        try:
            waiting = await watcher.wait_for(
                lambda p: p["phase"] == "waiting_to_retry" and p["retries"] >= 1 and p["last_error"],
                "the resync to wait for a retry",
            )
            assert waiting["next_retry_ts"] and waiting["next_retry_ts"] > time.time() * 1000 - 5000
            # It goes round again and again: wait for a few failed passes.
            first_retries = watcher.max("retries")
            await watcher.wait_for(
                lambda p: p["retries"] > first_retries and p["phase"] == "waiting_to_retry",
                "another failed pass",
            )
            status, body = await j.admin_room()
            assert status == 200, body
            assert body["resync"]["running"] is True
            assert body["resync"]["progress"]["persisted"] == 0
            assert served(resident, STATE_IDS, 500) >= 2
            assert served(resident, STATE, 200) == 0

            resident.clear_rules()
            await assert_complete(j)
        finally:
            await watcher.stop()
        assert failing not in resident.rules
        assert served(resident, STATE_IDS, 200) >= 1
        assert served(resident, STATE, 200) >= 1
        [(outcome,)] = j.q(
            "SELECT outcome FROM fastjoin_resync_history WHERE room_id = ?", j.room_id
        )
        assert outcome == "complete"
    finally:
        await resident.stop()


# 7. The joining server restarts in the middle of the resync.


async def _restart_while_held(j: Joined, resident: FakeResident, path: str) -> None:
    """With `path` held, restart the joiner and wait until the restarted one
    asks again; then let everything go."""
    await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT, description=f"{path} held")
    before = resident.held_count()
    j.joiner.restart()
    await poll_until(
        lambda: resident.held_count() > before,
        timeout=TIMEOUT,
        description="the restarted joiner to resume the resync",
    )
    assert j.q("SELECT count(*) FROM partial_state_rooms") == [(1,)]
    resident.release()


@pytest_twisted.ensureDeferred
async def test_restart_while_state_ids_is_pending(
    synapse_factory, tls_files, tmp_path, db_backend
):
    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.hold(STATE_IDS)
        j = await join(synapse_factory, resident)
        await _restart_while_held(j, resident, STATE_IDS)
        await assert_complete(j)
        assert j.joiner.start_count == 2
        [(outcome,)] = j.q(
            "SELECT outcome FROM fastjoin_resync_history WHERE room_id = ?", j.room_id
        )
        assert outcome == "complete"
    finally:
        await resident.stop()


@pytest_twisted.ensureDeferred
async def test_restart_while_state_is_pending(synapse_factory, tls_files, tmp_path, db_backend):
    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.hold(STATE)
        j = await join(synapse_factory, resident)
        await _restart_while_held(j, resident, STATE)
        await assert_complete(j)
        assert j.joiner.start_count == 2
        assert len(j.state_ids_log()) >= 2  # asked again after the restart
    finally:
        await resident.stop()


@pytest_twisted.ensureDeferred
async def test_restart_after_a_cut_stream_keeps_what_was_stored(
    synapse_factory, tls_files, tmp_path, db_backend
):
    """Half of /state arrives and is persisted, the connection is cut; the
    joiner restarts before its retry gets anywhere: the restarted one fetches
    only the other half."""
    resident = await start_resident(tls_files, tmp_path)
    try:
        half = state_body_size(resident.room) // 2
        cut = resident.add_rule(Rule("cut", STATE, times=1, after_bytes=half))
        j = await join(
            synapse_factory, resident, chunk_size=20, backoff_initial_seconds=2, backoff_max_seconds=2
        )
        await poll_until(lambda: cut not in resident.rules, timeout=TIMEOUT, description="the cut")
        resident.hold(STATE)
        await _restart_while_held(j, resident, STATE)
        await assert_complete(j)

        log = j.state_ids_log()
        assert len(log) >= 2, log
        assert 0 < log[-1][3] < log[0][3], log
    finally:
        await resident.stop()


@pytest_twisted.ensureDeferred
async def test_crash_after_the_state_during_catch_up(
    synapse_factory, tls_files, tmp_path, db_backend
):
    """Events arrive while the room is partial. Once the state at the join is
    resolved, and before the engine has caught up with those events, the
    joiner is frozen and killed (SIGKILL: nothing more happens after the
    freeze), then started again. Every event ends up with full state."""
    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.hold(STATE)
        j = await join(synapse_factory, resident)
        join_event_id = j.room.current_state[("m.room.member", j.user_id)]
        await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT, description="/state held")
        # Slowly enough that the joiner never queues so many that it prunes
        # its federation queue (it would then fetch state for the gap, and
        # that /state is held too).
        count = 80
        resident.inject(rate=10, count=count)
        await poll_until(
            lambda: resident.stats()["injected_sent"] >= count,
            timeout=TIMEOUT,
            description="the live events to reach the joiner",
        )
        await poll_until(
            lambda: j.q("SELECT count(*) FROM partial_state_events")[0][0] >= count + 1,
            timeout=TIMEOUT,
            description="the live events to be stored as partial-state events",
        )

        log = LogFollower(j.joiner.log_path)
        resident.release()
        await poll_until(
            lambda: log.seen(f"full state at {join_event_id} has"),
            timeout=TIMEOUT,
            interval=0.005,
            description="the state at the join to be resolved",
        )
        j.joiner.pause()
        j.joiner.kill()
        left = j.q("SELECT count(*) FROM partial_state_events")[0][0]
        assert 0 < left <= count + 1, f"{left} partial-state events left at the crash"
        assert j.q("SELECT count(*) FROM partial_state_rooms") == [(1,)]

        j.joiner.start()
        await assert_complete(j)
        # The state fetched before the crash was kept: if the restarted engine
        # had to resolve the join again, it had nothing to fetch.
        state_ids = j.state_ids_log()
        if len(state_ids) > 1:
            assert state_ids[-1][3] == 0, state_ids
        assert set(resident.injected) <= {
            eid for (eid,) in j.q("SELECT event_id FROM events WHERE room_id = ?", j.room_id)
        }
    finally:
        await resident.stop()


# Many servers in the room, one of them alive.


@pytest_twisted.ensureDeferred
async def test_completes_from_the_only_live_server_among_many_dead_ones(
    synapse_factory, tls_files, tmp_path, db_backend
):
    """As in most big rooms, most servers of the room are gone (21 here: the
    fake's generated servers do not resolve). The only live one fails once
    (a cut /state); the resync must still finish from it, promptly."""
    resident = await start_resident(tls_files, tmp_path, spec=MANY_SERVERS_SPEC)
    try:
        cut = resident.add_rule(
            Rule("cut", STATE, times=1, after_bytes=state_body_size(resident.room) // 2)
        )
        j = await join(synapse_factory, resident)
        await assert_complete(j)
        assert cut not in resident.rules
        assert served(resident, STATE, 200) >= 1
        assert received(resident, "event") >= 1, "the last missing event was never asked for"
    finally:
        await resident.stop()


# The streamed path alone.


@pytest_twisted.ensureDeferred
async def test_streamed_state_path_alone_completes(
    synapse_factory, tls_files, tmp_path, db_backend
):
    """With `event_fetch_threshold: 0` every missing event must come from
    /state, which never contains the event it is asked about; the engine must
    still get that event (Synapse fetches it with /event)."""
    resident = await start_resident(tls_files, tmp_path)
    try:
        j = await join(synapse_factory, resident, event_fetch_threshold=0)
        await assert_complete(j)
    finally:
        await resident.stop()
