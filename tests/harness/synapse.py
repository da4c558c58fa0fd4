"""Run real ``matrix-synapse`` homeserver processes on loopback for end-to-end tests.

Each :class:`SynapseServer` owns a data directory, two loopback ports (a TLS
federation listener and a plain-HTTP client listener), a generated
``homeserver.yaml`` + logging config, a signing key and a database (SQLite file
in the data dir, or a fresh PostgreSQL database).  The server name is
``localhost:<federation port>`` so peers connect straight to that port without
``.well-known`` or SRV lookups, and every setting needed for federation between
processes on one machine is applied (see ``/work/shared/LOOPBACK.md``).

The process is started with the Python of one of two virtualenvs:

* ``stock``   - pristine matrix-synapse (``$FASTJOIN_STOCK_VENV``, default
  ``<repo>/.venvs/stock``);
* ``patched`` - matrix-synapse with this project's patch series and module
  installed (``$FASTJOIN_PATCHED_VENV``, default ``<repo>/.venvs/patched``).

Everything here is synchronous (``subprocess`` + ``urllib``) so it can be used
from plain fixtures as well as from ``pytest_twisted`` tests; calls block the
test's reactor only for the short time they take.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import hmac
import http.client
import json
import logging
import os
import random
import secrets
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Protocol, overload

import yaml

from .certs import TLSFiles, generate_self_signed
from .postgres import PostgresAdmin, PostgresDatabase

if TYPE_CHECKING:  # pragma: no cover - import only for annotations
    from .client import ClientAPI

__all__ = [
    "DELETE",
    "REPO_ROOT",
    "DatabaseInfo",
    "DbBackend",
    "ExitResult",
    "SynapseFactory",
    "SynapseServer",
    "SynapseStartError",
    "Variant",
    "merge_config",
    "tail_file",
    "venv_python",
    "venv_root",
]

Variant = Literal["stock", "patched"]
DbBackend = Literal["sqlite", "postgres"]

logger = logging.getLogger(__name__)

#: Root of the synapse-fastjoin checkout (``tests/harness/synapse.py`` -> repo).
REPO_ROOT = Path(__file__).resolve().parents[2]
# The launcher that gives each server its network (see netsim.py); run as a
# script, so a stock server still cannot import anything from the checkout.
NETSIM = Path(__file__).resolve().parent / "netsim.py"

_VENV_ENV = {"stock": "FASTJOIN_STOCK_VENV", "patched": "FASTJOIN_PATCHED_VENV"}

#: A very high rate limit, used for every ``rc_*`` setting.
_UNLIMITED = {"per_second": 100000, "burst_count": 1000000}


class _Delete:
    """Type of :data:`DELETE`."""

    def __repr__(self) -> str:
        return "DELETE"


#: Use as a value in ``config`` overrides to remove a key from the generated
#: ``homeserver.yaml`` (e.g. ``{"trusted_key_servers": DELETE}``).
DELETE: Any = _Delete()


class SynapseStartError(RuntimeError):
    """The homeserver did not become healthy (or unexpectedly did).

    The message contains the exit code and the tails of stderr and the server
    log so the reason shows up directly in the test failure.
    """


@dataclass(frozen=True)
class ExitResult:
    """Outcome of ``start(expect_failure=True)``: how the process ended.

    ``stdout`` / ``stderr`` / ``log`` contain only what this start wrote.
    """

    returncode: int
    stdout: str
    stderr: str
    log: str

    @property
    def output(self) -> str:
        """stdout, stderr and server log concatenated, for substring assertions."""
        return "\n".join((self.stdout, self.stderr, self.log))


@dataclass(frozen=True)
class DatabaseInfo:
    """Where a server keeps its data, so tests can look at the real tables.

    For SQLite ``sqlite_path`` is set; for PostgreSQL ``postgres`` (with
    ``.name``, ``.dsn``) is.  :meth:`connect` opens a DB-API connection either way
    (``sqlite3`` uses ``?`` placeholders, ``psycopg2`` uses ``%s``).
    """

    backend: DbBackend
    sqlite_path: Path | None = None
    postgres: PostgresDatabase | None = None

    @property
    def dsn(self) -> str:
        """The PostgreSQL DSN, or the SQLite file path as a string."""
        if self.postgres is not None:
            return self.postgres.dsn
        assert self.sqlite_path is not None
        return str(self.sqlite_path)

    @property
    def placeholder(self) -> str:
        """The DB-API parameter placeholder of this backend."""
        return "%s" if self.backend == "postgres" else "?"

    def connect(self) -> Any:
        """Open a new DB-API connection to the server's database (caller closes it).

        SQLite connections get a 30 s busy timeout because Synapse may hold
        write locks while the test reads.
        """
        if self.postgres is not None:
            return self.postgres.connect()
        assert self.sqlite_path is not None
        return sqlite3.connect(str(self.sqlite_path), timeout=30)

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one read query on a fresh connection and return all rows."""
        conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute(sql, args)
            return [tuple(row) for row in cur.fetchall()]
        finally:
            conn.close()


def venv_root(variant: Variant) -> Path:
    """Return the virtualenv directory for ``variant`` (env override or default)."""
    if variant not in _VENV_ENV:
        raise ValueError(f"unknown Synapse variant {variant!r}; use 'stock' or 'patched'")
    override = os.environ.get(_VENV_ENV[variant])
    return Path(override) if override else REPO_ROOT / ".venvs" / variant


def venv_python(variant: Variant) -> Path:
    """Return the interpreter that runs Synapse for ``variant``; fail clearly if absent."""
    root = venv_root(variant)
    python = root / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(
            f"no Python for the {variant!r} Synapse variant at {python} "
            f"(set ${_VENV_ENV[variant]} or create the venv)"
        )
    return python


def merge_config(base: Mapping[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """Deep-merge ``extra`` into a copy of ``base``.

    Nested mappings are merged key by key; any other value (lists included)
    replaces the base value; :data:`DELETE` removes the key.
    """
    result: dict[str, Any] = dict(base)
    for key, value in (extra or {}).items():
        if value is DELETE:
            result.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merge_config(result[key], value)
        else:
            result[key] = value
    return result


def tail_file(path: Path, lines: int = 200, max_bytes: int = 512 * 1024) -> str:
    """Return the last ``lines`` lines of ``path`` ('' if it does not exist).

    Only the final ``max_bytes`` are read so multi-megabyte DEBUG logs are cheap.
    """
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _read_from(path: Path, offset: int) -> str:
    """Return the content of ``path`` after byte ``offset`` ('' if missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _file_size(path: Path) -> int:
    """Size of ``path`` in bytes, 0 if it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# Ports handed out by this process, so two servers never get the same one even
# before either has bound it.
_allocated_ports: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral (outgoing) port range; we avoid allocating from it."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """Pick a currently free TCP port on 127.0.0.1.

    Ports are drawn at random from outside the ephemeral range, so outgoing
    connections (which take ephemeral ports) cannot grab a server's port while
    it is down for a restart.  Each candidate is proven free by binding it.
    """
    eph_lo, eph_hi = _ephemeral_range()
    for _ in range(1000):
        port = random.randint(10000, 64999)
        if eph_lo <= port <= eph_hi or port in _allocated_ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _allocated_ports.add(port)
        return port
    raise RuntimeError("could not find a free loopback port")


def _set_parent_death_signal() -> None:
    """In the child: ask Linux to SIGKILL us if the test runner dies.

    Guarantees no homeserver outlives a crashed or killed pytest.  No-op where
    ``prctl`` is unavailable.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


# Every server with a live process, so an interpreter exit still kills them.
_live_servers: "weakref.WeakSet[SynapseServer]" = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """Last-resort cleanup at interpreter exit: SIGKILL any still-running server."""
    for server in list(_live_servers):
        server.kill()


def _http_json(
    method: str, url: str, body: Any = None, timeout: float = 30.0
) -> tuple[int, Any]:
    """Minimal synchronous JSON HTTP call; returns ``(status, parsed body)``.

    Never raises on HTTP error statuses; connection errors propagate.
    """
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode("utf-8", errors="replace")


class SynapseServer:
    """One real Synapse homeserver process listening on loopback.

    Construction allocates ports, the data directory and the database; nothing
    runs until :meth:`start`.  :meth:`close` stops the process and drops a
    PostgreSQL database; it is what test fixtures call at teardown.

    Args:
        data_dir: directory for config, keys, media, logs and SQLite database.
        variant: ``"stock"`` or ``"patched"`` - which venv's Python runs Synapse.
        db: ``"sqlite"`` or ``"postgres"``.
        config: extra ``homeserver.yaml`` settings, deep-merged over the
            generated ones (see :func:`merge_config`; :data:`DELETE` removes keys).
        tls: certificate/key for the federation listener; generated into
            ``data_dir`` if omitted.
        postgres: admin used to create the database; built from
            ``$FASTJOIN_POSTGRES`` if omitted and ``db == "postgres"``.
        name: short label for logs and reports (default ``hs<fedport>``).
        env: extra environment for the process (``None`` values unset a var).
        start_timeout: default seconds :meth:`start` waits for ``/health``.
        federation_tls: serve federation over TLS (the default). False serves it
            over plain HTTP, for a server behind a TLS-terminating proxy.
        public_port: the port in the server name, when other servers reach this
            one through a proxy on that port (default: the federation port).
        netsim_table: the network this server sees (tests/harness/netsim.py):
            which names resolve, to what, how fast. The file may be written
            or changed after the start. Default: ``netsim.json`` in the data
            dir, if any; without one, names under ``.fake`` and ``.invalid``
            do not exist and every other name goes to the system resolver.
    """

    def __init__(
        self,
        data_dir: Path,
        variant: Variant = "patched",
        db: DbBackend = "sqlite",
        config: Mapping[str, Any] | None = None,
        *,
        tls: TLSFiles | None = None,
        postgres: PostgresAdmin | None = None,
        name: str | None = None,
        env: Mapping[str, str | None] | None = None,
        start_timeout: float = 60.0,
        federation_tls: bool = True,
        public_port: int | None = None,
        netsim_table: Path | None = None,
    ) -> None:
        if db not in ("sqlite", "postgres"):
            raise ValueError(f"unknown database backend {db!r}; use 'sqlite' or 'postgres'")
        self.variant: Variant = variant
        self.python = venv_python(variant)
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.fed_port = free_port()
        self.client_port = free_port()
        self.federation_tls = federation_tls
        self.public_port = public_port or self.fed_port
        self.name = name or f"hs{self.fed_port}"
        self.extra_config: dict[str, Any] = merge_config({}, config)
        self.env_overrides = dict(env or {})
        self.start_timeout = start_timeout
        self.registration_shared_secret = secrets.token_hex(16)
        self._macaroon_secret = secrets.token_hex(16)
        self._form_secret = secrets.token_hex(16)
        self.passwords: dict[str, str] = {}

        self.tls = tls or generate_self_signed(self.data_dir / "tls")
        self.netsim_table = Path(netsim_table) if netsim_table else self.data_dir / "netsim.json"
        self.config_path = self.data_dir / "homeserver.yaml"
        self.log_config_path = self.data_dir / "log.yaml"
        self.log_path = self.data_dir / "homeserver.log"
        self.stdout_path = self.data_dir / "stdout.txt"
        self.stderr_path = self.data_dir / "stderr.txt"
        self.signing_key_path = self.data_dir / "signing.key"
        self.media_store_path = self.data_dir / "media_store"

        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._closed = False
        self.start_count = 0

        self._pg_admin: PostgresAdmin | None = None
        if db == "postgres":
            self._pg_admin = postgres or PostgresAdmin.from_env()
            pg = self._pg_admin.create_database(self.name)
            self.database = DatabaseInfo(backend="postgres", postgres=pg)
        else:
            self.database = DatabaseInfo(
                backend="sqlite", sqlite_path=self.data_dir / "homeserver.db"
            )

    # ------------------------------------------------------------------ naming

    @property
    def server_name(self) -> str:
        """The Matrix server name, ``localhost:<public_port>``."""
        return f"localhost:{self.public_port}"

    @property
    def client_url(self) -> str:
        """Base URL of the plain-HTTP client (and admin) listener, no trailing slash."""
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def federation_url(self) -> str:
        """Base URL of the federation listener, no trailing slash."""
        scheme = "https" if self.federation_tls else "http"
        return f"{scheme}://127.0.0.1:{self.fed_port}"

    @property
    def db_backend(self) -> DbBackend:
        """``"sqlite"`` or ``"postgres"``."""
        return self.database.backend

    @property
    def pid(self) -> int | None:
        """Process id of the running homeserver, or ``None``."""
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        """Whether the process exists and has not exited (paused counts as running)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def is_paused(self) -> bool:
        """Whether :meth:`pause` stopped the process and :meth:`resume` has not run."""
        return self._paused and self.is_running

    def user_id(self, localpart: str) -> str:
        """The full Matrix ID of ``localpart`` on this server."""
        return f"@{localpart}:{self.server_name}"

    def __repr__(self) -> str:
        state = "paused" if self.is_paused else ("running" if self.is_running else "stopped")
        return (
            f"<SynapseServer {self.name} {self.server_name} {self.variant}/"
            f"{self.db_backend} {state} pid={self.pid}>"
        )

    # ------------------------------------------------------------------ config

    def base_config(self) -> dict[str, Any]:
        """The generated ``homeserver.yaml`` content before ``extra_config``."""
        if self.database.backend == "postgres":
            assert self.database.postgres is not None
            database: dict[str, Any] = {
                "name": "psycopg2",
                "args": dict(self.database.postgres.synapse_args),
            }
        else:
            database = {
                "name": "sqlite3",
                "args": {"database": str(self.database.sqlite_path)},
            }
        return {
            "server_name": self.server_name,
            "public_baseurl": self.client_url + "/",
            "pid_file": str(self.data_dir / "homeserver.pid"),
            "listeners": [
                {
                    "port": self.fed_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": self.federation_tls,
                    "x_forwarded": False,
                    "resources": [{"names": ["federation"], "compress": False}],
                },
                {
                    "port": self.client_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                },
            ],
            "tls_certificate_path": str(self.tls.cert_path),
            "tls_private_key_path": str(self.tls.key_path),
            "federation_verify_certificates": False,
            "ip_range_whitelist": ["127.0.0.0/8", "::1/128"],
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "database": database,
            "log_config": str(self.log_config_path),
            "media_store_path": str(self.media_store_path),
            "signing_key_path": str(self.signing_key_path),
            "registration_shared_secret": self.registration_shared_secret,
            "macaroon_secret_key": self._macaroon_secret,
            "form_secret": self._form_secret,
            "enable_registration": False,
            "bcrypt_rounds": 4,
            "report_stats": False,
            "enable_metrics": False,
            # Rate limits: tests create many users/rooms/joins quickly.
            "rc_message": _UNLIMITED,
            "rc_registration": _UNLIMITED,
            "rc_registration_token_validity": _UNLIMITED,
            "rc_login": {
                "address": _UNLIMITED,
                "account": _UNLIMITED,
                "failed_attempts": _UNLIMITED,
            },
            "rc_admin_redaction": _UNLIMITED,
            "rc_joins": {"local": _UNLIMITED, "remote": _UNLIMITED},
            "rc_joins_per_room": _UNLIMITED,
            "rc_3pid_validation": _UNLIMITED,
            "rc_invites": {
                "per_room": _UNLIMITED,
                "per_user": _UNLIMITED,
                "per_issuer": _UNLIMITED,
            },
            "rc_third_party_invite": _UNLIMITED,
            "rc_media_create": _UNLIMITED,
            "rc_presence": {"per_user": _UNLIMITED},
            "rc_delayed_event_mgmt": _UNLIMITED,
            "rc_room_creation": _UNLIMITED,
            "rc_reports": _UNLIMITED,
            "rc_user_directory": _UNLIMITED,
            "rc_profile": _UNLIMITED,
            "rc_key_requests": _UNLIMITED,
            "rc_federation": {
                "window_size": 1000,
                "sleep_limit": 100000,
                "sleep_delay": 1,
                "reject_limit": 100000,
                "concurrent": 1000,
            },
            "federation_rr_transactions_per_room_per_second": 100000,
        }

    def homeserver_config(self) -> dict[str, Any]:
        """The full config that :meth:`start` writes: base merged with extras."""
        return merge_config(self.base_config(), self.extra_config)

    def update_config(self, extra: Mapping[str, Any]) -> None:
        """Deep-merge ``extra`` into the overrides; takes effect at the next start."""
        self.extra_config = merge_config(self.extra_config, extra)

    def _log_config(self) -> dict[str, Any]:
        """Python logging dict-config: INFO to ``homeserver.log``, DEBUG for the module."""
        return {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "precise": {
                    "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s"
                    " - %(request)s - %(message)s"
                }
            },
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "precise",
                    "filename": str(self.log_path),
                    "encoding": "utf8",
                }
            },
            "loggers": {
                "synapse.storage.SQL": {"level": "INFO"},
                "synapse_fastjoin": {"level": "DEBUG"},
                # For a look at one run, e.g. every transaction's start and
                # end: FASTJOIN_DEBUG_LOGGERS=synapse.storage.txn
                **{
                    name: {"level": "DEBUG"}
                    for name in os.environ.get("FASTJOIN_DEBUG_LOGGERS", "").split(",")
                    if name
                },
            },
            "root": {"level": "INFO", "handlers": ["file"]},
        }

    def _write_signing_key(self) -> None:
        """Create an ed25519 signing key once (kept across restarts)."""
        if self.signing_key_path.exists():
            return
        from signedjson.key import generate_signing_key, write_signing_keys

        key = generate_signing_key("a_" + secrets.token_hex(2))
        with open(self.signing_key_path, "w") as f:
            write_signing_keys(f, [key])
        self.signing_key_path.chmod(0o600)

    def write_config(self) -> None:
        """(Re)write homeserver.yaml, log.yaml and (once) the signing key."""
        self.media_store_path.mkdir(exist_ok=True)
        self._write_signing_key()
        self.log_config_path.write_text(yaml.safe_dump(self._log_config(), sort_keys=False))
        self.config_path.write_text(yaml.safe_dump(self.homeserver_config(), sort_keys=False))

    # --------------------------------------------------------------- lifecycle

    def _env(self) -> dict[str, str]:
        """Environment of the child: ours minus PYTHONPATH & co., plus overrides.

        ``PYTHONPATH`` is dropped (and the cwd is the data dir) so a stock
        server can never import ``synapse_fastjoin`` from the checkout.
        """
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH")
        }
        env["PYTHONUNBUFFERED"] = "1"
        for k, v in self.env_overrides.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    @overload
    def start(
        self, expect_failure: Literal[False] = False, timeout: float | None = None
    ) -> None: ...

    @overload
    def start(
        self, expect_failure: Literal[True], timeout: float | None = None
    ) -> ExitResult: ...

    def start(
        self, expect_failure: bool = False, timeout: float | None = None
    ) -> ExitResult | None:
        """Spawn the homeserver and wait until ``GET /health`` answers 200.

        Fails fast (``SynapseStartError`` with exit code, stderr tail and log
        tail) if the process exits first or ``timeout`` (default
        ``start_timeout``) passes; a timed-out process is killed.

        With ``expect_failure=True`` the process is expected to exit on its own:
        the :class:`ExitResult` is returned; if it becomes healthy instead, it
        is stopped and ``SynapseStartError`` is raised.
        """
        if self._closed:
            raise RuntimeError(f"{self.name} was closed")
        if self.is_running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        timeout = self.start_timeout if timeout is None else timeout
        self.write_config()
        self.start_count += 1
        marker = (
            f"==== start #{self.start_count} of {self.name} "
            f"at {time.strftime('%H:%M:%S')} ====\n"
        )
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            out.write(marker.encode())
            err.write(marker.encode())
            out.flush()
            err.flush()
            offsets = {
                p: _file_size(p) for p in (self.stdout_path, self.stderr_path, self.log_path)
            }
            self._proc = subprocess.Popen(
                [
                    str(self.python),
                    str(NETSIM),
                    str(self.netsim_table),
                    "-m",
                    "synapse.app.homeserver",
                    "-c",
                    str(self.config_path),
                ],
                cwd=str(self.data_dir),
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=_set_parent_death_signal,
            )
        self._paused = False
        _live_servers.add(self)

        deadline = time.monotonic() + timeout
        while True:
            rc = self._proc.poll()
            if rc is not None:
                result = ExitResult(
                    returncode=rc,
                    stdout=_read_from(self.stdout_path, offsets[self.stdout_path]),
                    stderr=_read_from(self.stderr_path, offsets[self.stderr_path]),
                    log=_read_from(self.log_path, offsets[self.log_path]),
                )
                _live_servers.discard(self)
                if expect_failure:
                    return result
                raise SynapseStartError(
                    f"{self.name} ({self.variant}/{self.db_backend}) exited with code {rc} "
                    f"before becoming healthy.\n{self._failure_details()}"
                )
            if self._healthy():
                logger.info(
                    "%s: healthy after %.2fs (pid %s, %s)",
                    self.name,
                    timeout - (deadline - time.monotonic()),
                    self.pid,
                    self.server_name,
                )
                if expect_failure:
                    self.stop()
                    raise SynapseStartError(
                        f"{self.name} started and became healthy, but a start failure "
                        "was expected"
                    )
                return None
            if time.monotonic() > deadline:
                self.kill()
                raise SynapseStartError(
                    f"{self.name} ({self.variant}/{self.db_backend}) did not answer "
                    f"{self.client_url}/health within {timeout:.0f}s; killed it.\n"
                    f"{self._failure_details()}"
                )
            time.sleep(0.1)

    def _healthy(self) -> bool:
        """One quick ``GET /health`` probe on the client listener."""
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=2) as r:
                return r.status == 200
        except (OSError, http.client.HTTPException):
            return False

    def _failure_details(self, lines: int = 60) -> str:
        """Tails of stderr and the server log, for exception messages."""
        return (
            f"--- stderr tail ({self.stderr_path}) ---\n{tail_file(self.stderr_path, lines)}\n"
            f"--- log tail ({self.log_path}) ---\n{tail_file(self.log_path, lines)}"
        )

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop the process: SIGCONT if paused, SIGTERM, SIGKILL after ``timeout``.

        Returns the exit code (``None`` if it was not started).  Idempotent.
        """
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            started = time.monotonic()
            if self._paused:
                self._signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s: no exit %.0fs after SIGTERM; SIGKILL", self.name, timeout)
                proc.kill()
                proc.wait(10)
            logger.info(
                "%s: stopped in %.2fs (exit code %s)",
                self.name,
                time.monotonic() - started,
                proc.returncode,
            )
        self._paused = False
        _live_servers.discard(self)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the process immediately (works even while paused)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._paused = False
        _live_servers.discard(self)

    def restart(self, timeout: float | None = None) -> None:
        """Stop (gracefully) and start again with a freshly written config."""
        self.stop()
        self.start(timeout=timeout)

    def _signal(self, sig: int) -> None:
        """Send ``sig`` to the running process."""
        if not self.is_running:
            raise RuntimeError(f"{self.name} is not running")
        assert self._proc is not None
        os.kill(self._proc.pid, sig)

    def _proc_state(self) -> str:
        """Kernel scheduling state letter from ``/proc/<pid>/stat`` ('' if unknown)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            return stat.rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return ""

    def pause(self) -> None:
        """Freeze the process with SIGSTOP; returns once the kernel reports it stopped.

        While paused the server accepts TCP connections (the kernel queues
        them) but answers nothing - useful to hold work such as a partial-state
        resync in mid-flight.
        """
        self._signal(signal.SIGSTOP)
        self._paused = True
        deadline = time.monotonic() + 5
        while self._proc_state() not in ("T", "t", "") and time.monotonic() < deadline:
            time.sleep(0.01)

    def resume(self) -> None:
        """Continue a paused process with SIGCONT."""
        self._signal(signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        """Stop the process and drop its PostgreSQL database (fixture teardown).

        Idempotent; the data directory is left in place for post-mortems.
        """
        if self._closed:
            return
        try:
            self.stop()
        finally:
            self._closed = True
            if self._pg_admin is not None and self.database.postgres is not None:
                self._pg_admin.drop_database(self.database.postgres.name)

    def __enter__(self) -> "SynapseServer":
        """Context-manager use outside pytest: ``with SynapseServer(...) as hs:``."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop the process and drop its database (see :meth:`close`)."""
        self.close()

    # -------------------------------------------------------------------- logs

    def read_log(self) -> str:
        """Whole ``homeserver.log`` text ('' if not yet created)."""
        return _read_from(self.log_path, 0)

    def log_tail(self, lines: int = 200) -> str:
        """Last ``lines`` lines of ``homeserver.log``."""
        return tail_file(self.log_path, lines)

    def stdout_tail(self, lines: int = 200) -> str:
        """Last ``lines`` lines of the process's captured stdout."""
        return tail_file(self.stdout_path, lines)

    def stderr_tail(self, lines: int = 200) -> str:
        """Last ``lines`` lines of the process's captured stderr."""
        return tail_file(self.stderr_path, lines)

    # ------------------------------------------------------------------- users

    def register_user(
        self,
        localpart: str,
        admin: bool = False,
        password: str | None = None,
        displayname: str | None = None,
        timeout: float = 30.0,
    ) -> tuple[str, str]:
        """Create a user via the shared-secret admin API; return ``(user_id, token)``.

        Uses ``/_synapse/admin/v1/register`` (nonce + HMAC-SHA1 over
        ``nonce\\0user\\0password\\0admin|notadmin``).  The password (random
        unless given) is remembered in :attr:`passwords`.
        """
        url = self.client_url + "/_synapse/admin/v1/register"
        status, body = _http_json("GET", url, timeout=timeout)
        if status != 200 or not isinstance(body, dict) or "nonce" not in body:
            raise RuntimeError(f"{self.name}: nonce request failed: {status} {body!r}")
        nonce = body["nonce"]
        password = password or secrets.token_urlsafe(12)
        mac = hmac.new(self.registration_shared_secret.encode(), digestmod=hashlib.sha1)
        for part in (nonce.encode(), localpart.encode(), password.encode()):
            mac.update(part)
            mac.update(b"\x00")
        mac.update(b"admin" if admin else b"notadmin")
        request: dict[str, Any] = {
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        }
        if displayname is not None:
            request["displayname"] = displayname
        status, body = _http_json("POST", url, request, timeout=timeout)
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"{self.name}: registering {localpart!r} failed: {status} {body!r}")
        self.passwords[body["user_id"]] = password
        return body["user_id"], body["access_token"]

    def client(self, access_token: str | None = None) -> "ClientAPI":
        """A :class:`~tests.harness.client.ClientAPI` for this server's client port."""
        from .client import ClientAPI

        return ClientAPI(self.client_url, access_token)


class SynapseFactory(Protocol):
    """Type of the ``synapse_factory`` fixture (see ``tests/conftest.py``)."""

    def __call__(
        self,
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
        """Create (and by default start) a tracked homeserver."""
        ...
