"""ConnectionShare (storage/connection_share.py): on SQLite's one connection,
the resync's writes give the connection back to the rest of the server while
it has transactions to run, at most as long as each write held it, and never
wait for the resync's own transactions; with a pool of connections
(PostgreSQL) nothing changes.

Run on a real in-process Synapse: "the resync" (a background process of its
own, as the engine's run is) writes batches that hold the database connection
(a transaction that sleeps in the database thread), while "the rest of the
server" (another background process) runs chains of small transactions one
after another, as the staging and processing of a live event do."""

import time
from collections.abc import Iterator
from typing import Any, Awaitable, Callable, TypeVar

import pytest
import pytest_twisted
from twisted.internet import defer

from synapse.app.homeserver import SynapseHomeServer
from synapse.logging.context import make_deferred_yieldable, run_in_background
from synapse.metrics.background_process_metrics import run_as_background_process
from synapse.util.duration import Duration

from synapse_fastjoin.resync.writes import OrderedWrites
from synapse_fastjoin.storage.connection_share import ConnectionShare

from tests.harness.inprocess import homeserver_on_fresh_database

SERVER = "share.example"
# How long each resync write holds the connection (long beside the others'
# chain of small transactions, even on a loaded machine).
HOLD_S = 0.3
# The other side's chain: this many small transactions, one after another.
CHAIN = 8

R = TypeVar("R")


@pytest.fixture
def homeserver(
    db_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[SynapseHomeServer]:
    with homeserver_on_fresh_database(
        "connection_share", SERVER, db_backend, tmp_path_factory, request
    ) as hs:
        yield hs


def _sleep(hs: SynapseHomeServer, seconds: float) -> Awaitable[None]:
    return hs.get_clock().sleep(Duration(seconds=seconds))


def _process(desc: "Any", func: Callable[..., Awaitable[R]], *args: Any) -> "defer.Deferred[R]":
    """`func` run as a background process: in a logging context of its own."""
    return make_deferred_yieldable(run_as_background_process(desc, SERVER, func, *args))  # type: ignore[arg-type]


async def _quiet(hs: SynapseHomeServer) -> None:
    """Until the new server's own start-up transactions are over (none started
    for 0.3 s), so that only the test's run while it measures."""
    db = hs.get_datastores().main.db_pool
    seen, quiet_for = db._TXN_ID, 0.0
    while quiet_for < 0.3:
        await _sleep(hs, 0.05)
        quiet_for = quiet_for + 0.05 if db._TXN_ID == seen else 0.0
        seen = db._TXN_ID


class _Timeline:
    """Who held the database connection, in order."""

    def __init__(self, hs: SynapseHomeServer) -> None:
        self.hs = hs
        self.db = hs.get_datastores().main.db_pool
        self.entries: list[str] = []

    async def write(self, name: str) -> None:
        def txn(t: Any) -> None:
            self.entries.append(f"{name}:start")
            t.execute("SELECT 1")
            time.sleep(HOLD_S)
            self.entries.append(f"{name}:end")

        await self.db.runInteraction("test_resync_write", txn)

    async def small(self, name: str) -> None:
        def txn(t: Any) -> None:
            t.execute("SELECT 1")
            self.entries.append(name)

        await self.db.runInteraction("test_small_txn", txn)

    async def chain(self, name: str, length: int) -> None:
        for i in range(length):
            await self.small(f"{name}{i}")

    def index(self, entry: str) -> int:
        return self.entries.index(entry)


async def _two_writes_and(
    hs: SynapseHomeServer,
    ratio: float | None,
    others: Callable[[_Timeline], Awaitable[None]],
    busy: Callable[[], bool] | None = None,
) -> tuple[_Timeline, ConnectionShare | None]:
    """Two resync writes queued back to back (through a ConnectionShare with
    `ratio` and `busy`, or none); `others` starts while the first holds the
    connection."""
    await _quiet(hs)
    timeline = _Timeline(hs)
    made: list[ConnectionShare] = []

    async def resync() -> None:
        share = ConnectionShare(hs, ratio, busy) if ratio is not None else None
        if share is not None:
            made.append(share)
        writes = OrderedWrites(share.run_write if share is not None else None)
        token = writes.token()
        first = writes.queue(token, lambda: timeline.write("w1"), lambda: None)
        second = writes.queue(token, lambda: timeline.write("w2"), lambda: None)
        await make_deferred_yieldable(defer.gatherResults([first, second], consumeErrors=True))

    resync_done = _process("test_resync", resync)
    # Let the first write reach the database thread before the others ask.
    while "w1:start" not in timeline.entries:
        await _sleep(hs, 0.005)
    await _process("test_others", others, timeline)
    await resync_done
    return timeline, (made[0] if made else None)


def _chain(timeline: _Timeline) -> Awaitable[None]:
    return timeline.chain("c", CHAIN)


def _skip_unless(db_backend: str, wanted: str) -> None:
    if db_backend != wanted:
        pytest.skip(f"{wanted} only")


@pytest_twisted.ensureDeferred
async def test_sqlite_chain_runs_between_writes(homeserver: SynapseHomeServer, db_backend: str) -> None:
    _skip_unless(db_backend, "sqlite")
    timeline, share = await _two_writes_and(homeserver, 1.0, _chain)
    assert share is not None and share.enabled
    # The whole chain ran after the first write and before the second.
    assert timeline.index("w1:end") < timeline.index("c0")
    assert timeline.index(f"c{CHAIN - 1}") < timeline.index("w2:start"), timeline.entries
    assert share.pauses == 1
    # It gave the connection back for the chain only, not for the whole
    # time the write held it.
    assert 0 < share.paused_seconds < HOLD_S


# A run of staged live events: its transactions are apart by more than the
# share's idle mark, as a run's checks on the reactor keep them apart.
GAP_S = 0.03
SPACED = 4


async def _spaced_chain(timeline: _Timeline, running: list[bool]) -> None:
    running[0] = True
    try:
        for i in range(SPACED):
            await timeline.small(f"s{i}")
            await _sleep(timeline.hs, GAP_S)
    finally:
        running[0] = False


@pytest_twisted.ensureDeferred
async def test_sqlite_spaced_chain_needs_the_busy_signal(
    homeserver: SynapseHomeServer, db_backend: str
) -> None:
    """A chain whose transactions are apart by more than the idle mark (a
    run's checks between them): the counter alone takes the pause as over
    at the first gap; while `busy` says the run goes on, the connection stays
    given back until it ends."""
    _skip_unless(db_backend, "sqlite")
    running = [False]
    # (A ratio of 3: a budget of about 0.9 s, far above the chain's length
    # even on a loaded machine, so that only the signal decides.)
    timeline, share = await _two_writes_and(homeserver, 3.0, lambda t: _spaced_chain(t, running))
    assert timeline.index("w2:start") < timeline.index(f"s{SPACED - 1}"), timeline.entries

    timeline, share = await _two_writes_and(
        homeserver, 3.0, lambda t: _spaced_chain(t, running), busy=lambda: running[0]
    )
    assert share is not None and share.pauses == 1
    assert timeline.index("w1:end") < timeline.index("s0")
    assert timeline.index(f"s{SPACED - 1}") < timeline.index("w2:start"), timeline.entries


@pytest_twisted.ensureDeferred
async def test_sqlite_busy_without_transactions_bounded(
    homeserver: SynapseHomeServer, db_backend: str
) -> None:
    """A run that stays busy (waiting for a remote server, say) holds the
    resync back no longer than the write held the connection, and the resync
    gives the connection back after a write even when nobody else started a
    transaction during it."""
    _skip_unless(db_backend, "sqlite")
    await _quiet(homeserver)
    timeline = _Timeline(homeserver)

    async def resync() -> float:
        share = ConnectionShare(homeserver, 1.0, lambda: True)
        return await share.run_write(lambda: timeline.write("w"))

    waited = await _process("test_resync", resync)
    # (At most the write's time, and never more than the share's 1 s cap,
    # give or take one poll.)
    assert HOLD_S <= waited < 1.1


@pytest_twisted.ensureDeferred
async def test_sqlite_without_share_chain_waits_for_every_write(
    homeserver: SynapseHomeServer, db_backend: str
) -> None:
    """What the share fixes: without it, the second write takes the
    connection after one small transaction of the chain."""
    _skip_unless(db_backend, "sqlite")
    timeline, _ = await _two_writes_and(homeserver, None, _chain)
    assert timeline.index("w2:start") < timeline.index(f"c{CHAIN - 1}"), timeline.entries


@pytest_twisted.ensureDeferred
async def test_sqlite_ratio_zero_never_pauses(homeserver: SynapseHomeServer, db_backend: str) -> None:
    _skip_unless(db_backend, "sqlite")
    timeline, share = await _two_writes_and(homeserver, 0.0, _chain)
    assert share is not None and not share.enabled
    assert share.pauses == 0
    assert timeline.index("w2:start") < timeline.index(f"c{CHAIN - 1}"), timeline.entries


@pytest_twisted.ensureDeferred
async def test_sqlite_one_other_transaction_costs_little(
    homeserver: SynapseHomeServer, db_backend: str
) -> None:
    """A single other transaction during a write (a checkpoint, a metrics
    read) costs the resync a few ms, not the time its write held the
    connection."""
    _skip_unless(db_backend, "sqlite")

    async def one(timeline: _Timeline) -> None:
        await timeline.small("o")

    timeline, share = await _two_writes_and(homeserver, 1.0, one)
    assert share is not None
    assert share.paused_seconds < HOLD_S / 3
    assert timeline.entries == ["w1:start", "w1:end", "o", "w2:start", "w2:end"]


@pytest_twisted.ensureDeferred
async def test_sqlite_never_waits_for_its_own_reads(
    homeserver: SynapseHomeServer, db_backend: str
) -> None:
    """The resync's own transactions beside its writes (its reads for the
    next batches) are not the rest of the server's: the resync does not give
    the connection back to them (at most a few ms, when one of them is
    running as a write ends)."""
    _skip_unless(db_backend, "sqlite")
    await _quiet(homeserver)
    timeline = _Timeline(homeserver)

    async def resync() -> ConnectionShare:
        share = ConnectionShare(homeserver, 1.0)
        reading = True

        async def reads() -> None:
            i = 0
            while reading:
                await timeline.small(f"r{i}")
                i += 1

        reader = run_in_background(reads)
        await _sleep(homeserver, 0.01)
        try:
            for n in range(3):
                await share.run_write(lambda n=n: timeline.write(f"w{n}"))
        finally:
            reading = False
            await make_deferred_yieldable(reader)
        return share

    share = await _process("test_resync", resync)
    assert share.paused_seconds < HOLD_S / 3, (share.paused_seconds, timeline.entries)


@pytest_twisted.ensureDeferred
async def test_sqlite_pause_bounded_by_the_write(homeserver: SynapseHomeServer, db_backend: str) -> None:
    """Others that never stop get the connection for as long as the write
    held it, then the resync goes on."""
    _skip_unless(db_backend, "sqlite")
    await _quiet(homeserver)
    timeline = _Timeline(homeserver)
    busy = True

    async def endless() -> None:
        while busy:
            await timeline.small("e")

    others = _process("test_others", endless)

    async def resync() -> float:
        share = ConnectionShare(homeserver, 1.0)
        return await share.run_write(lambda: timeline.write("w"))

    try:
        # (The others stop only after this returns: the resync went on when
        # its budget was spent.)
        waited = await _process("test_resync", resync)
    finally:
        busy = False
        await others
    assert HOLD_S <= waited < 1.0


@pytest_twisted.ensureDeferred
async def test_postgres_pool_never_pauses(homeserver: SynapseHomeServer, db_backend: str) -> None:
    _skip_unless(db_backend, "postgres")
    timeline, share = await _two_writes_and(homeserver, 1.0, _chain)
    assert share is not None and not share.enabled
    assert share.pauses == 0
    assert len(timeline.entries) == 4 + CHAIN
