"""Synapse refuses to start with the module enabled on a bad set-up, and says
why; with a good one it starts and creates the module's tables."""

import time

import pytest

from synapse_fastjoin.storage.schema import SCHEMA_VERSION

MODULE = "synapse_fastjoin.FastJoinModule"


def _modules(config):
    return {"modules": [{"module": MODULE, "config": config}]}


def test_unpatched_synapse_refuses_to_start_and_names_the_command(synapse_factory):
    """The module is installed in the stock environment but the series is not
    applied there."""
    server = synapse_factory(variant="stock", config=_modules({}), start=False)
    result = server.start(expect_failure=True)
    assert result.returncode != 0
    assert "synapse-fastjoin patches apply" in result.output
    assert "0001-module-api-fastjoin-callbacks.patch (unapplied)" in result.output


@pytest.mark.parametrize(
    "config,named",
    [
        ({"no_such_option": 1}, "no_such_option"),
        ({"history_retention_days": "ninety"}, "history_retention_days"),
        ({"admin_api": "yes"}, "admin_api"),
        ({"resync": {"inbound_queue_limit": 50}}, "resync.inbound_queue_limit"),
    ],
)
def test_bad_module_config_stops_startup_naming_the_key(synapse_factory, config, named):
    server = synapse_factory(variant="patched", config=_modules(config), start=False)
    result = server.start(expect_failure=True)
    assert result.returncode != 0
    assert named in result.output
    assert "Error in configuration" in result.output


def _schema_version(server):
    try:
        return server.database.query("SELECT version FROM fastjoin_schema_version")
    except Exception:  # the table does not exist yet
        return None


def test_module_starts_with_empty_config_and_creates_its_tables(
    synapse_factory, db_backend
):
    server = synapse_factory(variant="patched", db=db_backend, config=_modules({}))
    # The schema is created by a background process right after start-up.
    assert _wait_for_schema_version(server) == [(SCHEMA_VERSION,)]
    # On SQLite, patch 0035's hook is installed (resync.sqlite_multi_row_inserts).
    multi_row = "batched inserts are sent as multi-row statements" in server.read_log()
    assert multi_row == (db_backend == "sqlite")
    server.stop()
    server.start()  # a restart finds the tables and leaves them as they are
    assert _wait_for_schema_version(server) == [(SCHEMA_VERSION,)]


def _wait_for_schema_version(server, timeout=30):
    """The version row, once readable: on SQLite a read can fail while the
    starting server holds the write lock, so poll rather than read once."""
    deadline = time.monotonic() + timeout
    found = _schema_version(server)
    while found != [(SCHEMA_VERSION,)] and time.monotonic() < deadline:
        time.sleep(0.2)
        found = _schema_version(server)
    return found
