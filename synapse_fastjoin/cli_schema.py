# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""``synapse-fastjoin schema drop``: remove the module's tables for good.

::

    synapse-fastjoin schema drop --config homeserver.yaml [--dry-run]
                                 [--site-packages DIR]

Reads the main database's section of ``homeserver.yaml`` (``database``, or the
entry of ``databases`` holding the ``main`` data store) and, in ONE
transaction, drops every object of the module: first the triggers on Synapse's
``current_state_events`` that keep ``fastjoin_room_joined_counts`` (a trigger
left without its table would make every write to that table fail), then, on
PostgreSQL, their functions, then every ``fastjoin_*`` table (the schema
version table included; their indexes go with them). The objects are found in
the database's catalogue by their ``fastjoin_`` prefix, not listed from the
code, so what an older or newer version of the module created goes too.

It refuses while ``homeserver.yaml`` still lists the module, and while any
patch of the series is applied to the Synapse it finds (that of the Python
running the command, or ``--site-packages``). A second run finds nothing to
drop and succeeds.

Like the rest of the CLI this does not import Synapse; it talks to the
database with ``sqlite3`` or ``psycopg2`` (installed with Synapse).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from synapse_fastjoin import patching

EXIT_OK = 0
EXIT_ERROR = 1

PREFIX = "fastjoin_"
# Only names of this shape are ever dropped (and they need no quoting).
_NAME_RE = re.compile(r"^fastjoin_[a-z0-9_]+$")
# LIKE with the underscore taken literally.
_LIKE = "fastjoin\\_%"

# Arguments in Synapse's `database.args` that are Synapse's (its connection
# pool's), not the database driver's.
_SYNAPSE_POOL_ARGS = ("cp_min", "cp_max", "cp_reconnect", "cp_noisy", "cp_openfun")

SCHEMA_EPILOG = """\
exit status:
  0  success (also when there was nothing to drop)
  1  error: the module still configured, the series still applied, the
     database unreadable or unreachable, a statement failed (nothing dropped)
  2  invalid command line
"""


class SchemaDropError(Exception):
    """The drop was refused or failed; the message says why."""


@dataclass(frozen=True)
class Drop:
    """One object to drop, and the statement that drops it."""

    kind: str  # "trigger", "function" or "table"
    name: str
    statement: str

    def describe(self) -> str:
        return f"{self.kind} {self.name}"


# ---------------------------------------------------------------------------
# homeserver.yaml
# ---------------------------------------------------------------------------


def read_config(paths: list[Path]) -> dict[str, Any]:
    """The configuration in `paths`, merged as Synapse merges several
    ``--config-path`` files (top-level keys; a later file wins); a directory
    stands for its ``*.yaml`` files in name order."""
    import yaml

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix == ".yaml" and p.is_file())
        else:
            files.append(path)
    config: dict[str, Any] = {}
    for path in files:
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise SchemaDropError(f"{path}: not valid YAML: {e}") from None
        if data is None:
            continue
        if not isinstance(data, dict):
            raise SchemaDropError(f"{path}: not a YAML mapping")
        config.update(data)
    return config


def main_database(config: dict[str, Any]) -> dict[str, Any]:
    """Synapse's `database` section for the main data store: `database`, or
    the entry of `databases` whose `data_stores` include `main`; SQLite in
    `homeserver.db` when neither is set, as Synapse defaults."""
    databases = config.get("databases")
    if databases:
        if not isinstance(databases, dict):
            raise SchemaDropError("`databases` in the config is not a mapping")
        for section in databases.values():
            if isinstance(section, dict) and "main" in (section.get("data_stores") or []):
                return section
        raise SchemaDropError("no entry of `databases` holds the `main` data store")
    section = config.get("database")
    if section is None:
        raise SchemaDropError(
            "the config has no `database` section (Synapse's default, SQLite in"
            " homeserver.db, is not assumed: name the database)"
        )
    if not isinstance(section, dict):
        raise SchemaDropError("`database` in the config is not a mapping")
    return section


def module_entries(config: dict[str, Any]) -> list[str]:
    """The entries of `modules` that are synapse-fastjoin's."""
    found = []
    for entry in config.get("modules") or []:
        if isinstance(entry, dict):
            name = str(entry.get("module", ""))
            if name.split(".", 1)[0] == "synapse_fastjoin":
                found.append(name)
    return found


# ---------------------------------------------------------------------------
# The database
# ---------------------------------------------------------------------------


class _Connection:
    """A DB-API connection to Synapse's main database, with the SQL dialect's
    differences in one place."""

    def __init__(self, section: dict[str, Any]) -> None:
        engine = section.get("name")
        args = dict(section.get("args") or {})
        if engine == "sqlite3":
            import sqlite3

            path = args.get("database")
            if not isinstance(path, str) or not path:
                raise SchemaDropError("the `database` section (sqlite3) names no `database` file")
            if path != ":memory:" and not os.path.isfile(path):
                # sqlite3 would create an empty database there.
                raise SchemaDropError(f"no SQLite database at {path}")
            self.postgres = False
            self.where = f"SQLite database {path}"
            # Autocommit mode: the transaction is opened and committed here.
            self.conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        elif engine == "psycopg2":
            import psycopg2

            for key in _SYNAPSE_POOL_ARGS:
                args.pop(key, None)
            self.postgres = True
            try:
                self.conn = psycopg2.connect(**args)
            except psycopg2.Error as e:
                raise SchemaDropError(f"cannot connect to PostgreSQL: {str(e).strip()}") from None
            self.where = "PostgreSQL database {}".format(self.conn.get_dsn_parameters().get("dbname"))
        else:
            raise SchemaDropError(f"unknown database engine {engine!r} (sqlite3 or psycopg2)")

    def query(self, sql: str, *args: Any) -> list[tuple]:
        cur = self.conn.cursor()
        cur.execute(sql.replace("?", "%s") if self.postgres else sql, args)
        rows = cur.fetchall()
        cur.close()
        return rows

    def close(self) -> None:
        self.conn.close()


def _named(rows: list[tuple]) -> list[tuple]:
    return [r for r in rows if _NAME_RE.match(r[0])]


def find_drops(db: _Connection) -> list[Drop]:
    """Every object of the module in the database, in the order they must be
    dropped: triggers, functions, then tables (the version table last)."""
    drops: list[Drop] = []
    if db.postgres:
        schema = "current_schema()"
        for name, table in _named(
            db.query(
                "SELECT t.tgname, c.relname FROM pg_trigger t"
                " JOIN pg_class c ON c.oid = t.tgrelid"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                f" WHERE NOT t.tgisinternal AND n.nspname = {schema} AND t.tgname LIKE ?"
                " ORDER BY t.tgname",
                _LIKE,
            )
        ):
            drops.append(Drop("trigger", f"{name} on {table}", f'DROP TRIGGER {name} ON "{table}"'))
        for name, arguments in _named(
            db.query(
                "SELECT p.proname, pg_get_function_identity_arguments(p.oid) FROM pg_proc p"
                " JOIN pg_namespace n ON n.oid = p.pronamespace"
                f" WHERE n.nspname = {schema} AND p.proname LIKE ? ORDER BY p.proname",
                _LIKE,
            )
        ):
            drops.append(Drop("function", f"{name}({arguments})", f"DROP FUNCTION {name}({arguments})"))
        tables = _named(
            db.query(
                f"SELECT tablename FROM pg_tables WHERE schemaname = {schema} AND tablename LIKE ?"
                " ORDER BY tablename",
                _LIKE,
            )
        )
    else:
        for name, table in _named(
            db.query(
                "SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger'"
                " AND name LIKE ? ESCAPE '\\' ORDER BY name",
                _LIKE,
            )
        ):
            drops.append(Drop("trigger", f"{name} on {table}", f"DROP TRIGGER {name}"))
        tables = _named(
            db.query(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name LIKE ? ESCAPE '\\' ORDER BY name",
                _LIKE,
            )
        )
    names = sorted((t[0] for t in tables), key=lambda n: (n == "fastjoin_schema_version", n))
    drops += [Drop("table", name, f"DROP TABLE {name}") for name in names]
    return drops


def drop_schema(db: _Connection, drops: list[Drop]) -> None:
    """Run the drops in one transaction: all of them, or none."""
    cur = db.conn.cursor()
    try:
        if not db.postgres:
            cur.execute("BEGIN IMMEDIATE")
        for drop in drops:
            cur.execute(drop.statement)
        if db.postgres:
            db.conn.commit()
        else:
            cur.execute("COMMIT")
    except Exception as e:
        db.conn.rollback()
        raise SchemaDropError(f"dropping failed, nothing was dropped: {str(e).strip()}") from None
    finally:
        cur.close()


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def _series_applied(site_packages: Optional[Path]) -> Optional[str]:
    """Why the series counts as applied (None if it is not); a Synapse that
    cannot be found is reported on stderr, not refused."""
    try:
        install = patching.locate_synapse(site_packages)
        states = patching.status(install, patching.read_series(None))
    except patching.VersionMismatchError:
        return None  # another Synapse release: the series cannot be on it
    except patching.PatchSeriesError as e:
        print(
            f"synapse-fastjoin: note: could not check whether the patch series is applied ({e})",
            file=sys.stderr,
            flush=True,
        )
        return None
    applied = [s.name for s in states if s.state == "applied"]
    if not applied:
        return None
    return (
        f"{len(applied)} patch(es) of the series are still applied to Synapse at "
        f"{install.package_dir}: run `synapse-fastjoin patches revert` (and restart "
        "Synapse) first"
    )


def _cmd_drop(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    listed = module_entries(config)
    if listed:
        raise SchemaDropError(
            f"the module is still enabled in the config ({', '.join(listed)} under"
            " `modules`): remove it, revert the series, restart Synapse, then drop"
        )
    why = _series_applied(args.site_packages)
    if why and not args.dry_run:
        raise SchemaDropError(why)
    if why:
        print(f"synapse-fastjoin: note: {why}", file=sys.stderr, flush=True)
    db = _Connection(main_database(config))
    try:
        drops = find_drops(db)
        if not drops:
            print(f"Nothing to drop: no {PREFIX}* object in the {db.where}.", flush=True)
            return EXIT_OK
        if args.dry_run:
            print(f"-- would run, in one transaction, on the {db.where}:")
            for drop in drops:
                print(f"{drop.statement};")
            sys.stdout.flush()
            return EXIT_OK
        drop_schema(db, drops)
    finally:
        db.close()
    for drop in drops:
        print(f"dropped    {drop.describe()}")
    print(f"Dropped {len(drops)} objects of synapse-fastjoin from the {db.where}.", flush=True)
    return EXIT_OK


def add_schema_parser(commands: Any, error: Callable[[str], int]) -> None:
    """Add the `schema` command group to the top-level subparsers."""
    schema = commands.add_parser(
        "schema",
        help="remove the module's tables and triggers from Synapse's database",
        description="Remove synapse-fastjoin's tables, and the triggers that keep "
        "them, from Synapse's main database, for good.",
        epilog=SCHEMA_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = schema.add_subparsers(dest="action", metavar="ACTION", required=True)
    drop = actions.add_parser(
        "drop",
        help="drop every fastjoin_* trigger, function and table, in one transaction",
        description="Drop every fastjoin_* trigger (first), function and table of\n"
        "Synapse's main database, in one transaction, and print what was dropped.\n"
        "Refused while homeserver.yaml lists the module or the patch series is\n"
        "applied: run it after disabling the module, reverting the series and\n"
        "restarting Synapse.",
        epilog=SCHEMA_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    drop.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        type=Path,
        action="append",
        required=True,
        help="Synapse's config file (homeserver.yaml), or a directory of them; "
        "may be given more than once, as to Synapse",
    )
    drop.add_argument(
        "--dry-run",
        action="store_true",
        help="print the statements that would run, drop nothing",
    )
    drop.add_argument(
        "--site-packages",
        metavar="DIR",
        type=Path,
        default=None,
        help="where the Synapse whose patches are checked is installed (default: "
        "the Synapse importable by the Python running this command)",
    )

    def run(args: argparse.Namespace) -> int:
        try:
            return _cmd_drop(args)
        except SchemaDropError as e:
            return error(str(e))

    drop.set_defaults(func=run)
