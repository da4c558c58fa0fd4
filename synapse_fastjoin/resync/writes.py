# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Batches written one after another while the next ones are auth-checked.

The resync auth-checks a batch of events (Python on the reactor thread) and
then writes it (mostly SQLite or PostgreSQL on the database thread). Done in
turn, one of the two threads always waits for the other. `OrderedWrites`
lets the auth checks of batch k+1 run while batch k is being written:

- writes run one at a time, in the order they were queued (a batch's auth
  events are in earlier batches or stored already, and Synapse's chain cover
  index needs them written first);
- a batch may be auth-checked against events of batches queued but not yet
  written; so when a write fails, every write whose auth checks began before
  that failure was seen is abandoned too (it may rest on the failed batch),
  and only writes whose checks began afterwards go on. The caller takes a
  `token()` before its checks and hands it to `queue()`.

Each write runs through `run_write` if given, and the next write starts only
once it has returned: the resync gives a single database connection back to
the rest of the server there (storage/connection_share.py).

Each queued write has a clean-up, called when it fails or is abandoned, so
the caller can forget what it counted on (its events stay missing and are
fetched again in a later round: nothing is lost, nothing is written that
rests on an unwritten event).
"""

from typing import Any, Awaitable, Callable

from twisted.internet import defer

from synapse.logging.context import make_deferred_yieldable, run_in_background
from synapse.util.async_helpers import ObservableDeferred


class EarlierWriteFailed(Exception):
    """A write was abandoned because one queued before it failed."""


class OrderedWrites:
    def __init__(
        self,
        run_write: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]] | None = None,
    ) -> None:
        self._run_write = run_write
        self._generation = 0
        self._tail: ObservableDeferred[None] | None = None

    def token(self) -> int:
        """Taken before the auth checks of a batch that is then queued."""
        return self._generation

    def queue(
        self,
        token: int,
        write: Callable[[], Awaitable[Any]],
        clean_up: Callable[[], None],
    ) -> "defer.Deferred[None]":
        """Run `write` once every write queued before it has ended.

        Returns a Deferred that fires when it has been written, or fails with
        the write's error (or `EarlierWriteFailed`), after `clean_up` ran.
        """
        previous = self._tail

        async def run() -> None:
            if previous is not None:
                try:
                    await make_deferred_yieldable(previous.observe())
                except Exception:
                    pass  # its own waiter has the error; the token tells us
            if token != self._generation:
                clean_up()
                raise EarlierWriteFailed("an earlier batch's write failed; this batch will be fetched again")
            try:
                if self._run_write is not None:
                    await self._run_write(write)
                else:
                    await write()
            except BaseException:
                self._generation += 1
                clean_up()
                raise

        observable: ObservableDeferred[None] = ObservableDeferred(run_in_background(run), consumeErrors=True)
        self._tail = observable
        return observable.observe()

    async def wait_all(self) -> None:
        """Wait until every write queued so far has ended (whatever its
        outcome: each one's waiter has its error)."""
        if self._tail is not None:
            try:
                await make_deferred_yieldable(self._tail.observe())
            except defer.CancelledError:
                raise
            except Exception:
                pass
