"""resync/event_cache.py: the resync says when a room's state outgrows
Synapse's event cache, read from a real in-process Synapse."""

import logging
from collections.abc import Iterator

import pytest

from synapse.app.homeserver import SynapseHomeServer

from synapse_fastjoin.resync.event_cache import event_cache_capacity, warn_if_state_outgrows_event_cache

from tests.harness.inprocess import homeserver_on_fresh_database

ROOM = "!big:example.org"


@pytest.fixture
def homeserver(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[SynapseHomeServer]:
    if db_backend != "sqlite":
        pytest.skip("the cache is the same on either database")
    with homeserver_on_fresh_database("event_cache", "cache.example", db_backend, tmp_path_factory, request) as hs:
        yield hs


def test_capacity_is_the_configured_size_times_the_factor(homeserver: SynapseHomeServer) -> None:
    caches = homeserver.config.caches
    store = homeserver.get_datastores().main
    expected = int(caches.event_cache_size * caches.global_factor)
    assert event_cache_capacity(store) == expected


def test_warns_only_when_the_state_outgrows_it(
    homeserver: SynapseHomeServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = homeserver.get_datastores().main
    capacity = event_cache_capacity(store)
    assert capacity

    def ours() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "synapse_fastjoin.resync.event_cache"]

    with caplog.at_level(logging.WARNING, logger="synapse_fastjoin.resync.event_cache"):
        assert not warn_if_state_outgrows_event_cache(store, ROOM, capacity)
        assert not ours()
        assert warn_if_state_outgrows_event_cache(store, ROOM, capacity + 1)
    (record,) = ours()
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert ROOM in message and str(capacity + 1) in message and str(capacity) in message
    assert "caches.event_cache_size" in message


def test_unknown_cache_layout_says_nothing() -> None:
    class Store:
        pass

    assert event_cache_capacity(Store()) is None
    assert not warn_if_state_outgrows_event_cache(Store(), ROOM, 10**9)
