"""Pytest wiring for synapse-fastjoin: database selection, homeserver fixtures, reports.

Options:
    ``--db sqlite`` / ``--db postgres`` (repeatable, default ``sqlite``): every test
    using the ``db_backend`` fixture runs once per selected backend.  PostgreSQL
    needs ``$FASTJOIN_POSTGRES`` (an admin DSN); there is no silent fallback.
    ``--synapse-log-lines N``: how much of each server's log a failure report shows.

Fixtures:
    ``db_backend`` - ``"sqlite"`` or ``"postgres"`` (parametrized from ``--db``).
    ``synapse_factory`` - ``synapse_factory(variant="patched", db=..., config=...)``
    creates and starts a :class:`~tests.harness.synapse.SynapseServer`; all servers
    are stopped (resumed first if paused) and their databases dropped at teardown,
    whatever the test outcome.  When a test fails, the tail of each server's
    ``homeserver.log``, stderr and stdout is attached to the report.
    ``tls_files`` / ``postgres_admin`` - session-wide certificate and DB admin.

Async tests use pytest-twisted (``@pytest_twisted.ensureDeferred`` /
``@pytest_twisted.inlineCallbacks``) on the default reactor.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Mapping
from typing import Any

import pytest

from tests.harness.certs import TLSFiles, generate_self_signed
from tests.harness.postgres import ENV_VAR, PostgresAdmin, PostgresUnavailable
from tests.harness.synapse import (
    DbBackend,
    SynapseFactory,
    SynapseServer,
    Variant,
)
from tests.harness.watchdog import HangWatchdog, arm_exit_watchdog, write_to_terminal

# pytest-twisted normally loads through its entry point; load it explicitly
# only when plugin autoloading is disabled (loading it twice is an error).
if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
    pytest_plugins = ["pytest_twisted"]

DB_CHOICES = ("sqlite", "postgres")

#: Servers created during a test, for failure reports (``item.stash``).
SERVERS_KEY = pytest.StashKey[list[SynapseServer]]()
#: Whether logs were already attached to one of the test's reports.
ATTACHED_KEY = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--db`` and ``--synapse-log-lines``."""
    group = parser.getgroup("synapse-fastjoin")
    group.addoption(
        "--db",
        action="append",
        choices=DB_CHOICES,
        default=None,
        dest="fastjoin_db",
        help="database backend for DB-parametrized tests; repeat to run on several "
        "(default: sqlite). postgres needs $" + ENV_VAR,
    )
    group.addoption(
        "--synapse-log-lines",
        type=int,
        default=200,
        dest="fastjoin_log_lines",
        help="lines of each homeserver log attached to a failing test's report",
    )


def selected_backends(config: pytest.Config) -> list[str]:
    """The ``--db`` values in order, de-duplicated, defaulting to ``["sqlite"]``."""
    chosen = config.getoption("fastjoin_db") or ["sqlite"]
    return list(dict.fromkeys(chosen))


def pytest_configure(config: pytest.Config) -> None:
    """Refuse ``--db postgres`` up front when ``$FASTJOIN_POSTGRES`` is not set."""
    config.addinivalue_line(
        "markers", "e2e: end-to-end test running real Synapse processes"
    )
    if "postgres" in selected_backends(config) and not os.environ.get(ENV_VAR, "").strip():
        raise pytest.UsageError(
            f"--db postgres requested but ${ENV_VAR} is not set; export an admin DSN such "
            f"as {ENV_VAR}=postgresql://fastjoin:fastjoin@127.0.0.1:5432/postgres "
            "(scripts/test does this)"
        )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize every test that uses ``db_backend`` over the selected backends."""
    if "db_backend" in metafunc.fixturenames:
        backends = selected_backends(metafunc.config)
        metafunc.parametrize("db_backend", backends, indirect=True, ids=backends)


@pytest.fixture
def db_backend(request: pytest.FixtureRequest) -> str:
    """The database backend of this test instance: ``"sqlite"`` or ``"postgres"``."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """One self-signed certificate (SAN localhost, 127.0.0.1) for every server."""
    return generate_self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def postgres_admin() -> PostgresAdmin:
    """Admin access to the PostgreSQL cluster named by ``$FASTJOIN_POSTGRES``.

    Fails (never skips) when it is unset or unreachable.
    """
    try:
        admin = PostgresAdmin.from_env()
    except PostgresUnavailable as e:
        reason = str(e)
    else:
        admin.drop_stale_databases()  # leftovers of runs that were SIGKILLed
        return admin
    pytest.fail(reason, pytrace=False)  # outside ``except``: no chained traceback


@pytest.fixture
def synapse_factory(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tls_files: TLSFiles,
) -> Generator[SynapseFactory, None, None]:
    """Factory creating tracked homeservers; tears all of them down afterwards.

    ``synapse_factory(variant="patched", db=None, config=None, *, name=None,
    start=True, env=None, start_timeout=60.0, **server_options) -> SynapseServer``;
    ``server_options`` go to :class:`SynapseServer` (e.g. ``public_port``).

    ``db=None`` means the test's ``db_backend`` if it uses that fixture, else
    ``"sqlite"``.  With ``start=False`` the server is only configured (e.g. to
    call ``server.start(expect_failure=True)`` yourself).
    """
    servers: list[SynapseServer] = []
    request.node.stash[SERVERS_KEY] = servers

    def factory(
        variant: Variant = "patched",
        db: DbBackend | None = None,
        config: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        start: bool = True,
        env: Mapping[str, str | None] | None = None,
        start_timeout: float = 60.0,
        **server_options: Any,
    ) -> SynapseServer:
        if db is None:
            db = (
                request.getfixturevalue("db_backend")  # type: ignore[assignment]
                if "db_backend" in request.fixturenames
                else "sqlite"
            )
        if db not in DB_CHOICES:
            raise ValueError(f"unknown db backend {db!r}")
        admin = request.getfixturevalue("postgres_admin") if db == "postgres" else None
        label = name or f"hs{len(servers) + 1}"
        data_dir = tmp_path_factory.mktemp(f"{label}-{variant}-{db}")
        server = SynapseServer(
            data_dir,
            variant=variant,
            db=db,  # type: ignore[arg-type]
            config=config,
            tls=tls_files,
            postgres=admin,
            name=label,
            env=env,
            start_timeout=start_timeout,
            **server_options,
        )
        servers.append(server)
        if start:
            server.start()
        return server

    try:
        yield factory
    finally:
        errors: list[str] = []
        for server in reversed(servers):
            try:
                if server.is_paused:
                    server.resume()
                server.close()
            except Exception as e:  # keep tearing the others down
                errors.append(f"{server!r}: {type(e).__name__}: {e}")
        if errors:
            pytest.fail("homeserver teardown failed:\n" + "\n".join(errors), pytrace=False)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On the first failing phase of a test, attach each homeserver's log tails."""
    report = yield
    servers = item.stash.get(SERVERS_KEY, [])
    if report.failed and servers and not item.stash.get(ATTACHED_KEY, False):
        item.stash[ATTACHED_KEY] = True
        lines = int(item.config.getoption("fastjoin_log_lines"))
        for server in servers:
            label = f"{server.name} {server.server_name} [{server.variant}/{server.db_backend}]"
            report.sections.append(
                (f"{label} homeserver.log (last {lines} lines: {server.log_path})",
                 server.log_tail(lines) or "(empty)")
            )
            report.sections.append(
                (f"{label} stderr (last 50 lines)", server.stderr_tail(50) or "(empty)")
            )
            report.sections.append(
                (f"{label} stdout (last 50 lines)", server.stdout_tail(50) or "(empty)")
            )
    return report


#: Seconds before pytest-timeout's limit at which the hang report is printed.
HANG_REPORT_LEAD = 20.0


def _timeout_of(item: pytest.Item) -> float:
    """The test's pytest-timeout limit in seconds (its marker, else the ini's); 0: none."""
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0] or 0)
    try:
        return float(item.config.getini("timeout") or 0)
    except ValueError:  # no pytest-timeout: no limit, no report
        return 0.0


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """Shortly before pytest-timeout ends a hung test (and the run), print what
    the test's coroutines wait for and its homeservers' last log lines: the
    thread stacks pytest-timeout prints show only the reactor's poll."""
    limit = _timeout_of(item)
    if limit <= 0:
        return (yield)

    def server_tails() -> list[str]:
        lines: list[str] = []
        for server in item.stash.get(SERVERS_KEY, []):
            lines.append(f"{server.name} {server.server_name} [{server.variant}/{server.db_backend}] homeserver.log, last 30 lines:")
            lines += ["  " + line for line in (server.log_tail(30) or "(empty)").splitlines()]
        return lines

    delay = max(limit - HANG_REPORT_LEAD, limit * 0.9)
    watchdog = HangWatchdog(
        delay,
        lambda lines: write_to_terminal(item.config, [f"{item.nodeid} is still running after {delay:.0f} s", *lines]),
        server_tails,
    )
    watchdog.start()
    try:
        return (yield)
    finally:
        watchdog.cancel()


#: Seconds the process may take to exit once the session has finished (it
#: takes a few); then the exit watchdog reports what it waits for and ends it.
EXIT_GRACE = float(os.environ.get("FASTJOIN_EXIT_GRACE", "120"))
EXIT_STATUS_KEY = pytest.StashKey[int]()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Shut down the in-process HomeServers a fixture left running, while the
    reactor still runs (their looping calls and shutdown triggers would
    otherwise run when pytest-twisted stops it)."""
    session.config.stash[EXIT_STATUS_KEY] = int(exitstatus)
    from tests.harness import inprocess

    errors = inprocess.shut_down_all()
    reporter = session.config.pluginmanager.getplugin("terminalreporter")
    if errors and reporter is not None:
        reporter.write_line("in-process HomeServers that did not shut down: " + "; ".join(errors), yellow=True)


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Before pytest-twisted stops the reactor: arm the exit watchdog."""
    if EXIT_STATUS_KEY in config.stash:  # not for --help, --collect-only errors etc.
        arm_exit_watchdog(EXIT_GRACE, config.stash[EXIT_STATUS_KEY], config)
