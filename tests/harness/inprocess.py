"""A real Synapse HomeServer inside the test process, for tests that compare
Synapse's own code paths with the module's on the same inputs (no federation:
every remote server is outside its federation whitelist)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Mapping

from signedjson.key import generate_signing_key, get_verify_key, write_signing_keys
from twisted.internet import defer, reactor

from synapse.app.homeserver import SynapseHomeServer
from synapse.config.homeserver import HomeServerConfig

if TYPE_CHECKING:
    import pytest

    from tests.harness.postgres import PostgresAdmin


def make_homeserver(
    data_dir: str,
    server_name: str,
    database: Mapping[str, Any] | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> SynapseHomeServer:
    """A HomeServer named `server_name` on `database` (Synapse's `database`
    section; default: SQLite in `data_dir`), set up (schema prepared) on the
    running reactor. Nothing may be fetched from elsewhere: no key, no policy
    server signature, no event."""
    key_path = os.path.join(data_dir, "signing.key")
    with open(key_path, "w") as f:
        write_signing_keys(f, [generate_signing_key("test")])
    config = HomeServerConfig()
    config.parse_config_dict(
        {
            "server_name": server_name,
            "signing_key_path": key_path,
            "database": dict(
                database
                or {"name": "sqlite3", "args": {"database": os.path.join(data_dir, "hs.db")}}
            ),
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "federation_domain_whitelist": ["nowhere.invalid"],
            "media_store_path": os.path.join(data_dir, "media"),
            "pid_file": os.path.join(data_dir, "homeserver.pid"),
            "report_stats": False,
            "listeners": [],
            "macaroon_secret_key": "test-macaroon",
            "form_secret": "test-form",
            "registration_shared_secret": "test-registration",
            **(extra_config or {}),
        },
        config_dir_path=data_dir,
        data_dir_path=data_dir,
    )
    hs = SynapseHomeServer(server_name, config=config, reactor=reactor)
    hs.setup()
    _live.append(hs)
    return hs


#: Every HomeServer `make_homeserver` made that is not shut down yet.
_live: list[SynapseHomeServer] = []


def shut_down(hs: SynapseHomeServer) -> None:
    """Stop what `hs` runs on the test process's one reactor and close its
    databases (Synapse's own `HomeServer.shutdown`): its looping calls, its
    background processes and its shutdown triggers. A HomeServer whose pool
    was only closed goes on running its looping calls against the closed pool
    for the rest of the session, and its "before shutdown" triggers run (and
    may wait on that pool) when the reactor stops at the session's end.

    Call it from a fixture (pytest's greenlet), not from a test's coroutine."""
    import pytest_twisted  # here: scripts/bench-bulk-writer imports this module outside pytest

    if hs not in _live:
        return
    _live.remove(hs)
    # Bounded: a shutdown that cannot finish must fail the fixture, not hang it.
    shutdown = defer.ensureDeferred(hs.shutdown())
    shutdown.addTimeout(SHUTDOWN_TIMEOUT, reactor)
    pytest_twisted.blockon(shutdown)


#: Seconds `shut_down` waits for `HomeServer.shutdown` (it takes milliseconds).
SHUTDOWN_TIMEOUT = 60.0


def shut_down_all() -> list[str]:
    """`shut_down` every HomeServer still running (the session's end); what
    failed, a line each (the others are shut down all the same)."""
    errors: list[str] = []
    for hs in list(_live):
        try:
            shut_down(hs)
        except Exception as e:
            errors.append(f"{hs.hostname}: {type(e).__name__}: {e}")
    return errors


@contextmanager
def homeservers_on_fresh_databases(
    names: Sequence[str],
    db_backend: str,
    tmp_path_factory: Any,
    postgres_admin: "PostgresAdmin | None",
    server_name: Callable[[str], str],
    extra_config: Mapping[str, Any] | None = None,
) -> Iterator[dict[str, SynapseHomeServer]]:
    """HomeServers named `names` (for a parity test: one runs Synapse's path,
    the others ours), each on a fresh database of `db_backend` (a PostgreSQL
    database made with `postgres_admin`, or a SQLite file), closed and
    dropped afterwards."""
    made: dict[str, SynapseHomeServer] = {}
    databases: list[str] = []
    try:
        for name in names:
            data_dir = str(tmp_path_factory.mktemp(f"{name}-{db_backend}"))
            database: dict[str, Any] | None = None
            if postgres_admin is not None:
                db = postgres_admin.create_database(name)
                databases.append(db.name)
                database = {"name": "psycopg2", "args": db.synapse_args}
            made[name] = make_homeserver(data_dir, server_name(name), database, extra_config)
        yield made
    finally:
        for hs in made.values():
            shut_down(hs)
        if postgres_admin is not None:
            for db_name in databases:
                postgres_admin.drop_database(db_name)


# The user directory and the room statistics follow the room's state in the
# background, on their own time: off for tests that compare tables.
QUIET_BACKGROUND: Mapping[str, Any] = {
    "update_user_directory_from_worker": "elsewhere",
    "stats": {"enabled": False},
}


@contextmanager
def homeservers_for_fixture(
    names: Sequence[str],
    server_name: str,
    db_backend: str,
    tmp_path_factory: Any,
    request: "pytest.FixtureRequest",
    extra_config: Mapping[str, Any] | None = None,
) -> Iterator[dict[str, SynapseHomeServer]]:
    """`homeservers_on_fresh_databases` for a test fixture, every server
    named `server_name`: PostgreSQL's through the `postgres_admin` fixture."""
    admin: PostgresAdmin | None = (
        request.getfixturevalue("postgres_admin") if db_backend == "postgres" else None
    )
    with homeservers_on_fresh_databases(
        names, db_backend, tmp_path_factory, admin, lambda _: server_name, extra_config
    ) as made:
        yield made


@contextmanager
def homeserver_on_fresh_database(
    name: str,
    server_name: str,
    db_backend: str,
    tmp_path_factory: Any,
    request: "pytest.FixtureRequest",
) -> Iterator[SynapseHomeServer]:
    """One HomeServer named `server_name` on a fresh database of `db_backend`,
    for a test fixture."""
    with homeservers_for_fixture((name,), server_name, db_backend, tmp_path_factory, request) as made:
        yield made[name]


async def store_fake_server_keys(hs: SynapseHomeServer, servers: Iterable[str], now_ms: int) -> None:
    """Store the signing keys of fake servers (`tests.harness.fakehs.keys`) as
    if fetched from each server at `now_ms`, valid for about eleven days
    after it: their events' signatures are then checked without a fetch."""
    from synapse.storage.keys import FetchKeyResult

    from tests.harness.fakehs.keys import KEY_ID, server_keys_json, signing_key

    store = hs.get_datastores().main
    for server in sorted(set(servers)):
        await store.store_server_keys_response(
            server_name=server,
            from_server=server,
            ts_added_ms=now_ms,
            verify_keys={KEY_ID: FetchKeyResult(get_verify_key(signing_key(server)), now_ms + 10**9)},
            response_json=server_keys_json(server, now_ms=now_ms),
        )
