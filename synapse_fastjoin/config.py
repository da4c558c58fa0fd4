"""The module's configuration, as given under `config:` in homeserver.yaml.

Every key is validated: an unknown key or a value of the wrong type stops
Synapse's start-up with a `ConfigError` that names the key.
"""

import os
from typing import Any, Mapping

import attr

from synapse.config._base import ConfigError

# Path prefix Synapse puts in front of our keys in its error messages.
_CONFIG_PATH = ("modules", "synapse_fastjoin.FastJoinModule", "config")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ResyncConfig:
    """The `resync:` block: how the engine fetches and processes state."""

    engine: bool = True
    """Take over Synapse's resync (false: Synapse's own loop runs; the module
    only records and reports)."""

    chunk_size: int = 1000
    """Events parsed and checked together (the unit of memory use)."""

    persist_batch_size: int = 500
    """Events persisted per database transaction."""

    bulk_writer: bool = True
    """Persist the state's outliers with `storage/bulk.py` (one transaction per
    batch, the rows Synapse's own outlier persistence writes) instead of
    Synapse's `persist_events_and_notify`."""

    current_state_chunk_size: int = 5000
    """At the end of a resync, write the room's new current state this many
    members per transaction (`storage/current_state.py`: the rows Synapse's
    `update_current_state` writes, set-based); 0: Synapse's own
    `update_current_state`, one transaction for the whole room."""

    sqlite_wal_autocheckpoint: int = 100_000
    """On SQLite: while a resync runs, the write-ahead log is checkpointed
    into the database once it holds this many pages (4 KiB each), instead of
    SQLite's 1,000 (`storage/sqlite_wal.py`); put back, and checkpointed, when
    the last resync ends. 0: SQLite's setting is left alone."""

    sqlite_multi_row_inserts: bool = True
    """On SQLite: Synapse's batched inserts (`simple_insert_many_txn`, in
    every transaction of the server, the engine's included) are sent as
    multi-row statements of up to 500 rows instead of one statement per row
    (`storage/sqlite_batch.py`, patch 0035): the same rows, without giving
    up and taking back Python's GIL for every row, which under a busy
    reactor cost milliseconds a row. false: Synapse's `executemany`,
    except in the bulk writer's own transactions."""

    sqlite_yield_ratio: float = 0.0
    """On SQLite, where one connection runs every transaction of the server:
    after each of the resync's writes (which holds the connection for 100–300
    ms), the resync waits while other transactions (live events, clients) use
    the connection, for at most this ratio of the time its write held it
    (`storage/connection_share.py`). 1.0: the rest of the server gets at least
    half of the connection while it has work, runs of live events included
    through the gaps between their transactions (live events are processed
    during the resync, not after it, and the resync takes longer: 1.6 times
    at 50,000 members and 50 events/s); 0 (the default): the resync never
    waits."""

    check_threads: int = 2
    """Worker threads for signature and hash checks."""

    check_processes: int = attr.Factory(lambda: min(4, max(0, (os.cpu_count() or 1) - 1)))
    """Check processes for big fetches (`resync/checkpool.py`): the checks of
    a big room's state on other cores, out of the reactor's GIL. Default: one
    fewer than the machine's cores, at most 4; 0 keeps every check in threads."""

    check_process_min_events: int = 5000
    """A fetch of at least this many events starts the check processes (they
    take a second or two to start; smaller fetches are checked in threads)."""

    fetch_method: str = "auto"
    """How missing state events are fetched: `auto` picks whichever of one
    streamed /state or one /event per missing event costs less (by how many
    are missing against how many /state would send); `state` or `events`
    force one."""

    event_fetch_threshold: int = 2000
    """Never fetch more than this many missing events one by one with /event
    (`auto` streams /state above it)."""

    event_fetch_concurrency: int = 20
    """/event requests in flight at once (a queue: no batch waits for its
    slowest request)."""

    hedge_seconds: float = 2.0
    """How long the best server has to answer /state_ids or /event before the
    next one is asked as well (the first answer wins); /event hedges sooner
    when servers answer quickly (4x the median answer time), /state later
    (5x: a resident computes a big room's state before it starts sending)."""

    parallel_servers: int = 3
    """At most this many servers asked at once for the same thing (the
    hedges of one request); a request unanswered for four hedge delays no
    longer counts (a server that never answers does not hold a place)."""

    servers_per_attempt: int = 20
    """How many servers one request may try, best first, before the attempt
    counts as failed (and the resync backs off and tries again)."""

    park_limit: int = 20000
    """Events held while their auth events have not arrived; past this they
    are dropped and fetched again in a later round."""

    catchup_batch_size: int = 500
    """Partial-state events read per query during catch-up."""

    request_timeout_seconds: int = 120
    """Give up on a request that sends nothing for this long."""

    backoff_initial_seconds: int = 5
    backoff_max_seconds: int = 300
    """Retry delays after a failure (doubling, with jitter)."""

    log_interval_seconds: int = 5
    """How often progress is logged and checkpointed."""

    keep_inbound_queue: bool = True
    """Stop Synapse from pruning a partial-state room's queue of inbound events
    (which otherwise drops most live events during a long resync)."""

    batch_inbound_staging: bool = True
    """Check and stage a `/send` transaction's PDUs of a room together
    (federation/staging.py: one staging transaction and one lock attempt for
    the room's PDUs instead of about three transactions each). False: one at
    a time, as stock Synapse does."""

    inbound_run_length: int = 100
    """At most this many staged inbound events of a room are processed
    together as one run (handlers/staged_runs.py: a chain of non-state events
    on the room's forward extremities, checked event by event as Synapse
    does, persisted with one call, which Synapse writes in transactions of
    100 events). 0: every event one at a time, as stock Synapse. At most
    1,000. Longer runs keep up with more live traffic during a resync on
    SQLite and cost the resync time and the server's latency
    (docs/benchmarks.md, "Live events right after a big resync and during
    it")."""

    inbound_queue_limit: int = 10000
    """At most this many inbound events wait in a kept queue (a partial-state
    room's, see `keep_inbound_queue`); the newest past it are dropped from the
    queue by id and fetched again from the federation once it has drained
    below half the bound, oldest first (never lost). 0: no bound."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class FastJoinConfig:
    """Validated configuration of `synapse_fastjoin.FastJoinModule`."""

    admin_api: bool = True
    """Serve the admin API under /_synapse/admin/v1/fastjoin/."""

    history_retention_days: int = 90
    """How long finished resyncs are kept in the history; 0 keeps them forever."""

    history_prune_interval_minutes: int = 60
    """How often expired history rows are deleted."""

    client_wait_timeout_seconds: int = 30
    """How long a client request may wait for a partial-state room's full
    state before it gets an error (403 ORG.MATRIX.MSC3895_UNABLE_DUE_TO_PARTIAL_STATE);
    0 waits for ever, as Synapse does."""

    resync: ResyncConfig = attr.Factory(ResyncConfig)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(
            f"'{key}' must be true or false, not {value!r}", path=_CONFIG_PATH + (key,)
        )
    return value


def _int(key: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    # bool is a subclass of int in Python: `true` is not a number of days.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"'{key}' must be a whole number, not {value!r}", path=_CONFIG_PATH + (key,)
        )
    if value < minimum:
        raise ConfigError(
            f"'{key}' must be at least {minimum}, not {value}", path=_CONFIG_PATH + (key,)
        )
    if maximum is not None and value > maximum:
        raise ConfigError(
            f"'{key}' must be at most {maximum}, not {value}", path=_CONFIG_PATH + (key,)
        )
    return value


def _number(key: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"'{key}' must be a number, not {value!r}", path=_CONFIG_PATH + (key,))
    if value < minimum:
        raise ConfigError(
            f"'{key}' must be at least {minimum}, not {value}", path=_CONFIG_PATH + (key,)
        )
    return float(value)


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(
            f"'{key}' must be one of {', '.join(choices)}, not {value!r}",
            path=_CONFIG_PATH + (key,),
        )
    return str(value)


# Synapse itself prunes a queue once this many events wait: a smaller bound
# would drop more than stock Synapse does.
_MIN_INBOUND_QUEUE_LIMIT = 100


def _queue_limit(key: str, value: Any) -> int:
    limit = _int(key, value, 0)
    if 0 < limit < _MIN_INBOUND_QUEUE_LIMIT:
        raise ConfigError(
            f"'{key}' must be 0 (no bound) or at least {_MIN_INBOUND_QUEUE_LIMIT}, not {limit}",
            path=_CONFIG_PATH + (key,),
        )
    return limit


_RESYNC_PATH = _CONFIG_PATH + ("resync",)

_RESYNC_PARSERS = {
    "engine": lambda key, v: _bool(key, v),
    "chunk_size": lambda key, v: _int(key, v, 10),
    "persist_batch_size": lambda key, v: _int(key, v, 1),
    "bulk_writer": lambda key, v: _bool(key, v),
    "current_state_chunk_size": lambda key, v: _int(key, v, 0),
    "sqlite_wal_autocheckpoint": lambda key, v: _int(key, v, 0),
    "sqlite_yield_ratio": lambda key, v: _number(key, v, 0),
    "sqlite_multi_row_inserts": lambda key, v: _bool(key, v),
    "check_threads": lambda key, v: _int(key, v, 1),
    "check_processes": lambda key, v: _int(key, v, 0),
    "check_process_min_events": lambda key, v: _int(key, v, 1),
    "fetch_method": lambda key, v: _choice(key, v, ("auto", "state", "events")),
    "event_fetch_threshold": lambda key, v: _int(key, v, 0),
    "hedge_seconds": lambda key, v: _number(key, v, 0.05),
    "servers_per_attempt": lambda key, v: _int(key, v, 1),
    "event_fetch_concurrency": lambda key, v: _int(key, v, 1),
    "parallel_servers": lambda key, v: _int(key, v, 1),
    "park_limit": lambda key, v: _int(key, v, 0),
    "catchup_batch_size": lambda key, v: _int(key, v, 1),
    "request_timeout_seconds": lambda key, v: _int(key, v, 1),
    "backoff_initial_seconds": lambda key, v: _int(key, v, 1),
    "backoff_max_seconds": lambda key, v: _int(key, v, 1),
    "log_interval_seconds": lambda key, v: _int(key, v, 1),
    "keep_inbound_queue": lambda key, v: _bool(key, v),
    "batch_inbound_staging": lambda key, v: _bool(key, v),
    "inbound_queue_limit": lambda key, v: _queue_limit(key, v),
    "inbound_run_length": lambda key, v: _int(key, v, 0, 1000),
}


def _resync(key: str, raw: Any) -> ResyncConfig:
    if raw is None:
        return ResyncConfig()
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"'{key}' must be a mapping, not {type(raw).__name__}", path=_RESYNC_PATH
        )
    unknown = sorted(str(k) for k in raw if k not in _RESYNC_PARSERS)
    if unknown:
        raise ConfigError(
            f"unknown key 'resync.{unknown[0]}'; known keys are: "
            f"{', '.join(sorted(_RESYNC_PARSERS))}",
            path=_RESYNC_PATH + (unknown[0],),
        )
    values = {}
    for k, v in raw.items():
        try:
            values[k] = _RESYNC_PARSERS[k](f"resync.{k}", v)
        except ConfigError as e:
            raise ConfigError(e.msg, path=_RESYNC_PATH + (k,)) from None
    config = ResyncConfig(**values)
    if config.backoff_max_seconds < config.backoff_initial_seconds:
        raise ConfigError(
            "'resync.backoff_max_seconds' must be at least 'resync.backoff_initial_seconds'",
            path=_RESYNC_PATH + ("backoff_max_seconds",),
        )
    return config


_PARSERS = {
    "resync": _resync,
    "admin_api": lambda key, v: _bool(key, v),
    "history_retention_days": lambda key, v: _int(key, v, 0),
    "history_prune_interval_minutes": lambda key, v: _int(key, v, 1),
    "client_wait_timeout_seconds": lambda key, v: _int(key, v, 0),
}


def parse_config(raw: Mapping[str, Any] | None) -> FastJoinConfig:
    """Validate the module's config block and return it as a `FastJoinConfig`.

    Args:
        raw: the `config:` mapping from homeserver.yaml; None or {} for defaults.

    Raises:
        ConfigError: naming the first unknown or ill-typed key.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"the module config must be a mapping, not {type(raw).__name__}",
            path=_CONFIG_PATH,
        )
    unknown = sorted(str(k) for k in raw if k not in _PARSERS)
    if unknown:
        raise ConfigError(
            f"unknown key '{unknown[0]}'; known keys are: {', '.join(sorted(_PARSERS))}",
            path=_CONFIG_PATH + (unknown[0],),
        )
    return FastJoinConfig(**{key: _PARSERS[key](key, value) for key, value in raw.items()})
