"""The resident side of MSC3706, served by a patched Synapse (patch 0014).

A patched Synapse holds a restricted room; a remote server (one of the fake's
server names, whose keys the fake notarises) joins it with `/make_join` and a
partial `/send_join` (`omit_members=true`), signing its own requests and
events (tests/harness/fedclient.py). The answer must let the joining server
check its own join: the join event's auth events, the membership of the user
who authorised the join among them, are in `auth_chain` even though memberships
are left out of `state`. A join that names an authoriser it cannot show is
refused.

`FASTJOIN_RESIDENT_BENCH=2000,20000` (sizes) runs the measurement instead:
stock and patched Synapse join a generated room of that many members through
the fake resident, finish the resync, and then answer partial and full
`/send_join`s of new remote users; time and the server's peak RSS per answer
are written to `docs/bench/resident-send-join.json` and `.md`. The servers
use the database `--db` names (`--db postgres`: one run per database given).
`FASTJOIN_RESIDENT_BENCH_VARIANTS=patched` measures one variant only;
`FASTJOIN_RESIDENT_BENCH_KINDS=partial` measures partial joins only (each
join's `/make_join` is measured too, from Synapse's access log);
`FASTJOIN_RESIDENT_BENCH_BACKGROUND=0` turns off the updates of Synapse's user
directory and room statistics (see docs/benchmarks.md: their work on the
room's members after the resync shares the database with the measured joins);
`FASTJOIN_RESIDENT_BENCH_PRESENCE=0` turns presence off (its handler goes
through every member of the room for each join);
`FASTJOIN_RESIDENT_BENCH_IDLE=1` waits before each join until the resident
has gone idle (under 20 ms of CPU in the last second, from /proc), `both`
measures partial joins in pairs, one after that wait and one right after it
(full joins after the wait only); the default, `0`, measures each join right
after the previous one. The warm-up join, right after the resync, is kept as
a row of its own. Every join records the resident process's CPU during the
`/send_join` (from /proc, every thread, 10 ms ticks) beside the request's
own (Synapse's access log), its peak RSS growth (VmHWM, reset through
`/proc/PID/clear_refs` before the request, minus VmRSS before it) and the
RSS it kept (VmRSS after minus before);
`FASTJOIN_RESIDENT_BENCH_TXNLOG=1` logs every database transaction
(`synapse.storage.txn` at DEBUG) from the warm-up join on, and each join
records the transactions of other log contexts that ended during its
`/send_join` (what ran beside it);
`FASTJOIN_RESIDENT_BENCH_PROFILE=DIR` does too, and records each measured partial join with
py-spy (`pip install py-spy` into the venv; every thread, idle included, so
that waits show) into DIR/<variant>-<members>-<n>.json (speedscope: samples in time order).
"""

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.e2e.test_fake_resident import trusting
from tests.harness.client import poll_until, quote, sleep
from tests.harness.fakehs.events import event_id as _compute_event_id, finalise_event, room_version
from tests.harness.fakehs.room import RoomSpec, load_or_generate
from tests.harness.fakehs.server import FakeResident
from tests.harness.fedclient import federation_request
from tests.harness.synapse import merge_config

REMOTE = "joiner2.fake"
MODULE = {"modules": [{"module": "synapse_fastjoin.FastJoinModule", "config": {}}]}
ROOT = Path(__file__).resolve().parents[2]


async def make_join(hs: Any, room_id: str, user_id: str) -> tuple[dict[str, Any], str]:
    origin = user_id.split(":", 1)[1]
    status, body = await federation_request(
        hs.federation_url, hs.server_name, origin, "GET",
        f"/_matrix/federation/v1/make_join/{quote(room_id)}/{quote(user_id)}",
        params=[("ver", v) for v in ("10", "11", "12")],
    )
    assert status == 200, body
    return body["event"], body["room_version"]


async def send_join(
    hs: Any, event: dict[str, Any], version: str, omit_members: bool = True, timeout: float = 120
) -> tuple[int, Any, float]:
    """Sign `event` as its sender's server and send it; (status, body, seconds)."""
    origin = event["sender"].split(":", 1)[1]
    event_id = finalise_event(room_version(version), event, origin)
    started = time.monotonic()
    status, body = await federation_request(
        hs.federation_url, hs.server_name, origin, "PUT",
        f"/_matrix/federation/v2/send_join/{quote(event['room_id'])}/{quote(event_id)}",
        params={"omit_members": "true" if omit_members else "false"},
        content=event,
        timeout=timeout,
    )
    return status, body, time.monotonic() - started


async def join_remote(hs: Any, room_id: str, user_id: str) -> dict[str, Any]:
    event, version = await make_join(hs, room_id, user_id)
    status, body, _ = await send_join(hs, event, version)
    assert status == 200, body
    return body


async def state_event_id(client: Any, room_id: str, user_id: str) -> str:
    status, body = await client.get(f"/_matrix/client/v3/rooms/{quote(room_id)}/state", timeout=30)
    assert status == 200, body
    [event_id] = [e["event_id"] for e in body if e["type"] == "m.room.member" and e["state_key"] == user_id]
    return event_id


async def joined(client: Any, room_id: str) -> set[str]:
    status, body = await client.get(f"/_matrix/client/v3/rooms/{quote(room_id)}/joined_members", timeout=30)
    assert status == 200, body
    return set(body["joined"])


@pytest_twisted.ensureDeferred
async def test_partial_send_join_carries_the_joins_own_auth_chain_in_a_restricted_room(
    synapse_factory, tls_files, tmp_path
):
    """The authorising user's membership is in the partial answer's
    auth_chain (not in its state: memberships are omitted); joins naming an
    authoriser that is not in the room, or not on this server, are refused."""
    notary = FakeResident(load_or_generate(RoomSpec(members=2, servers=1, history=1), tmp_path / "rooms"), tls_files)
    notary.start()
    notary.serve_keys_for(REMOTE)
    try:
        hs = synapse_factory(variant="patched", name="resident", config=merge_config(trusting(notary), MODULE))
        creator_id, token = hs.register_user("creator")
        creator = hs.client(token)
        space = await creator.create_room(preset="public_chat", creation_content={"type": "m.space"})
        room = await creator.create_room(
            preset="private_chat",
            name="Restricted",  # named: no heroes' memberships in the partial state
            power_level_content_override={"invite": 0},
            initial_state=[
                {
                    "type": "m.room.join_rules",
                    "state_key": "",
                    "content": {
                        "join_rule": "restricted",
                        "allow": [{"type": "m.room_membership", "room_id": space}],
                    },
                }
            ],
        )
        mod_id, mod_token = hs.register_user("mod")
        mod = hs.client(mod_token)
        await mod.join(space, timeout=30)
        await mod.join(room, timeout=30)
        mod_member = await state_event_id(creator, room, mod_id)
        creator_member = await state_event_id(creator, room, creator_id)

        alice = f"@alice:{REMOTE}"
        await join_remote(hs, space, alice)
        event, version = await make_join(hs, room, alice)
        # The join is authorised by mod: a user whose membership no other
        # state event of the room refers to.
        if event["content"].get("join_authorised_via_users_server") != mod_id:
            event["content"]["join_authorised_via_users_server"] = mod_id
            event["auth_events"] = [a for a in event["auth_events"] if a != creator_member] + [mod_member]
        assert mod_member in event["auth_events"]
        status, body, _ = await send_join(hs, event, version)
        assert status == 200, body
        assert body["members_omitted"] is True
        chain_types = {(e["type"], e.get("state_key")) for e in body["auth_chain"]}
        state_types = {(e["type"], e.get("state_key")) for e in body["state"]}
        assert ("m.room.member", mod_id) in chain_types, (chain_types, state_types)
        assert ("m.room.member", mod_id) not in state_types
        assert not [t for t in state_types if t[0] == "m.room.member" and t[1] != alice], state_types
        # Every auth event of the join is in the answer.
        sent = {(e["type"], e.get("state_key")) for e in body["state"] + body["auth_chain"]}
        assert ("m.room.join_rules", "") in sent and ("m.room.power_levels", "") in sent
        assert alice in await joined(creator, room)

        # Bad input: the claimed authoriser is not in the room.
        ghost_id, _ = hs.register_user("ghost")
        bob = f"@bob:{REMOTE}"
        await join_remote(hs, space, bob)
        event, version = await make_join(hs, room, bob)
        event["content"]["join_authorised_via_users_server"] = ghost_id
        status, body, _ = await send_join(hs, event, version)
        assert 400 <= status < 500, body
        # ... or is on another server (which this server cannot sign for).
        event, version = await make_join(hs, room, bob)
        event["content"]["join_authorised_via_users_server"] = f"@someone:{REMOTE}"
        status, body, _ = await send_join(hs, event, version)
        assert 400 <= status < 500, body
        assert bob not in await joined(creator, room)

        # A user in none of the allowed rooms, with an authoriser who may
        # authorise: the join passes the auth rules, and the restricted-join
        # check of /send_join must still refuse it. /make_join refuses such a
        # user, so the join is bob's template, made carol's.
        carol = f"@carol:{REMOTE}"
        event, version = await make_join(hs, room, bob)
        event["sender"] = event["state_key"] = carol
        event["content"]["join_authorised_via_users_server"] = mod_id
        event["auth_events"] = [a for a in event["auth_events"] if a != creator_member]
        if mod_member not in event["auth_events"]:
            event["auth_events"].append(mod_member)
        status, body, _ = await send_join(hs, event, version)
        assert status == 403, body
        assert carol not in await joined(creator, room)
    finally:
        await notary.stop()


# The measurement (FASTJOIN_RESIDENT_BENCH).


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of the whole process (every thread) so far."""
    # The fields after the command name, which is in parentheses.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def _wait_idle(pid: int, window: float = 1.0, limit: float = 0.02, timeout: float = 1800) -> float:
    """Wait until the process used less than `limit` seconds of CPU in the
    last `window` seconds (what the previous join left running is done);
    returns how long that took."""
    started = time.monotonic()
    samples = [(started, _cpu_seconds(pid))]
    while time.monotonic() - started < timeout:
        await sleep(0.1)
        now = time.monotonic()
        samples.append((now, _cpu_seconds(pid)))
        while len(samples) > 2 and now - samples[1][0] >= window:
            samples.pop(0)
        if now - samples[0][0] >= window and samples[-1][1] - samples[0][1] < limit:
            return now - started
    return time.monotonic() - started


_PROCESSED = re.compile(
    r"Processed request: ([\d.]+)sec/[\d.]+sec ru=\(([\d.]+)sec, ([\d.]+)sec\) "
    r"db=\(([\d.]+)sec/([\d.]+)sec/(\d+)\)"
)


_CONTEXT = re.compile(r" - INFO - (\S+) - ")


def _log_size(hs: Any) -> int:
    try:
        return hs.log_path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_log_from(hs: Any, offset: int) -> str:
    with open(hs.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", errors="replace")


async def _request_log(
    hs: Any, event_id: str, endpoint: str = "send_join", offset: int = 0
) -> dict[str, Any]:
    """Synapse's own account of the /send_join of `event_id` (or of another
    `endpoint` whose path holds it: the /make_join of a user id): wall time,
    CPU time (user + system) and database transactions (time, count), from
    the log after byte `offset`."""
    needle = quote(event_id)

    def find() -> dict[str, Any] | None:
        for line in reversed(_read_log_from(hs, offset).splitlines()):
            if needle in line and endpoint in line:
                m = _PROCESSED.search(line)
                if m:
                    context = _CONTEXT.search(line)
                    return {
                        "context": context.group(1) if context else None,
                        "server_seconds": float(m.group(1)),
                        "cpu_seconds": float(m.group(2)) + float(m.group(3)),
                        "db_seconds": float(m.group(5)),
                        "db_transactions": int(m.group(6)),
                    }
        return None

    found: list[dict[str, float]] = []

    def ready() -> bool:
        r = find()
        if r is not None:
            found.append(r)
        return r is not None

    await poll_until(ready, timeout=30, description="the request's log line")
    return found[0]


_TXN_END = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - synapse\.storage\.txn - \d+ - DEBUG - (.*?)"
    r" - \[TXN END\] \{(.*)-[0-9a-f]+\} ([\d.]+) sec"
)


def _beside(hs: Any, offset: int, started: float, ended: float, own: str | None) -> dict[str, Any]:
    """From the transaction log (FASTJOIN_RESIDENT_BENCH_TXNLOG), the
    database transactions that ended between `started` and `ended` (wall
    clock) in other log contexts than the request's own (`own`): their time
    and count per context (numbering dropped) and per transaction name; and
    the request's own, per transaction name."""
    import datetime

    contexts: dict[str, list[float]] = {}
    names: dict[str, list[float]] = {}
    mine: dict[str, list[float]] = {}
    for line in _read_log_from(hs, offset).splitlines():
        m = _TXN_END.match(line)
        if not m:
            continue
        if m.group(2) == own:
            entry = mine.setdefault(m.group(3), [0.0, 0])
            entry[0] += float(m.group(4))
            entry[1] += 1
            continue
        at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if not started <= at <= ended:
            continue
        context = re.sub(r"-\d+$", "", m.group(2))
        for table, key in ((contexts, context), (names, f"{context}: {m.group(3)}")):
            entry = table.setdefault(key, [0.0, 0])
            entry[0] += float(m.group(4))
            entry[1] += 1
    top = sorted(names.items(), key=lambda kv: -kv[1][0])[:8]
    return {
        "db_seconds": sum(v[0] for v in contexts.values()),
        "transactions": sum(v[1] for v in contexts.values()),
        "contexts": {k: v for k, v in sorted(contexts.items(), key=lambda kv: -kv[1][0])},
        "top": dict(top),
        # The request's own transactions, slowest first.
        "own": dict(sorted(mine.items(), key=lambda kv: -kv[1][0])[:8]),
    }


def _start_profile(pid: int, out: Path) -> subprocess.Popen:
    """py-spy on `pid` until stopped (SIGINT), every thread, idle included."""
    spy = Path(sys.executable).with_name("py-spy")
    proc = subprocess.Popen(
        [str(spy), "record", "--pid", str(pid), "--rate", "250", "--threads", "--idle",
         "--format", "speedscope", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    return proc


async def _measure(
    hs: Any, room_id: str, user_id: str, omit_members: bool, profile: Path | None = None, idle: bool = False
) -> dict[str, Any]:
    idle_wait = await _wait_idle(hs.pid) if idle else None
    offset = _log_size(hs)
    make_started = time.monotonic()
    event, version = await make_join(hs, room_id, user_id)
    make_seconds = time.monotonic() - make_started
    make_log = await _request_log(hs, user_id, "make_join", offset)
    offset = _log_size(hs)
    _reset_peak(hs.pid)
    before = _rss_kib(hs.pid)
    spy = None
    if profile is not None:
        spawned = time.monotonic()
        spy = _start_profile(hs.pid, profile)
        await sleep(1)  # py-spy attached
    started = time.monotonic()
    wall_started = time.time()
    cpu_before = _cpu_seconds(hs.pid)
    status, body, seconds = await send_join(hs, event, version, omit_members=omit_members, timeout=600)
    process_cpu = _cpu_seconds(hs.pid) - cpu_before
    rss_after = _rss_kib(hs.pid)
    wall_ended = time.time()
    if spy is not None:
        ended = time.monotonic()
        await sleep(1)  # what the request left running (the federation sender)
        spy.send_signal(2)
        spy.wait(timeout=60)
        # Where the request lies in the profile (seconds since py-spy started),
        # and in the log (wall clock).
        profile.with_suffix(".window").write_text(
            json.dumps([started - spawned, ended - spawned, time.time() - (ended - started) - 1, time.time() - 1])
        )
    assert status == 200, str(body)[:300]
    peak = _peak_rss_kib(hs.pid)
    own = await _request_log(hs, _compute_event_id(room_version(version), body["event"]), offset=offset)
    return {
        "seconds": seconds,
        **own,
        "beside": _beside(hs, offset, wall_started, wall_ended, own["context"])
        if os.environ.get("FASTJOIN_RESIDENT_BENCH_TXNLOG") or os.environ.get("FASTJOIN_RESIDENT_BENCH_PROFILE")
        else None,
        "idle_wait_seconds": idle_wait,
        "process_cpu_seconds": process_cpu,
        "rss_growth_mib": (peak - before) / 1024,
        "rss_retained_mib": (rss_after - before) / 1024,
        "rss_before_mib": before / 1024,
        "make_join": {"seconds": make_seconds, **make_log},
        "state": len(body["state"]),
        "auth_chain": len(body["auth_chain"]),
        "bytes": len(json.dumps(body)),
    }


@pytest.mark.skipif(not os.environ.get("FASTJOIN_RESIDENT_BENCH"), reason="set FASTJOIN_RESIDENT_BENCH=sizes")
@pytest_twisted.ensureDeferred
async def test_measure_resident_send_join(synapse_factory, tls_files, tmp_path, db_backend):
    sizes = [int(s) for s in os.environ["FASTJOIN_RESIDENT_BENCH"].split(",")]
    repeats = int(os.environ.get("FASTJOIN_RESIDENT_BENCH_REPEATS", "3"))
    results: list[dict[str, Any]] = []
    for n in sizes:
        spec = RoomSpec(members=n, servers=1, history=10)
        for variant in os.environ.get("FASTJOIN_RESIDENT_BENCH_VARIANTS", "stock,patched").split(","):
            resident = FakeResident(load_or_generate(spec), tls_files)
            resident.start()
            resident.serve_keys_for(REMOTE)
            try:
                config = trusting(resident)
                if variant == "patched":
                    # Waits for full state unbounded, as on stock.
                    config = merge_config(
                        config,
                        {
                            "modules": [
                                {
                                    "module": "synapse_fastjoin.FastJoinModule",
                                    "config": {"client_wait_timeout_seconds": 0},
                                }
                            ]
                        },
                    )
                if os.environ.get("FASTJOIN_RESIDENT_BENCH_BACKGROUND") == "0":
                    # Without the user directory's and the room statistics'
                    # updates, which after the resync work through every
                    # membership of the room (the user directory two
                    # transactions per member: hours for a big room) while the
                    # joins are measured. Nobody updates the user directory.
                    config = merge_config(
                        config,
                        {"update_user_directory_from_worker": "nobody", "stats": {"enabled": False}},
                    )
                if os.environ.get("FASTJOIN_RESIDENT_BENCH_PRESENCE") == "0":
                    # Without presence, whose handler goes through every
                    # member of the room for each join (docs/benchmarks.md).
                    config = merge_config(config, {"presence": {"enabled": False}})
                hs = synapse_factory(variant=variant, db=db_backend, name=f"{variant}-{n}", config=config)
                _, token = hs.register_user("admin", admin=True)
                client = hs.client(token)
                await client.join(resident.room.room_id, server_name=resident.server_name, timeout=3600)
                # Full state first (a request that waits for the resync).
                status, body = await client.get(
                    f"/_matrix/client/v3/rooms/{quote(resident.room.room_id)}/joined_members", timeout=3600
                )
                assert status == 200 and len(body["joined"]) >= n, status
                await poll_until(
                    lambda: hs.database.query("SELECT count(*) FROM partial_state_rooms") == [(0,)],
                    timeout=600,
                    description="the resync to end",
                )
                room_id = resident.room.room_id
                if os.environ.get("FASTJOIN_RESIDENT_BENCH_PROFILE") or os.environ.get(
                    "FASTJOIN_RESIDENT_BENCH_TXNLOG"
                ):
                    # Every database transaction in the log, with its time
                    # (Synapse reloads its log config on SIGHUP).
                    import signal

                    import yaml

                    log_config = yaml.safe_load(hs.log_config_path.read_text())
                    log_config["loggers"]["synapse.storage.txn"] = {"level": "DEBUG"}
                    hs.log_config_path.write_text(yaml.safe_dump(log_config))
                    os.kill(hs.pid, signal.SIGHUP)
                # The warm-up join, right after the resync: kept (one run) as
                # what a join meets while Synapse still works through the
                # resync's membership deltas.
                warmup = await _measure(hs, room_id, f"@warmup:{REMOTE}", True)
                results.append({**_summary(n, variant, True, False, [warmup], db_backend), "after": "resync (warm-up)"})
                profile_dir = os.environ.get("FASTJOIN_RESIDENT_BENCH_PROFILE")
                kinds = os.environ.get("FASTJOIN_RESIDENT_BENCH_KINDS", "partial,full").split(",")
                # "0": each join right after the previous one (what earlier
                # runs measured); "1": each after the resident has gone idle;
                # "both": partial joins in pairs, one after the idle wait and
                # one right after it, full joins after the idle wait only.
                modes = {"0": [False], "1": [True], "both": [True, False]}[
                    os.environ.get("FASTJOIN_RESIDENT_BENCH_IDLE", "0")
                ]
                for omit in [k == "partial" for k in kinds]:
                    if not omit and len(modes) == 2:
                        # A full join's own work dwarfs any wait: measured
                        # after the idle wait only.
                        modes = [True]
                    runs: dict[bool, list[dict[str, Any]]] = {m: [] for m in modes}
                    for i in range(repeats):
                        for idle in modes:
                            name = f"{'p' if omit else 'f'}{i}{'i' if idle else ''}"
                            runs[idle].append(
                                await _measure(
                                    hs, room_id, f"@{name}:{REMOTE}", omit,
                                    Path(profile_dir) / f"{variant}-{n}-{name}.json" if profile_dir and omit else None,
                                    idle=idle,
                                )
                            )
                    for idle in modes:
                        results.append(_summary(n, variant, omit, idle, runs[idle], db_backend))
                hs.stop()
            finally:
                await resident.stop()
            _write(results)


def _summary(
    n: int, variant: str, omit: bool, idle: bool, runs: list[dict[str, Any]], db: str = "sqlite"
) -> dict[str, Any]:
    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    return {
        "db": db,
        "members": n,
        "variant": variant,
        "send_join": "partial" if omit else "full",
        "after": "idle" if idle else "previous join",
        "seconds": median("seconds"),
        "cpu_seconds": median("cpu_seconds"),
        "db_transactions": median("db_transactions"),
        "rss_growth_mib": median("rss_growth_mib"),
        "rss_retained_mib": median("rss_retained_mib"),
        "db_seconds": median("db_seconds"),
        "process_cpu_seconds": median("process_cpu_seconds"),
        "idle_wait_seconds": median("idle_wait_seconds") if idle else None,
        "beside_db_seconds": statistics.median(r["beside"]["db_seconds"] for r in runs)
        if all(r.get("beside") for r in runs)
        else None,
        "make_join": {
            key: statistics.median(r["make_join"][key] for r in runs)
            for key in ("seconds", "cpu_seconds", "db_seconds", "db_transactions")
        },
        "state": runs[-1]["state"],
        "auth_chain": runs[-1]["auth_chain"],
        "bytes": runs[-1]["bytes"],
        "runs": runs,
    }


def _write(results: list[dict[str, Any]]) -> None:
    out = Path(os.environ.get("FASTJOIN_RESIDENT_BENCH_OUT", ROOT / "docs/bench/resident-send-join"))
    # Appended, not with_suffix: a prefix may hold dots ("resident-0.7-sqlite").
    json_path, md_path = Path(f"{out}.json"), Path(f"{out}.md")
    json_path.write_text(json.dumps(results, indent=1))
    lines = [
        "| members | variant | /send_join | after | time (median) | CPU | DB time | DB txns | process CPU"
        " | DB time beside | peak RSS growth | RSS kept | state | auth_chain | bytes |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        after = r.get("after", "previous join")
        if r.get("idle_wait_seconds") is not None:
            after += f" ({r['idle_wait_seconds']:.1f} s)"
        process = r.get("process_cpu_seconds")
        kept = r.get("rss_retained_mib")
        beside = r.get("beside_db_seconds")
        lines.append(
            f"| {r['members']:,} | {r['variant']} | {r['send_join']} | {after} | {r['seconds'] * 1000:,.0f} ms"
            f" | {r['cpu_seconds'] * 1000:,.0f} ms | {r['db_seconds'] * 1000:,.0f} ms | {r['db_transactions']:.0f}"
            f" | {'–' if process is None else f'{process * 1000:,.0f} ms'}"
            f" | {'–' if beside is None else f'{beside * 1000:,.0f} ms'}"
            f" | {r['rss_growth_mib']:.1f} MiB | {'–' if kept is None else f'{kept:.1f} MiB'}"
            f" | {r['state']:,} | {r['auth_chain']:,} | {r['bytes']:,} |"
        )
    md_path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
