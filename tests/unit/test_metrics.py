"""The metrics collector: counters derived from the engine's ResyncProgress
objects stay monotonic across runs ending and restarting, the gauges follow
the running resyncs, and the progress line carries rate and ETA.

The engine here is a stand-in holding `progress` and `run_observers` (what the
collector reads); the e2e test (tests/e2e/test_metrics.py) runs the real one
under a real Prometheus."""

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from synapse_fastjoin import metrics as m
from synapse_fastjoin.handlers.inbound_queue import InboundQueueStats
from synapse_fastjoin.resync import progress as progress_mod
from synapse_fastjoin.resync.progress import (
    PHASE_CATCHUP,
    PHASE_STATE,
    PHASE_WAITING,
    RateTracker,
    ResyncProgress,
)


class _Engine:
    def __init__(self) -> None:
        self.progress: dict[str, ResyncProgress] = {}
        self.run_observers: list[Any] = []

    def start(self, room_id: str) -> ResyncProgress:
        p = ResyncProgress(room_id)
        self.progress[room_id] = p
        return p

    def end(self, room_id: str) -> None:
        p = self.progress.pop(room_id)
        for observe in self.run_observers:
            observe(p)


@pytest.fixture
def setup():
    engine = _Engine()
    api = SimpleNamespace(server_name="metrics.test")
    metrics = m.FastJoinMetrics(api, engine)  # type: ignore[arg-type]
    m._COLLECTOR.add(metrics)
    yield engine, metrics
    m._COLLECTOR.remove(metrics)


def _counter(metrics: m.FastJoinMetrics, field: str) -> float:
    return metrics.samples()["counters"].get(field, 0.0)


def test_counters_never_go_down_when_a_run_ends_and_another_starts(setup):
    engine, metrics = setup
    p = engine.start("!a:x")
    p.fetched, p.persisted = 10, 8
    assert _counter(metrics, "fetched") == 10
    p.fetched, p.persisted = 15, 15
    # The run ends between two scrapes: its last values are not lost.
    engine.end("!a:x")
    assert _counter(metrics, "fetched") == 15
    assert _counter(metrics, "persisted") == 15
    # A new run of the same room starts from zero; the counter goes on.
    p2 = engine.start("!a:x")
    assert _counter(metrics, "fetched") == 15
    p2.fetched = 3
    assert _counter(metrics, "fetched") == 18
    engine.end("!a:x")
    assert _counter(metrics, "fetched") == 18
    assert metrics.samples()["runs_started"] == 2


def test_a_field_the_engine_sets_lower_does_not_lower_the_counter(setup):
    engine, metrics = setup
    p = engine.start("!a:x")
    p.unavailable = 5
    assert _counter(metrics, "unavailable") == 5
    p.unavailable = 2  # a later /state_ids round found fewer
    assert _counter(metrics, "unavailable") == 5
    engine.end("!a:x")
    assert _counter(metrics, "unavailable") == 5


def test_a_run_is_counted_once_however_its_end_is_seen(setup):
    engine, metrics = setup
    # Never scraped while it ran.
    p = engine.start("!a:x")
    p.persisted = 7
    engine.end("!a:x")
    # Seen by a scrape, then ended, then the observer told twice.
    q = engine.start("!b:x")
    q.persisted = 1
    metrics.samples()
    q.persisted = 4
    del engine.progress["!b:x"]
    metrics.samples()  # a scrape notices the end first
    metrics.run_ended(q)
    metrics.run_ended(q)
    s = metrics.samples()
    assert s["counters"]["persisted"] == 11
    assert s["runs_started"] == 2


def test_retries_restored_from_a_checkpoint_are_not_counted_again(setup):
    engine, metrics = setup
    p = engine.start("!a:x")
    p.retries = p.retries_before = 40  # resumed after a restart
    assert _counter(metrics, "retries") == 0
    p.retries += 2
    assert _counter(metrics, "retries") == 2


def test_failures_are_counted_by_reason_and_attempts_follow(setup):
    engine, metrics = setup
    p = engine.start("!a:x")

    class StreamAborted(Exception):
        pass

    class NoServerAnswered(Exception):
        pass

    assert p.count_failure(TimeoutError("x")) == "TimeoutError"
    try:
        try:
            raise StreamAborted("cut")
        except StreamAborted as e:
            raise NoServerAnswered("all failed") from e
    except NoServerAnswered as e:
        assert p.count_failure(e) == "StreamAborted"
    assert p.count_failure(NoServerAnswered("no cause")) == "NoServerAnswered"
    s = metrics.samples()
    assert s["failures"] == {"TimeoutError": 1, "StreamAborted": 1, "NoServerAnswered": 1}
    assert s["attempts"] == 1 + 3
    engine.end("!a:x")
    assert metrics.samples()["failures"]["TimeoutError"] == 1


def test_phases_gauge_lists_every_phase_and_follows_the_runs(setup):
    engine, metrics = setup
    a, b = engine.start("!a:x"), engine.start("!b:x")
    a.set_phase(PHASE_STATE)
    b.set_phase(PHASE_WAITING)
    b.next_retry_ts = int(progress_mod._now_ms()) + 30_000
    s = metrics.samples()
    assert set(s["phases"]) == set(m.PHASES)
    assert s["phases"][PHASE_STATE] == 1 and s["phases"][PHASE_WAITING] == 1
    assert 25 < s["next_retry_seconds"] <= 30
    engine.end("!a:x")
    engine.end("!b:x")
    s = metrics.samples()
    assert sum(s["phases"].values()) == 0
    assert s["next_retry_seconds"] == 0


def test_exposition_through_synapses_registry_has_no_room_label(setup):
    engine, metrics = setup
    p = engine.start("!secret-room:x")
    p.fetched = 12
    p.count_failure(TimeoutError())
    text = generate_latest(REGISTRY).decode()
    assert "!secret-room" not in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    fetched = families["synapse_fastjoin_resync_events_fetched"]
    assert fetched.type == "counter"
    [sample] = [s for s in fetched.samples if s.labels == {"server_name": "metrics.test"}]
    assert sample.name == "synapse_fastjoin_resync_events_fetched_total" and sample.value == 12
    failures = families["synapse_fastjoin_resync_failures"]
    assert {"server_name": "metrics.test", "reason": "TimeoutError"} in [
        s.labels for s in failures.samples
    ]
    running = families["synapse_fastjoin_resyncs_running"]
    assert running.type == "gauge"
    # Not read from the database yet: no value rather than a wrong zero.
    rooms = families["synapse_fastjoin_partial_state_rooms"]
    assert not [s for s in rooms.samples if s.labels["server_name"] == "metrics.test"]
    for name in (
        "synapse_fastjoin_join_to_full_state_seconds",
        "synapse_fastjoin_resync_duration_seconds",
    ):
        assert families[name].type == "histogram"


def test_a_second_module_for_the_same_server_replaces_the_first(setup):
    engine, metrics = setup
    again = m.FastJoinMetrics(SimpleNamespace(server_name="metrics.test"), _Engine())  # type: ignore[arg-type]
    m._COLLECTOR.add(again)
    try:
        text = generate_latest(REGISTRY).decode()
        lines = [
            line
            for line in text.splitlines()
            if line.startswith("synapse_fastjoin_resyncs_started_total{")
            and 'server_name="metrics.test"' in line
        ]
        assert len(lines) == 1, lines
    finally:
        m._COLLECTOR.remove(again)


def test_as_json_leaves_out_the_internal_fields():
    p = ResyncProgress("!a:x")
    p.count_failure(TimeoutError())
    out = p.as_json()
    for key in ("retries_before", "failures", "last_failure_reason", "rate"):
        assert key not in out
    assert out["room_id"] == "!a:x" and "persisted" in out


def test_progress_line_has_rate_and_eta(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock[0])
    p = ResyncProgress("!a:x")
    p.set_phase(PHASE_STATE)
    p.expected, p.persisted = 10_000, 0
    assert "ETA" not in p.summary()  # one sample: no rate yet
    clock[0] += 5
    p.persisted = 1000
    line = p.summary()
    assert "rate 200 events/s" in line and "ETA 45s" in line, line
    clock[0] += 5
    p.persisted = 1000
    assert "stalled" in p.summary()
    # Catch-up is a new stage with its own rate.
    p.set_phase(PHASE_CATCHUP)
    p.catchup_done, p.catchup_remaining = 0, 600
    p.summary()
    clock[0] += 2
    p.catchup_done, p.catchup_remaining = 100, 500
    line = p.summary()
    assert "rate 50 events/s" in line and "ETA 10s" in line, line


def test_waits_for_the_room_s_persistence_queue_are_counted_and_shown(setup):
    engine, metrics = setup
    p = engine.start("!a:x")
    assert "persistence queue" not in p.summary()
    p.slot_wait_seconds = 2.5
    assert "waited 2.5 s for the room's persistence queue" in p.summary()
    assert p.as_json()["slot_wait_seconds"] == 2.5
    assert _counter(metrics, "slot_wait_seconds") == 2.5
    engine.end("!a:x")
    assert _counter(metrics, "slot_wait_seconds") == 2.5
    text = generate_latest(REGISTRY).decode()
    assert "synapse_fastjoin_resync_slot_wait_seconds_total" in text


def test_rate_tracker_starts_a_new_stage_on_a_new_round():
    r = RateTracker()
    assert r.update(("state", 100), 0, now=0.0) == 0
    assert r.update(("state", 100), 60, now=1.0) == 60
    assert r.rate == 60
    # Round 2 of /state_ids promises 40 more; 60 were done before it.
    assert r.update(("state", 40), 65, now=2.0) == 0
    assert r.rate is None
    assert r.update(("state", 40), 75, now=3.0) == 10


def test_warnings_for_bad_signatures_and_a_room_stuck_on_one_error(setup, monkeypatch, caplog):
    engine, metrics = setup
    clock = [5000.0]
    monkeypatch.setattr(m.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.WARNING, logger="synapse_fastjoin.metrics")
    p = engine.start("!a:x")
    p.destination = "evil.example"
    p.bad_signatures = 3
    metrics._check_warnings()
    [record] = caplog.records
    assert "3 events with bad signatures" in record.getMessage()
    assert "evil.example" in record.getMessage()
    caplog.clear()
    metrics._check_warnings()
    assert not caplog.records  # nothing new: no repeat

    p.count_failure(TimeoutError())
    p.set_phase(PHASE_WAITING)
    metrics._check_warnings()
    clock[0] += 3599
    metrics._check_warnings()
    assert not caplog.records
    clock[0] += 2
    metrics._check_warnings()
    [record] = caplog.records
    assert "failing for 60 minutes with TimeoutError" in record.getMessage()
    caplog.clear()
    clock[0] += 60
    metrics._check_warnings()
    assert not caplog.records  # once an hour, not every check
    # Progress resets the clock.
    p.persisted = 1
    clock[0] += 3600
    metrics._check_warnings()
    assert not caplog.records


def _counter_totals(text: str, server_name: str) -> dict[str, float]:
    """The `_total` samples of the exposition's counters for `server_name`."""
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        if f.type == "counter"
        for s in f.samples
        if s.labels.get("server_name") == server_name and s.name.endswith("_total")
    }


def test_inbound_and_retries_counters_are_exported_from_their_sources():
    """Each table-driven counter reads its own field: the inbound queue's
    totals and the retries of this process."""
    stats = InboundQueueStats()
    stats.dropped, stats.refetched, stats.arrived, stats.failed = 5, 3, 1, 2
    engine = _Engine()
    metrics = m.FastJoinMetrics(SimpleNamespace(server_name="inbound.test"), engine, stats)  # type: ignore[arg-type]
    m._COLLECTOR.add(metrics)
    try:
        p = engine.start("!a:x")
        p.retries, p.retries_before = 7, 3
        text = generate_latest(REGISTRY).decode()
    finally:
        m._COLLECTOR.remove(metrics)
    values = _counter_totals(text, "inbound.test")
    assert values["synapse_fastjoin_inbound_events_dropped_total"] == 5
    assert values["synapse_fastjoin_inbound_events_refetched_total"] == 3
    assert values["synapse_fastjoin_inbound_events_arrived_total"] == 1
    assert values["synapse_fastjoin_inbound_events_refetch_failed_total"] == 2
    assert values["synapse_fastjoin_resync_retries_total"] == 4
    assert values["synapse_fastjoin_resync_events_fetched_total"] == 0


def test_partial_auth_counters_follow_the_ways_inbound_events_were_authorised():
    """The three partial-state auth counters read the handler's own totals."""
    from synapse_fastjoin.handlers.partial_auth import PartialStateAuth

    auth = PartialStateAuth()
    auth.unconflicted, auth.resolved_at_auth_keys, auth.resolved = 11, 7, 2
    metrics = m.FastJoinMetrics(
        SimpleNamespace(server_name="partial-auth.test"), _Engine(), partial_auth=auth  # type: ignore[arg-type]
    )
    m._COLLECTOR.add(metrics)
    try:
        text = generate_latest(REGISTRY).decode()
    finally:
        m._COLLECTOR.remove(metrics)
    values = _counter_totals(text, "partial-auth.test")
    assert values["synapse_fastjoin_partial_auth_unconflicted_total"] == 11
    assert values["synapse_fastjoin_partial_auth_resolved_at_auth_keys_total"] == 7
    assert values["synapse_fastjoin_partial_auth_synapse_resolutions_total"] == 2
