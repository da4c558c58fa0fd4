"""The module's config block: defaults, and a clear error naming any bad key."""

import pytest

from synapse.config._base import ConfigError

from synapse_fastjoin.config import FastJoinConfig, parse_config
from synapse_fastjoin.module import FastJoinModule


@pytest.mark.parametrize("raw", [None, {}])
def test_empty_config_gives_defaults(raw):
    assert FastJoinModule.parse_config(raw) == FastJoinConfig()
    assert FastJoinConfig().admin_api is True
    assert FastJoinConfig().history_retention_days == 90


def test_every_key_is_accepted():
    config = parse_config(
        {"admin_api": False, "history_retention_days": 0, "history_prune_interval_minutes": 5}
    )
    assert config == FastJoinConfig(
        admin_api=False, history_retention_days=0, history_prune_interval_minutes=5
    )


def test_unknown_key_is_named():
    with pytest.raises(ConfigError) as e:
        parse_config({"admin_api": True, "resync_workers": 4})
    assert "resync_workers" in str(e.value)
    assert e.value.path[-1] == "resync_workers"


@pytest.mark.parametrize(
    "key,value",
    [
        ("admin_api", "yes"),
        ("admin_api", 1),
        ("history_retention_days", "90"),
        ("history_retention_days", True),
        ("history_retention_days", 1.5),
        ("history_retention_days", -1),
        ("history_prune_interval_minutes", 0),
    ],
)
def test_ill_typed_or_out_of_range_value_is_named(key, value):
    with pytest.raises(ConfigError) as e:
        parse_config({key: value})
    assert key in str(e.value)
    assert e.value.path[-1] == key


def test_config_must_be_a_mapping():
    with pytest.raises(ConfigError, match="mapping"):
        parse_config(["admin_api"])  # type: ignore[arg-type]


def test_resync_block_defaults_and_overrides():
    assert parse_config({}).resync.engine is True
    config = parse_config({"resync": {"engine": False, "chunk_size": 200, "check_threads": 4}})
    assert (config.resync.engine, config.resync.chunk_size, config.resync.check_threads) == (False, 200, 4)
    assert config.resync.persist_batch_size == 500  # untouched keys keep their defaults
    assert parse_config({"resync": {"check_processes": 0}}).resync.check_processes == 0
    assert parse_config({}).resync.sqlite_wal_autocheckpoint == 100_000
    assert parse_config({"resync": {"sqlite_wal_autocheckpoint": 0}}).resync.sqlite_wal_autocheckpoint == 0


@pytest.mark.parametrize(
    "raw,named",
    [
        ({"resync": {"no_such": 1}}, "resync.no_such"),
        ({"resync": {"chunk_size": "big"}}, "resync.chunk_size"),
        ({"resync": {"check_threads": 0}}, "resync.check_threads"),
        ({"resync": {"check_processes": -1}}, "resync.check_processes"),
        ({"resync": {"check_processes": "auto"}}, "resync.check_processes"),
        ({"resync": {"check_process_min_events": 0}}, "resync.check_process_min_events"),
        ({"resync": {"engine": "on"}}, "resync.engine"),
        ({"resync": {"sqlite_wal_autocheckpoint": -1}}, "resync.sqlite_wal_autocheckpoint"),
        ({"resync": {"sqlite_wal_autocheckpoint": "big"}}, "resync.sqlite_wal_autocheckpoint"),
        ({"resync": {"backoff_initial_seconds": 60, "backoff_max_seconds": 10}}, "resync.backoff_max_seconds"),
        ({"resync": ["engine"]}, "mapping"),
        ({"resync": {"inbound_queue_limit": 99}}, "resync.inbound_queue_limit"),
        ({"resync": {"inbound_queue_limit": -1}}, "resync.inbound_queue_limit"),
        ({"resync": {"inbound_queue_limit": "10k"}}, "resync.inbound_queue_limit"),
        ({"resync": {"inbound_queue_limit": 1000.5}}, "resync.inbound_queue_limit"),
        ({"resync": {"inbound_queue_limit": True}}, "resync.inbound_queue_limit"),
    ],
)
def test_bad_resync_settings_are_named(raw, named):
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert named in str(e.value)
    assert e.value.path[:4] == ("modules", "synapse_fastjoin.FastJoinModule", "config", "resync")


def test_inbound_queue_limit_default_bound_and_no_bound():
    assert parse_config({}).resync.inbound_queue_limit == 10000
    assert parse_config({"resync": {"inbound_queue_limit": 100}}).resync.inbound_queue_limit == 100
    assert parse_config({"resync": {"inbound_queue_limit": 0}}).resync.inbound_queue_limit == 0
