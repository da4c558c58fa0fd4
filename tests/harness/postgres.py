"""Per-homeserver PostgreSQL databases for the end-to-end harness.

The admin connection string comes from the ``FASTJOIN_POSTGRES`` environment
variable (e.g. ``postgresql://fastjoin:fastjoin@127.0.0.1:5432/postgres``); the
role must be allowed to create databases.  Every test homeserver gets a fresh
database, created with the ``C`` collation Synapse demands, and dropped again
when the server is discarded.

There is deliberately no fallback: if PostgreSQL was asked for and is not
configured or not reachable, :class:`PostgresUnavailable` is raised with an
explanation, so a CI run can never silently test SQLite twice.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import secrets
import socket
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

__all__ = [
    "ENV_VAR",
    "PostgresAdmin",
    "PostgresDatabase",
    "PostgresUnavailable",
]

#: Environment variable holding the admin DSN.
ENV_VAR = "FASTJOIN_POSTGRES"

#: Prefix of every database this harness creates (makes leftovers easy to spot).
DB_PREFIX = "fastjoin_e2e_"

_counter = itertools.count(1)

#: Short tag of this machine, so stale-database sweeps only touch our own.
_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PostgresUnavailable(RuntimeError):
    """PostgreSQL was requested but is not configured or cannot be reached."""


def _mask_password(dsn: str) -> str:
    """Return ``dsn`` with any password replaced by ``***`` (for error messages)."""
    dsn = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", dsn)


@dataclass(frozen=True)
class PostgresDatabase:
    """One database created for one homeserver.

    ``dsn`` is a libpq connection string a test can hand to ``psycopg2.connect``
    to inspect the server's real tables; ``synapse_args`` is the ``args``
    mapping for Synapse's ``database`` config section.
    """

    name: str
    dsn: str
    synapse_args: dict[str, Any]

    def connect(self) -> psycopg2.extensions.connection:
        """Open a new psycopg2 connection to this database (caller closes it).

        A test's query runs on the reactor's thread: one that waited for a
        lock held by a server the test has paused would hang the whole run,
        so a lock is waited for a minute at most and a statement runs two."""
        return psycopg2.connect(
            self.dsn, connect_timeout=10, options="-c lock_timeout=60000 -c statement_timeout=120000"
        )


class PostgresAdmin:
    """Creates and drops per-server databases through an admin connection."""

    def __init__(self, admin_dsn: str) -> None:
        """Remember ``admin_dsn``; nothing is contacted until :meth:`check`."""
        self.admin_dsn = admin_dsn
        try:
            self._params = psycopg2.extensions.parse_dsn(admin_dsn)
        except psycopg2.ProgrammingError as e:
            raise PostgresUnavailable(
                f"{ENV_VAR}={_mask_password(admin_dsn)!r} is not a valid libpq DSN: {e}"
            ) from e

    @classmethod
    def from_env(cls) -> "PostgresAdmin":
        """Build from ``$FASTJOIN_POSTGRES`` and verify it is reachable.

        Raises :class:`PostgresUnavailable` if the variable is unset or the server
        cannot be reached / logged into.
        """
        dsn = os.environ.get(ENV_VAR, "").strip()
        if not dsn:
            raise PostgresUnavailable(
                f"PostgreSQL tests were requested (--db postgres) but ${ENV_VAR} is not "
                "set. Export an admin DSN, e.g. "
                f"{ENV_VAR}=postgresql://fastjoin:fastjoin@127.0.0.1:5432/postgres "
                "(scripts/test does this), or drop --db postgres."
            )
        admin = cls(dsn)
        admin.check()
        return admin

    def _connect(self) -> psycopg2.extensions.connection:
        """Open an autocommit admin connection (CREATE/DROP DATABASE need it)."""
        try:
            conn = psycopg2.connect(self.admin_dsn, connect_timeout=10)
        except psycopg2.OperationalError as e:
            raise PostgresUnavailable(
                f"cannot connect to PostgreSQL at {ENV_VAR}="
                f"{_mask_password(self.admin_dsn)!r}: {str(e).strip()}"
            ) from e
        conn.autocommit = True
        return conn

    def check(self) -> str:
        """Connect once and return the server version string (proves reachability)."""
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW server_version")
                row = cur.fetchone()
                return str(row[0]) if row else "?"
        finally:
            conn.close()

    def create_database(self, label: str = "hs") -> PostgresDatabase:
        """Create a fresh UTF8 / C-collation database and describe how to reach it.

        The name embeds the pytest process id, a counter and random bits so that
        concurrent test runs against one cluster never collide.
        """
        safe_label = re.sub(r"[^a-z0-9_]", "_", label.lower())[:16]
        name = (
            f"{DB_PREFIX}{_HOST_TAG}_{os.getpid()}_{next(_counter)}_"
            f"{secrets.token_hex(3)}_{safe_label}"
        )[:63]
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    sql.SQL(
                        "CREATE DATABASE {} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' "
                        "TEMPLATE template0"
                    ).format(sql.Identifier(name))
                )
        finally:
            conn.close()

        params = {k: v for k, v in self._params.items() if k not in ("dbname", "database")}
        dsn = psycopg2.extensions.make_dsn(self.admin_dsn, dbname=name)
        synapse_args: dict[str, Any] = dict(params)
        synapse_args["database"] = name
        synapse_args.setdefault("host", "127.0.0.1")
        synapse_args["cp_min"] = 1
        synapse_args["cp_max"] = 10
        return PostgresDatabase(name=name, dsn=dsn, synapse_args=synapse_args)

    def drop_stale_databases(self) -> list[str]:
        """Drop databases left by harness runs on this host that no longer exist.

        A run killed with SIGKILL cannot drop its databases; their names embed
        the host tag and the pytest pid, so any whose pid is not alive here is
        garbage.  Databases of concurrent, still-running sessions are kept.
        Returns the names dropped.
        """
        pattern = re.compile(rf"^{DB_PREFIX}{_HOST_TAG}_(\d+)_")
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT datname FROM pg_database WHERE datname LIKE %s",
                    (f"{DB_PREFIX}{_HOST_TAG}_%",),
                )
                names = [row[0] for row in cur.fetchall()]
        finally:
            conn.close()
        dropped = []
        for name in names:
            m = pattern.match(name)
            if m and not _pid_alive(int(m.group(1))):
                self.drop_database(name)
                dropped.append(name)
        return dropped

    def drop_database(self, name: str) -> None:
        """Drop ``name``, forcibly disconnecting any leftover sessions (PG >= 13)."""
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(name)
                    )
                )
        finally:
            conn.close()
