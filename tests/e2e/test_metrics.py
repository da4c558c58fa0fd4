"""The module's Prometheus metrics, scraped by a real Prometheus from a real
patched Synapse during a real partial-state join, and the Grafana dashboard's
queries evaluated against what it scraped.

The fake resident holds the first `/state_ids` (so Prometheus sees the room
partial and the resync waiting for it), then fails it once (a failure and a
retry) and forges the signatures of the first `/state` (bad signatures, the
events fetched again). At the end the counters have moved, the gauges are back
to zero, and every query of `contrib/grafana/synapse-fastjoin.json` returns
data from this Prometheus.
"""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
import pytest_twisted

from tests.e2e.test_fake_resident import trusting
from tests.harness.client import poll_until, sleep
from tests.harness.fakehs.room import RoomSpec, load_or_generate
from tests.harness.fakehs.server import FakeResident, Rule
from tests.harness.prometheus import Prometheus, PrometheusUnavailable, ensure_installed
from tests.harness.synapse import REPO_ROOT, free_port, merge_config

DASHBOARD = REPO_ROOT / "contrib" / "grafana" / "synapse-fastjoin.json"
# FASTJOIN_METRICS_MEMBERS makes the room bigger, and FASTJOIN_METRICS_PLOT=<png>
# draws the dashboard's main panels from this run's Prometheus with
# scripts/plot-metrics (run by $FASTJOIN_METRICS_PLOT_PYTHON, which needs
# matplotlib): that is how docs/metrics-panels.png is made.
SPEC = RoomSpec(members=int(os.environ.get("FASTJOIN_METRICS_MEMBERS", "300")), servers=1, history=10)
PLOT = os.environ.get("FASTJOIN_METRICS_PLOT")
STATE = r"^/_matrix/federation/v1/state/[^/]+$"
STATE_IDS = r"^/_matrix/federation/v1/state_ids/[^/]+$"
TIMEOUT = 45.0 + SPEC.members / 200

# What the dashboard's Grafana variables stand for when its queries are
# evaluated here.
RATE_WINDOW = "1m"


@pytest.fixture(scope="session")
def prometheus_installed() -> str:
    """The prometheus binary. Skips when it cannot be installed, except in CI
    (CI=true), where that is a failure."""
    try:
        return ensure_installed()
    except PrometheusUnavailable as e:
        reason = f"prometheus is not installed and could not be installed: {e}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def joiner_config(resident: FakeResident, metrics_port: int, listeners: list) -> dict[str, Any]:
    return merge_config(
        trusting(resident),
        {
            "enable_metrics": True,
            "listeners": listeners
            + [{"type": "metrics", "port": metrics_port, "bind_addresses": ["127.0.0.1"]}],
            "modules": [
                {
                    "module": "synapse_fastjoin.FastJoinModule",
                    "config": {
                        "resync": {
                            "backoff_initial_seconds": 1,
                            "backoff_max_seconds": 2,
                            "event_fetch_threshold": 5,
                            "log_interval_seconds": 1,
                        }
                    },
                }
            ],
        },
    )


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows included."""
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((panel.get("title", "?"), target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return out


def grafana_to_promql(expr: str, instance: str) -> str:
    """Substitute what Grafana would for the dashboard's variables."""
    for var, value in (
        ("$__rate_interval", RATE_WINDOW),
        ("$__interval", "5s"),
        ("$__range", "10m"),
        ("${instance}", instance),
        ("$instance", instance),
        ("${job}", "synapse"),
        ("$job", "synapse"),
    ):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown variable left in {expr!r}"
    return expr


_METRIC_NAME = re.compile(r"\b((?:synapse|process|python)_[a-zA-Z0-9_]+)")


@pytest_twisted.ensureDeferred
async def test_prometheus_sees_a_partial_join_and_every_dashboard_query_has_data(
    synapse_factory, tls_files, tmp_path, db_backend, prometheus_installed
):
    room = load_or_generate(SPEC, tmp_path / "rooms")
    resident = FakeResident(room, tls_files)
    resident.start()
    prom: Prometheus | None = None
    try:
        # Hold the first /state_ids; when let go, it fails once; the first
        # /state then carries forged signatures.
        resident.hold(STATE_IDS)
        resident.add_rule(Rule("fail", STATE_IDS, times=1))
        forge = resident.add_rule(Rule("forge", STATE, times=1, mode="bad_signature"))

        joiner = synapse_factory(variant="patched", name="joiner", start=False)
        metrics_port = free_port()
        joiner.update_config(
            joiner_config(resident, metrics_port, joiner.base_config()["listeners"])
        )
        joiner.start()
        prom = Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{metrics_port}"]).start()
        started = time.time()
        instance = f"127.0.0.1:{metrics_port}"

        async def scraped(expr: str, check=lambda v: v is not None) -> float:
            """Wait until Prometheus has a value of `expr` that passes `check`."""

            async def ok() -> tuple[float] | None:
                v = prom.value(expr)
                return (v,) if v is not None and check(v) else None  # (0.0,) is true

            try:
                (v,) = await poll_until(ok, timeout=TIMEOUT, interval=0.5, description=expr)
            except TimeoutError as e:
                raise AssertionError(f"{e}\n{scrape_state()}") from None
            return v

        def scrape_state() -> str:
            """Prometheus's view of the target, and what Synapse serves now."""
            health = [(t["health"], t["lastError"]) for t in prom.targets_up()]
            try:
                with urllib.request.urlopen(f"http://{instance}/_synapse/metrics", timeout=5) as r:
                    lines = [
                        line
                        for line in r.read().decode().splitlines()
                        if line.startswith("synapse_fastjoin_")
                    ]
            except OSError as e:
                lines = [f"cannot scrape: {e}"]
            return f"targets: {health}\n" + "\n".join(lines)

        # Before any join: the metrics are there, at zero.
        await scraped('up{job="synapse"}', lambda v: v == 1)
        assert await scraped("synapse_fastjoin_partial_state_rooms") == 0
        assert prom.value("synapse_fastjoin_resync_events_persisted_total") == 0

        user_id, token = joiner.register_user("joiner", admin=True)
        client = joiner.client(token)
        await client.join(room.room_id, server_name=resident.server_name, timeout=TIMEOUT)

        # While /state_ids is held: one partial room, its resync in that phase.
        await scraped("synapse_fastjoin_partial_state_rooms", lambda v: v == 1)
        await scraped(
            'synapse_fastjoin_resyncs_running{phase="fetching_state_ids"}', lambda v: v == 1
        )
        await scraped("synapse_fastjoin_partial_state_oldest_join_age_seconds", lambda v: v > 0)
        await scraped("synapse_fastjoin_partial_state_events", lambda v: v >= 1)
        assert prom.value("synapse_fastjoin_resync_events_persisted_total") == 0
        assert prom.value("synapse_fastjoin_resyncs_started_total") == 1
        assert prom.value("synapse_fastjoin_check_pool_queued") is not None

        resident.release()
        members = await client.members(room.room_id, timeout=TIMEOUT)
        joined = {m["state_key"] for m in members if m["content"]["membership"] == "join"}
        assert joined == set(room.joined_members())
        assert forge not in resident.rules, "the forged /state was never served"

        # The gauges are back to zero...
        await scraped("synapse_fastjoin_partial_state_rooms", lambda v: v == 0)
        await scraped("sum(synapse_fastjoin_resyncs_running)", lambda v: v == 0)
        await scraped("synapse_fastjoin_partial_state_events", lambda v: v == 0)
        await scraped("synapse_fastjoin_partial_state_oldest_join_age_seconds", lambda v: v == 0)
        await scraped("synapse_fastjoin_inbound_events_queued", lambda v: v == 0)
        await scraped("synapse_fastjoin_resync_next_retry_seconds", lambda v: v == 0)
        # ... and the counters have moved, as the real run did.
        # The member events are what the partial join left out.
        persisted = await scraped(
            "synapse_fastjoin_resync_events_persisted_total", lambda v: v >= SPEC.members
        )
        fetched = prom.value("synapse_fastjoin_resync_events_fetched_total")
        checked = prom.value("synapse_fastjoin_resync_events_checked_total")
        assert fetched >= checked >= persisted, (fetched, checked, persisted)
        assert prom.value("synapse_fastjoin_resync_events_bad_signatures_total") > 0
        assert prom.value("synapse_fastjoin_resync_received_bytes_total") > 10_000
        assert prom.value("synapse_fastjoin_resync_retries_total") >= 1
        failures = prom.query("synapse_fastjoin_resync_failures_total")
        assert failures and sum(float(f["value"][1]) for f in failures) >= 1, failures
        assert all(set(f["metric"]) >= {"reason", "server_name"} for f in failures)
        assert prom.value("synapse_fastjoin_resync_attempts_total") >= 2
        assert prom.value("synapse_fastjoin_resyncs_started_total") == 1
        assert prom.value("synapse_fastjoin_join_to_full_state_seconds_count") == 1
        # The join waited at least as long as the test held it.
        assert prom.value('synapse_fastjoin_join_to_full_state_seconds_bucket{le="1.0"}') == 0
        assert prom.value('synapse_fastjoin_resync_duration_seconds_count{outcome="complete"}') == 1
        assert prom.value("synapse_fastjoin_resync_catchup_batch_events_count") == 1
        # The counter never went down while Prometheus watched.
        assert prom.value(
            "resets(synapse_fastjoin_resync_events_persisted_total[5m])"
        ) == 0
        # The admin is told, at WARNING, that a server served forged events.
        assert re.search(
            r" - WARNING - .* \d+ events with bad signatures received", joiner.read_log()
        ), "no WARNING about the bad signatures"
        # No metric has a per-room label.
        for series in prom.api("series", {"match[]": '{__name__=~"synapse_fastjoin_.*"}'}):
            assert room.room_id not in json.dumps(series), series

        # Every query of the dashboard returns data from this Prometheus, and
        # names only metrics that exist.
        dashboard = json.loads(DASHBOARD.read_text())
        queries = dashboard_queries(dashboard)
        assert len(queries) >= 15
        exported = prom.metric_names()
        empty = []
        for title, expr in queries:
            promql = grafana_to_promql(expr, instance)
            unknown = {
                n for n in _METRIC_NAME.findall(promql) if n not in exported
            }
            assert not unknown, f"panel {title!r} names metrics nobody exports: {unknown}"
            if not prom.query(promql):
                empty.append((title, promql))
        assert not empty, f"dashboard queries without data: {empty}"
        # The dashboard's variables resolve too.
        for var in dashboard["templating"]["list"]:
            if var.get("type") == "query":
                m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
                assert m, var
                values = prom.api(f"label/{m.group(2)}/values", {"match[]": m.group(1)})
                assert instance in values or m.group(2) != "instance", values
                assert values, var
        if PLOT:
            await sleep(3)  # a few scrapes after the end, for the picture
            subprocess.run(
                [
                    os.environ.get("FASTJOIN_METRICS_PLOT_PYTHON", sys.executable),
                    str(REPO_ROOT / "scripts" / "plot-metrics"),
                    "--prometheus", prom.url, "--instance", instance,
                    "--start", str(started), "--end", str(time.time()),
                    "--title", f"synapse-fastjoin: one partial-state join of a room of"
                    f" {SPEC.members} members (fake resident: /state_ids held, then failed"
                    " once; first /state forged)",
                    "--out", PLOT,
                ],
                check=True,
            )  # fmt: skip
    finally:
        if prom is not None:
            prom.stop()
        await resident.stop()
