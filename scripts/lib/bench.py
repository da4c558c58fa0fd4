"""Side-by-side benchmark of remote joins of generated rooms.

For each database, room size and traffic rate, the same generated room is
joined by
  stock       stock Synapse 1.163.2 (its built-in faster joins),
  stock-full  stock Synapse against a resident that ignores omit_members,
  patched     patched Synapse with synapse-fastjoin enabled,
each from a fresh server and a fresh fake resident process, and measured:

  T_join     POST /join until 200
  T_full     from the start of the join until a request that needs the full
             state answers (the state event of one remote member)
  T_members  the /members request after that, and the same request again
             once the joiner is idle (idle T_members)
  T_idle     from the start of the join until the joiner is idle again (under
             5 % of a core for 3 s in a row, after /members), and the CPU
             seconds it used until then: the work a join leaves behind (user
             directory, sliding-sync tables, caches) counts too
  peak RSS and CPU seconds of the joining Synapse and its child processes
             (check processes) from /proc
  bytes served per federation endpoint (counted by the fake resident)
  responsiveness: latency of GET /account/whoami polled every 100 ms from the
             join until T_full
  live traffic: events injected by the resident at the given rate from the
             join until T_full, and how many the joiner persisted
and the final member list and current state are compared with the resident's.

Run it through `scripts/bench` (see --help there).
"""

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.harness.fakehs.process import FakeResidentProcess  # noqa: E402
from tests.harness.fakehs.room import RoomSpec, load_or_generate  # noqa: E402
from tests.harness.postgres import PostgresAdmin  # noqa: E402
from tests.harness.synapse import SynapseServer, merge_config  # noqa: E402

VARIANTS = ("stock", "stock-full", "patched")
# T_full is measured with a request that waits for the full state: it must
# wait as long as the resync takes, as it does on stock Synapse.
MODULE = {
    "modules": [
        {"module": "synapse_fastjoin.FastJoinModule", "config": {"client_wait_timeout_seconds": 0}}
    ]
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def http(method: str, url: str, token: str | None = None, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class ProcSampler(threading.Thread):
    """Samples a process's RSS and CPU time from /proc every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_rss = 0
        self.stop_event = threading.Event()
        self.cpu_start = self.cpu_seconds()
        self.started = time.monotonic()
        self.timeline: list[tuple[float, float, float]] = []
        """(seconds since start, RSS MB, CPU seconds since start), once a second."""

    def tree(self) -> list[int]:
        """The process and its live children (a joiner's check processes):
        their memory and CPU count as the joiner's."""
        pids = [self.pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == self.pid:
                    pids.append(int(entry.name))
        return pids

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.tree():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # utime + stime, and for the joiner the children it has reaped.
            total += int(fields[11]) + int(fields[12])
            if pid == self.pid:
                total += int(fields[13]) + int(fields[14])
        return total / os.sysconf("SC_CLK_TCK")

    def rss(self) -> int:
        total = 0
        for pid in self.tree():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                continue
        return total

    def run(self) -> None:
        next_point = 0.0
        while not self.stop_event.wait(self.interval):
            try:
                rss = self.rss()
                self.peak_rss = max(self.peak_rss, rss)
                offset = time.monotonic() - self.started
                if offset >= next_point:
                    self.timeline.append((round(offset, 1), round(rss / 2**20, 1),
                                          round(self.cpu_seconds() - self.cpu_start, 2)))
                    next_point = offset + 1.0
            except OSError:
                return

    def wait_idle(self, timeout: float, window: float = 3.0, share: float = 0.05) -> float | None:
        """Block until the process used under `share` of a core for `window`
        seconds in a row; returns the monotonic time the idle window began
        (None on timeout)."""
        deadline = time.monotonic() + timeout
        window_start, cpu_at_start = time.monotonic(), self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now, cpu = time.monotonic(), self.cpu_seconds()
            if cpu - cpu_at_start > share * max(window, now - window_start):
                window_start, cpu_at_start = now, cpu
            elif now - window_start >= window:
                return window_start
        return None

    def finish(self) -> dict[str, float]:
        self.stop_event.set()
        self.join()
        self.peak_rss = max(self.peak_rss, self.rss())
        return {"peak_rss_mb": self.peak_rss / 2**20, "cpu_s": self.cpu_seconds() - self.cpu_start,
                "timeline": self.timeline}


class LatencyPoller(threading.Thread):
    """GET whoami every 100 ms; records (offset, latency) until stopped."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.token = token
        self.samples: list[float] = []
        self.errors = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                status, _ = http("GET", self.url, self.token, timeout=30)
                if status != 200:
                    self.errors += 1
            except Exception:
                self.errors += 1
            latency = time.monotonic() - started
            self.samples.append(latency)
            self.stop_event.wait(max(0.0, 0.1 - latency))

    def finish(self) -> dict[str, float | int]:
        self.stop_event.set()
        self.join()
        s = sorted(self.samples) or [0.0]
        return {
            "latency_p50_ms": 1000 * s[len(s) // 2],
            "latency_p99_ms": 1000 * s[min(len(s) - 1, int(len(s) * 0.99))],
            "latency_max_ms": 1000 * s[-1],
            "latency_samples": len(self.samples),
            "latency_errors": self.errors,
        }


class Profiler:
    """py-spy recording of the joiner (all threads, idle ones included) over
    a stretch of the run (the join until T_full, each /members request), as raw collapsed stacks (.txt: one
    line per stack, `frame;frame;... count`), which flamegraph tools read."""

    def __init__(self, pid: int, prefix: Path) -> None:
        import subprocess

        prefix.parent.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.proc: Any = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", "50", "--threads", "--idle",
             "--format", "raw", "--output", str(prefix.with_suffix(".txt"))],
            stdout=subprocess.DEVNULL, stderr=open(prefix.with_suffix(".log"), "w"),
        )

    def stop(self) -> None:
        import signal

        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()
        self.proc = None


def wait_for_background_updates(server: SynapseServer, timeout: float = 600.0) -> float:
    """Wait until the server's database has no background update left;
    returns how long that took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.database.query("SELECT COUNT(*) FROM background_updates")[0][0] == 0:
            return time.monotonic() - started
        time.sleep(0.5)
    raise RuntimeError(f"background updates still running after {timeout:.0f} s")


def current_state(server: SynapseServer, room_id: str) -> list[list[str]]:
    rows = server.database.query(
        "SELECT type, state_key, event_id FROM current_state_events WHERE room_id = "
        + server.database.placeholder,
        (room_id,),
    )
    return sorted([list(r) for r in rows])


def accepted_rows(server: SynapseServer, event_ids: list[str], columns: str) -> list[tuple[Any, ...]]:
    """`columns` of those of `event_ids` the server stored as accepted,
    non-outlier events."""
    rows: list[tuple[Any, ...]] = []
    p = server.database.placeholder
    for i in range(0, len(event_ids), 500):
        chunk = event_ids[i : i + 500]
        rows.extend(server.database.query(
            f"SELECT {columns} FROM events e LEFT JOIN rejections r USING (event_id)"
            f" WHERE e.outlier = {'FALSE' if server.database.backend == 'postgres' else '0'}"
            f" AND r.event_id IS NULL AND e.event_id IN ({','.join([p] * len(chunk))})",
            tuple(chunk),
        ))
    return rows


def persisted(server: SynapseServer, event_ids: list[str]) -> int:
    """How many of `event_ids` the server stored as accepted, non-outlier events."""
    return len(accepted_rows(server, event_ids, "e.event_id"))


def unstored_whereabouts(server: SynapseServer, event_ids: list[str]) -> dict[str, int]:
    """Where the live events not stored as accepted are when the benchmark's
    wait ends: still in Synapse's inbound staging, in the module's list of
    events dropped past the queue's bound (by state: to fetch again,
    fetched and queued again, failed), stored rejected or as outliers only,
    or nowhere on the joiner (never received, or received and then dropped
    without a record: stock Synapse's pruning of its queue)."""
    stored = set(r[0] for r in accepted_rows(server, event_ids, "e.event_id"))
    missing = [e for e in event_ids if e not in stored]
    found: dict[str, int] = {}
    located: set[str] = set()
    p = server.database.placeholder

    def count(label: str, sql: str) -> None:
        for i in range(0, len(missing), 500):
            chunk = missing[i : i + 500]
            try:
                rows = server.database.query(sql.format(ids=",".join([p] * len(chunk))), tuple(chunk))
            except Exception:
                return  # (stock has no fastjoin_inbound_dropped)
            for row in rows:
                key = label.format(*row[1:])
                if row[0] not in located:
                    located.add(row[0])
                    found[key] = found.get(key, 0) + 1

    false = "FALSE" if server.database.backend == "postgres" else "0"
    count("staged", "SELECT DISTINCT event_id FROM federation_inbound_events_staging WHERE event_id IN ({ids})")
    count("dropped, {}", "SELECT event_id, state FROM fastjoin_inbound_dropped WHERE event_id IN ({ids})")
    count("rejected", "SELECT event_id FROM rejections WHERE event_id IN ({ids})")
    count("outlier", f"SELECT event_id FROM events WHERE outlier != {false} AND event_id IN ({{ids}})")
    if missing:
        found["nowhere"] = len(missing) - len(located)
    return found


def live_timings(server: SynapseServer, event_ids: list[str], full_wall_ms: int) -> dict[str, Any]:
    """How the live events fared, from the joiner's own rows: each one's lag
    from its creation at the resident (`origin_server_ts`; one machine, one
    clock) to its storing as accepted (`events.received_ts`), and how many
    were stored while the room was still partial (before T_full)."""
    rows = accepted_rows(server, event_ids, "e.origin_server_ts, e.received_ts")
    lags = sorted((received_ts - origin_ts) / 1000 for origin_ts, received_ts in rows)
    during = sum(1 for _, received_ts in rows if received_ts <= full_wall_ms)

    def pick(q: float) -> float | None:
        return lags[min(len(lags) - 1, int(q * len(lags)))] if lags else None

    return {"live_during_partial": during, "live_lag_p50_s": pick(0.5), "live_lag_p99_s": pick(0.99),
            "live_lag_max_s": pick(1.0)}


_CATCHUP_LINE = re.compile(r"caught up (\d+) events that arrived while partial in ([0-9.]+) s")


def catchup_from_log(server: SynapseServer) -> dict[str, Any]:
    """The engine's catch-up of the events stored while partial, from its log
    line (none: nothing to catch up, or stock Synapse)."""
    done = seconds = 0.0
    for match in _CATCHUP_LINE.finditer(server.read_log()):
        done += int(match.group(1))
        seconds += float(match.group(2))
    return {"catchup_events": int(done), "catchup_s": seconds} if done else {}


class LiveWatcher(threading.Thread):
    """From T_full on, how long until every injected live event is stored as
    accepted (issue 10: within 30 s of T_full); checked once a second, for at
    most `limit` seconds."""

    def __init__(self, server: SynapseServer, event_ids: list[str], since: float, limit: float = 300.0) -> None:
        super().__init__(daemon=True)
        self.server, self.event_ids, self.since, self.limit = server, event_ids, since, limit
        self.done_after: float | None = None
        self.error: str | None = None
        self.stop_event = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stop_event.is_set() and time.monotonic() - self.since < self.limit:
            try:
                if persisted(self.server, self.event_ids) >= len(self.event_ids):
                    self.done_after = time.monotonic() - self.since
                    return
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"  # the database is busy: next second
            self.stop_event.wait(1.0)

    def finish(self) -> float | None:
        """Seconds after T_full when all were stored (None: not within the limit,
        or not yet when asked)."""
        self.stop_event.set()
        self.join(timeout=30)
        if self.done_after is None and time.monotonic() - self.since < self.limit:
            # The caller saw them all before this thread's next check (it
            # checks once a second): one last look, so that a run where they
            # were all stored is not reported as "never".
            try:
                if persisted(self.server, self.event_ids) >= len(self.event_ids):
                    self.done_after = time.monotonic() - self.since
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
        return self.done_after


def interesting_log_lines(server: SynapseServer, limit: int = 40) -> list[str]:
    keys = ("partial", "resync", "Syncing state", "state for room", "Updating current state",
            "Clearing partial", "giving up", "Failed", "ERROR", "CRITICAL", "Pruning")
    lines = [line for line in server.read_log().splitlines() if any(k in line for k in keys)]
    return lines[:limit // 2] + (["..."] if len(lines) > limit else []) + lines[-limit // 2:]


def run_one(
    args: argparse.Namespace, spec: RoomSpec, db: str, traffic: float, variant: str, workdir: Path,
    dead: float = 0.0, kinds: str = "-",
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "variant": variant, "db": db, "members": spec.members, "servers": spec.servers,
        "traffic": traffic, "dead": dead, "kinds": kinds, "ok": False,
    }
    if variant == "patched" and args.module_config:
        result["module_config"] = json.loads(args.module_config)
    fake = FakeResidentProcess(
        spec, workdir / "fake", full_join_only=(variant == "stock-full"), python=sys.executable,
        dead_fraction=dead, dead_kinds=None if kinds in ("-", "mixed") else kinds.split("+"),
        slow_dns_seconds=args.slow_dns_seconds,
    )
    joiner: SynapseServer | None = None
    profiler: Profiler | None = None
    try:
        fake.start()
        module = MODULE
        if variant == "patched" and args.module_config:
            module = {"modules": [{
                "module": MODULE["modules"][0]["module"],
                "config": merge_config(MODULE["modules"][0]["config"], json.loads(args.module_config)),
            }]}
        config = merge_config(fake.trusted_key_servers_config(), module if variant == "patched" else None)
        joiner = SynapseServer(
            workdir / "joiner", variant="patched" if variant == "patched" else "stock", db=db,
            config=config, name=f"joiner-{variant}",
            postgres=PostgresAdmin.from_env() if db == "postgres" else None,
            netsim_table=fake.netsim_table,
        )
        joiner.start()
        _, token = joiner.register_user("bench")
        # A new server runs its schema's background updates (index builds)
        # in its first minute or two; a server that has been up for a while
        # has none. Joining before they end would time them, in either
        # variant, at a random point of the join.
        result["background_updates_wait_s"] = wait_for_background_updates(joiner)
        base = joiner.client_url + "/_matrix/client/v3"
        room = urllib.parse.quote(fake.room_id, safe="")
        remote_member = urllib.parse.quote(spec.member(spec.members - 1), safe="")

        sampler = ProcSampler(joiner.pid)  # type: ignore[arg-type]
        profiler = (
            Profiler(joiner.pid, args.profile / f"{db}-{spec.members}-{traffic:g}-{variant}-{int(time.time())}")  # type: ignore[arg-type]
            if args.profile else None
        )
        poller = LatencyPoller(base + "/account/whoami", token)
        sampler.start()
        poller.start()
        started = time.monotonic()
        status, body = http(
            "POST", f"{base}/join/{room}?server_name={urllib.parse.quote(fake.server_name)}",
            token, {}, timeout=args.timeout,
        )
        result["t_join"] = time.monotonic() - started
        if status != 200:
            raise RuntimeError(f"join failed: {status} {body}")
        if traffic:
            fake.inject(traffic, int(traffic * args.timeout), state_every=args.state_every)
        status, body = http("GET", f"{base}/rooms/{room}/state/m.room.member/{remote_member}", token,
                            timeout=max(1.0, args.timeout - (time.monotonic() - started)))
        result["t_full"] = time.monotonic() - started
        full_wall_ms = int(time.time() * 1000)
        # The resync's own peak, before /members (whose serialisation of every
        # member is Synapse's and the same in every variant) adds its own.
        result["peak_rss_to_full_mb"] = max(sampler.peak_rss, sampler.rss()) / 2**20
        if status != 200:
            raise RuntimeError(f"full-state request failed: {status} {body}")
        result.update(poller.finish())
        injected = fake.stop_injecting() if traffic else 0
        live_watch = LiveWatcher(joiner, fake.injected(), since=started + result["t_full"]) if traffic else None

        if profiler is not None:
            profiler.stop()
        members_profiler = Profiler(joiner.pid, profiler.prefix.with_name(profiler.prefix.name + "-members")) \
            if profiler is not None else None  # type: ignore[arg-type]
        if members_profiler is not None:
            time.sleep(0.5)  # (py-spy attaching)
        members_started = time.monotonic()
        status, body = http("GET", f"{base}/rooms/{room}/members", token, timeout=args.timeout)
        result["t_members"] = time.monotonic() - members_started
        if members_profiler is not None:
            members_profiler.stop()
        if status != 200:
            raise RuntimeError(f"/members failed: {status}")
        joined = sorted(m["state_key"] for m in body["chunk"] if m["content"]["membership"] == "join")
        idle_at = sampler.wait_idle(timeout=args.idle_timeout)
        result["t_idle"] = idle_at - started if idle_at is not None else None
        # The same request again once the joiner is idle (or the idle wait
        # gave up): what /members costs with nothing else running, so that
        # T_members minus this is what it paid for work still going on.
        members_profiler = Profiler(joiner.pid, profiler.prefix.with_name(profiler.prefix.name + "-members-idle")) \
            if profiler is not None else None  # type: ignore[arg-type]
        if members_profiler is not None:
            time.sleep(0.5)  # (py-spy attaching)
        members_started = time.monotonic()
        status, body = http("GET", f"{base}/rooms/{room}/members", token, timeout=args.timeout)
        result["t_members_idle"] = time.monotonic() - members_started
        if members_profiler is not None:
            members_profiler.stop()
        if status != 200:
            raise RuntimeError(f"/members (idle) failed: {status}")
        result.update(sampler.finish())

        if traffic:
            # Live events still in flight reach the joiner within a few seconds.
            ids = fake.injected()
            deadline = time.monotonic() + 120
            while True:
                result["live_persisted"] = persisted(joiner, ids)
                if result["live_persisted"] >= len(ids) or time.monotonic() > deadline:
                    break
                time.sleep(2)
            result["live_injected"] = injected
            assert live_watch is not None
            result["live_all_after_full_s"] = live_watch.finish()
            if live_watch.error is not None:
                result["live_watch_error"] = live_watch.error
            result.update(live_timings(joiner, ids, full_wall_ms))
            result["live_unstored"] = unstored_whereabouts(joiner, ids)
            result.update(catchup_from_log(joiner))
        expected_members = fake.control("GET", "/room/members")["members"]
        result["members_match"] = joined == expected_members
        expected_state = fake.control("GET", "/room/state")["state"]
        result["state_match"] = current_state(joiner, fake.room_id) == sorted(expected_state)
        stats = fake.stats()
        result["bytes_served"] = stats["bytes_served"]
        if traffic:
            # Whether the live traffic's sender got everything through.
            result["fake_sender"] = {k: stats.get(k) for k in (
                "injected_sent", "send_failures", "pdu_error_count", "pdu_errors", "send_queued")}
        result["ok"] = True
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        log(f"  {variant}: FAILED: {result['error']}")
        if joiner is not None:
            result["log_excerpt"] = interesting_log_lines(joiner)
    finally:
        if profiler is not None:
            profiler.stop()
        if joiner is not None:
            joiner.close()
        fake.stop()
    return result


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["db"], r["members"], r["servers"], r["traffic"], r.get("dead", 0.0),
                           r.get("kinds", "-"), r["variant"]), []).append(r)
    rows = []
    for (db, n, s, traffic, dead, kinds, variant), runs in groups.items():
        ok = [r for r in runs if r["ok"]]
        row: dict[str, Any] = {"db": db, "members": n, "servers": s, "traffic": traffic, "dead": dead,
                               "kinds": kinds, "variant": variant, "runs": len(runs), "ok": len(ok)}
        for key in ("t_join", "t_full", "t_members", "t_members_idle", "t_idle", "peak_rss_to_full_mb", "peak_rss_mb", "cpu_s", "latency_p50_ms",
                    "latency_p99_ms", "latency_max_ms", "live_injected", "live_persisted", "live_all_after_full_s",
                    "live_during_partial", "live_lag_p50_s", "live_lag_p99_s", "live_lag_max_s",
                    "catchup_events", "catchup_s"):
            row[key] = median([r[key] for r in ok if r.get(key) is not None])
        row["members_match"] = all(r.get("members_match") for r in ok) if ok else None
        row["state_match"] = all(r.get("state_match") for r in ok) if ok else None
        rows.append(row)
    for row in rows:
        base = next((b for b in rows if b["variant"] == "stock" and all(
            b[k] == row[k] for k in ("db", "members", "servers", "traffic", "dead", "kinds"))), None)
        if base and base["t_full"] and row["t_full"]:
            row["t_full_speedup_vs_stock"] = base["t_full"] / row["t_full"]
    return rows


def fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| db | N | S | traffic/s | variant | ok/runs | T_join s | T_full s | × stock | T_members s | idle T_members s | T_idle s "
            "| RSS to T_full MB | peak RSS MB | CPU s | p50 ms | p99 ms | max ms | live persisted | members = | state = |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in sorted(rows, key=lambda r: (r["db"], r["traffic"], r["members"], VARIANTS.index(r["variant"]))):
        # Nothing is injected when the join itself already brought the full state.
        live = (f"{fmt(r['live_persisted'], '.0f')}/{fmt(r['live_injected'], '.0f')}"
                + (f" (all +{r['live_all_after_full_s']:.0f} s)" if r.get("live_all_after_full_s") is not None else "")
                if r["traffic"] and r["live_injected"] else "–")
        lines.append(
            f"| {r['db']} | {r['members']:,} | {r['servers']:,} | {r['traffic']:g} | {r['variant']} "
            f"| {r['ok']}/{r['runs']} | {fmt(r['t_join'], '.2f')} | {fmt(r['t_full'])} "
            f"| {fmt(r.get('t_full_speedup_vs_stock'), '.2f')} | {fmt(r['t_members'])} | {fmt(r.get('t_members_idle'))} | {fmt(r.get('t_idle'))} | {fmt(r.get('peak_rss_to_full_mb'), '.0f')} | {fmt(r['peak_rss_mb'], '.0f')} "
            f"| {fmt(r['cpu_s'])} | {fmt(r['latency_p50_ms'], '.0f')} | {fmt(r['latency_p99_ms'], '.0f')} "
            f"| {fmt(r['latency_max_ms'], '.0f')} | {live} | {fmt(r['members_match'])} | {fmt(r['state_match'])} |"
        )
    return "\n".join(lines)


def live_table(rows: list[dict[str, Any]]) -> str:
    """Issue 10's figures for the runs with live traffic: how many live events
    were stored while the room was partial, each one's lag from its creation
    to its storing, and the engine's catch-up of them after the state came."""
    rows = [r for r in rows if r["traffic"] and r.get("live_injected")]
    if not rows:
        return ""
    head = ("| db | N | traffic/s | variant | T_full s | injected | stored while partial | stored in all "
            "| all stored, s after T_full | lag p50 s | lag p99 s | lag max s | caught up | catch-up s | catch-up/s |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in sorted(rows, key=lambda r: (r["db"], r["traffic"], r["members"], VARIANTS.index(r["variant"]))):
        done, took = r.get("catchup_events"), r.get("catchup_s")
        lines.append(
            f"| {r['db']} | {r['members']:,} | {r['traffic']:g} | {r['variant']} | {fmt(r['t_full'])} "
            f"| {fmt(r['live_injected'], '.0f')} | {fmt(r.get('live_during_partial'), '.0f')} "
            f"| {fmt(r['live_persisted'], '.0f')} | {fmt(r.get('live_all_after_full_s'))} "
            f"| {fmt(r.get('live_lag_p50_s'))} | {fmt(r.get('live_lag_p99_s'))} | {fmt(r.get('live_lag_max_s'))} "
            f"| {fmt(done, '.0f')} | {fmt(took)} | {fmt(done / took if done and took else None, '.0f')} |"
        )
    return "\n".join(lines)


def grid_table(rows: list[dict[str, Any]]) -> str:
    """One line per cell: stock and patched side by side."""
    head = ("| db | N | S | dead | kinds | stock T_full s | patched T_full s | × stock | ok (stock/patched) "
            "| state = |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    cells = sorted({(r["db"], r["members"], r["servers"], r["dead"], r["kinds"]) for r in rows})
    for cell in cells:
        by = {r["variant"]: r for r in rows
              if (r["db"], r["members"], r["servers"], r["dead"], r["kinds"]) == cell}
        st, pa = by.get("stock", {}), by.get("patched", {})
        ratio = st.get("t_full") / pa["t_full"] if st.get("t_full") and pa.get("t_full") else None
        lines.append(
            f"| {cell[0]} | {cell[1]:,} | {cell[2]:,} | {cell[3]:.0%} | {cell[4]} | {fmt(st.get('t_full'), '.2f')} "
            f"| {fmt(pa.get('t_full'), '.2f')} | {fmt(ratio, '.2f')} "
            f"| {st.get('ok', 0)}/{st.get('runs', 0)} {pa.get('ok', 0)}/{pa.get('runs', 0)} "
            f"| {fmt(pa.get('state_match'))} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    configs = sorted({(r["db"], r["traffic"]) for r in rows})
    fig, axes = plt.subplots(1, len(configs), figsize=(5.5 * len(configs), 4.2), squeeze=False)
    for ax, (db, traffic) in zip(axes[0], configs):
        for variant in VARIANTS:
            pts = sorted((r["members"], r["t_full"]) for r in rows
                         if (r["db"], r["traffic"], r["variant"]) == (db, traffic, variant) and r["t_full"])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
        ax.set_title(f"{db}, {traffic:g} live events/s")
        ax.set_xlabel("members (N)")
        ax.set_ylabel("T_full: join until full state (s)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def write_outputs(
    args: argparse.Namespace, results: list[dict[str, Any]], started: float, final: bool
) -> list[dict[str, Any]]:
    """Write the .json (every run), .md (the table) and, at the end, the .png."""
    rows = summarise(results)
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "duration_s": time.time() - started,
        "complete": final,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # (The prefix may hold dots, as in engine-0.6-sqlite: add, never replace.)
    args.out.with_name(args.out.name + ".json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": results}, indent=1))
    table = grid_table(rows) if args.grid else markdown_table(rows)
    live = "" if args.grid else live_table(rows)
    if live:
        table += "\n\nLive events (issue 10):\n\n" + live
        unstored = [r for r in results if r.get("live_unstored")]
        if unstored:
            table += "\n\nLive events not stored when the wait ended, and where they were:\n\n" + "\n".join(
                f"- {r['db']} N={r['members']:,} {r['traffic']:g}/s {r['variant']} run {r.get('repeat', 0) + 1}: "
                + ", ".join(f"{n:,} {where}" for where, n in sorted(r["live_unstored"].items()))
                for r in unstored
            )
    args.out.with_name(args.out.name + ".md").write_text(table + "\n")
    if final and not args.grid:
        plot(rows, args.out.with_name(args.out.name + ".png"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000,200000", help="room sizes N (comma-separated)")
    parser.add_argument("--servers", default="1000",
                        help="server names S the members are spread over (comma-separated)")
    parser.add_argument("--dead", default="0",
                        help="share of the room's other servers that are dead (comma-separated, e.g. 0,0.5,0.99)")
    parser.add_argument("--dead-kinds", default="mixed",
                        help="how the dead servers fail, one run each (comma-separated): mixed (every kind "
                             "in turn) or a kind (nxdomain_slow, refuse, hang, error5xx, notfound404, partial), "
                             "or kinds joined with +")
    parser.add_argument("--slow-dns-seconds", type=float, default=3.0,
                        help="how long a lookup of a dead name takes (nxdomain_slow)")
    parser.add_argument("--grid", action="store_true",
                        help="write the stock-vs-patched table per cell (N, S, dead, kinds)")
    parser.add_argument("--traffic", default="0", help="live events per second during the resync (comma-separated)")
    parser.add_argument("--state-every", type=int, default=0, help="every Nth live event is a topic change")
    parser.add_argument("--db", default="sqlite", help="sqlite, postgres or both (comma-separated)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds a run may take")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench" / "latest",
                        help="prefix for the .json, .md and .png written")
    parser.add_argument("--idle-timeout", type=float, default=900.0,
                        help="how long to wait after /members for the joiner to go idle (T_idle)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record the joiner with py-spy from the join until T_full, and apart during each"
                             " /members request (raw stacks in DIR: *-members.txt, *-members-idle.txt)")
    parser.add_argument("--keep", action="store_true", help="keep each run's data directory")
    parser.add_argument("--module-config", metavar="JSON",
                        help="merged into the patched joiner's module config, e.g."
                        ' \'{"resync": {"persist_batch_size": 2000}}\'')
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="run nothing: combine the runs of earlier .json outputs into --out")
    args = parser.parse_args()

    if args.merge:
        runs = [r for path in args.merge for r in json.loads(path.read_text())["runs"]]
        rows = write_outputs(args, runs, time.time(), final=True)
        print(markdown_table(rows))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    server_counts = [int(s) for s in args.servers.split(",")]
    deads = [float(d) for d in args.dead.split(",")]
    kind_sets = args.dead_kinds.split(",")
    traffics = [float(t) for t in args.traffic.split(",")]
    dbs = args.db.split(",")
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v}")
    for n in sizes:
        for s in server_counts:
            log(f"Preparing the generated room of {n:,} members over {s:,} servers ...")
            load_or_generate(RoomSpec(members=n, servers=s))

    results: list[dict[str, Any]] = []
    started = time.time()
    for db in dbs:
        for traffic in traffics:
            cells = [(n, s, dead, kinds) for n in sizes for s in server_counts for dead in deads
                     for kinds in (kind_sets if dead else ["-"])]
            for n, s, dead, kinds in cells:
                spec = RoomSpec(members=n, servers=s)
                for repeat in range(args.repeats):
                    # Interleave the variants so that drifts of a noisy machine hit all alike.
                    for variant in variants:
                        workdir = Path(tempfile.mkdtemp(prefix=f"bench-{variant}-"))
                        log(f"{db} N={n:,} S={s:,} dead={dead:.0%} ({kinds}) traffic={traffic:g}/s {variant}"
                            f" (run {repeat + 1}/{args.repeats}) ...")
                        r = run_one(args, spec, db, traffic, variant, workdir, dead, kinds)
                        r["repeat"] = repeat
                        results.append(r)
                        if r["ok"]:
                            log(f"  join {r['t_join']:.2f}s full {r['t_full']:.1f}s members {r['t_members']:.1f}s"
                                f" (idle {fmt(r.get('t_members_idle'))}s) idle {fmt(r.get('t_idle'))}s"
                                f" rss {r['peak_rss_mb']:.0f}MB cpu {r['cpu_s']:.0f}s p99 {r['latency_p99_ms']:.0f}ms"
                                + (f" live {r['live_persisted']}/{r['live_injected']}" if traffic else "")
                                + (f" (not stored: {r['live_unstored']})" if r.get("live_unstored") else ""))
                        if args.keep or not r["ok"]:
                            r["workdir"] = str(workdir)
                        else:
                            shutil.rmtree(workdir, ignore_errors=True)
                        # Written after every run, so a run cut short keeps what finished.
                        write_outputs(args, results, started, final=False)
    rows = write_outputs(args, results, started, final=True)
    print()
    print(grid_table(rows) if args.grid else markdown_table(rows))
    log(f"Wrote {args.out}.json, .md and .png")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
