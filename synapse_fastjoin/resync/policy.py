"""Whom a resync asks for what, built on what is known about each server.

A big room's server list is mostly dead servers: names that no longer resolve
(slowly), hosts that refuse or accept and never answer, servers that answer
every request with an error. Asking them in the list's order, or waiting for
each of them in turn, can cost a resync minutes where one live server would
answer in a second. So:

- The order comes from what is known, best first: the servers an admin named
  (`prefer`), the server that last answered (at first, the one we joined
  through), servers that served good state in this room before (the module's
  record, `fastjoin_room_servers`), then servers with no bad record, then
  those that failed us before or that Synapse itself is backing off from
  (its `destinations` table, filled by every part of Synapse that talks to
  them, the federation sender above all), and last the servers that failed
  in this round.
- Requests are hedged (`race`): the best server is asked first; if it has not
  answered after a hedge delay, the next is asked as well, and so on; the
  first good answer wins and the others are cancelled. A failure moves on to
  the next server at once. So a dead server, of whatever kind, costs at most
  a hedge delay, never its timeout.
- A server that fails is set aside for the rest of the round.
"""

import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Collection, Iterable, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall

from synapse.api.errors import HttpResponseException
from synapse.logging.context import make_deferred_yieldable, run_in_background

if TYPE_CHECKING:
    from synapse.server import HomeServer

    from synapse_fastjoin.config import ResyncConfig
    from synapse_fastjoin.storage.store import FastJoinStore

logger = logging.getLogger(__name__)

T = TypeVar("T")


class NoServerAnswered(Exception):
    """Every server we tried failed; the caller backs off and tries again."""


class NotFound(Exception):
    """Servers answered, but none had what was asked for (404s)."""


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Known:
    __slots__ = ("good", "fail", "last_good_ts", "last_fail_ts", "last_error", "dirty")

    def __init__(self) -> None:
        self.good = 0
        self.fail = 0
        self.last_good_ts: int | None = None
        self.last_fail_ts: int | None = None
        self.last_error: str | None = None
        self.dirty = False


class FetchPolicy:
    """The servers of one room's resync, ranked, and hedged requests to them.

    Args:
        hs: the homeserver (its name is never asked; its reactor times hedges).
        config: `hedge_seconds` (how long the best server has before the next
            is asked too), `parallel_servers` (at most this many asked at once
            for one thing) and `servers_per_attempt` (how many one `race` may
            try before it gives up; the caller backs off, then asks again).
        room_id: the room being resynced.
        store: where the module keeps what each server did in this room, and
            reads Synapse's backoff; None keeps nothing (tests).
    """

    def __init__(
        self,
        hs: "HomeServer",
        config: "ResyncConfig",
        room_id: str,
        store: "FastJoinStore | None" = None,
    ) -> None:
        self._hs = hs
        self._config = config
        self._room_id = room_id
        self._store = store
        self._own = hs.hostname
        self._reactor = hs.get_reactor()
        self._servers: list[str] = []
        self._index: set[str] = set()
        self._preferred: list[str] = []
        self._last_good: str | None = None
        self._known: dict[str, _Known] = {}
        self._synapse_backoff: set[str] = set()
        self._set_aside: set[str] = set()
        self._knowledge_ts = 0.0

    # What is known.

    def add(self, servers: Iterable[str | None], answered: bool = False) -> int:
        """Add servers (in order); `answered`: the first of them just answered
        us (e.g. the server we joined through). Returns how many were new."""
        added = 0
        for server in servers:
            if not server or server == self._own:
                continue
            if server not in self._index:
                self._index.add(server)
                self._servers.append(server)
                added += 1
            if answered and self._last_good is None:
                self._last_good = server
        return added

    def __len__(self) -> int:
        return len(self._servers)

    def names(self) -> list[str]:
        """Every server known, in the order they were added."""
        return list(self._servers)

    def prefer(self, servers: Collection[str]) -> None:
        """Ask these first from now on (an admin's `via`)."""
        self._preferred = [s for s in servers if s and s != self._own]
        self.add(self._preferred)
        self._set_aside.difference_update(self._preferred)

    def new_round(self) -> None:
        """Servers set aside get another chance."""
        self._set_aside.clear()

    def answered(self, server: str) -> None:
        self._last_good = server
        self._set_aside.discard(server)
        known = self._known.setdefault(server, _Known())
        known.good += 1
        known.last_good_ts = _now_ms()
        known.dirty = True

    def failed(self, server: str, error: BaseException | str) -> None:
        self._set_aside.add(server)
        if self._last_good == server:
            self._last_good = None
        known = self._known.setdefault(server, _Known())
        known.fail += 1
        known.last_fail_ts = _now_ms()
        known.last_error = str(error)[:200]
        known.dirty = True

    async def refresh(self) -> None:
        """Load the module's record of these servers in this room and
        Synapse's backoff of them (at most every 10 s)."""
        now = time.monotonic()
        if now - self._knowledge_ts < 10 and self._knowledge_ts:
            return
        self._knowledge_ts = now
        if self._store is None or not self._servers:
            return
        try:
            records = await self._store.get_room_servers(self._room_id)
            backoff = await self._store.get_servers_in_backoff(self._servers)
        except Exception:
            logger.warning("Resync of %s: could not read server records", self._room_id, exc_info=True)
            return
        for server, (good, fail, last_good_ts, last_fail_ts) in records.items():
            known = self._known.get(server)
            if known is None or not known.dirty:
                known = self._known[server] = _Known()
                known.good, known.fail = good, fail
                known.last_good_ts, known.last_fail_ts = last_good_ts, last_fail_ts
        self._synapse_backoff = set(backoff)

    async def save(self) -> None:
        """Write what this run learnt of each server to the module's record."""
        if self._store is None:
            return
        changed = {s: k for s, k in self._known.items() if k.dirty}
        if not changed:
            return
        try:
            await self._store.save_room_servers(
                self._room_id,
                {
                    s: (k.good, k.fail, k.last_good_ts, k.last_fail_ts, k.last_error)
                    for s, k in changed.items()
                },
            )
        except Exception:
            logger.warning("Resync of %s: could not save server records", self._room_id, exc_info=True)
            return
        for k in changed.values():
            k.dirty = False

    def ranked(self) -> list[str]:
        """Every known server, best first."""

        def key(item: tuple[int, str]) -> tuple[int, int, int, int]:
            position, server = item
            if server in self._preferred:
                return (0, self._preferred.index(server), 0, 0)
            if server == self._last_good:
                return (1, 0, 0, 0)
            known = self._known.get(server)
            aside = server in self._set_aside
            if known is not None and known.good and (known.last_good_ts or 0) >= (known.last_fail_ts or 0):
                tier = 2
            elif known is None or (not known.fail and server not in self._synapse_backoff):
                tier = 3 if server not in self._synapse_backoff else 4
            else:
                tier = 4
            if aside:
                tier = 5
            good = known.good if known else 0
            return (tier, -good, 0, position)

        return [s for _, s in sorted(enumerate(self._servers), key=key)]

    def describe(self, limit: int = 5) -> list[str]:
        return self.ranked()[:limit]

    # Hedged requests.

    async def race(
        self,
        what: str,
        call: Callable[[str], Awaitable[T]],
        hedge_seconds: float | None = None,
        servers: list[str] | None = None,
        on_attempt: Callable[[str], None] | None = None,
    ) -> tuple[str, T]:
        """Ask the best server; hedge with the next ones; first answer wins.

        A server that raises (other than a 404) is `failed` and set aside, and
        the next is asked at once; a 404 means it does not have what we want:
        the next is asked too, and if every server answers 404, `NotFound` is
        raised. Returns (server, result).

        Raises:
            NoServerAnswered: `servers_per_attempt` servers failed (or none is known).
            NotFound: every server asked answered 404.
        """
        if servers is None:
            # Servers set aside in this round are not asked again.
            servers = [s for s in self.ranked() if s not in self._set_aside]
        candidates = list(servers)[: self._config.servers_per_attempt]
        if not candidates:
            raise NoServerAnswered(f"{what}: no other server is known to be in the room")
        hedge = self._config.hedge_seconds if hedge_seconds is None else hedge_seconds
        max_in_flight = max(1, self._config.parallel_servers)
        # A request that has not answered in this long no longer counts
        # against `max_in_flight`: a server that accepts connections and
        # never answers must not hold a place (it may still win).
        stale_after = 4 * hedge

        result: defer.Deferred = defer.Deferred()
        in_flight: dict[str, defer.Deferred] = {}
        started: dict[str, float] = {}
        state: dict[str, Any] = {
            "next": 0, "errors": [], "not_found": 0, "timer": None, "last_exception": None,
        }

        def cancel_timer() -> None:
            timer: IDelayedCall | None = state["timer"]
            if timer is not None and timer.active():
                timer.cancel()
            state["timer"] = None

        def maybe_done() -> None:
            if result.called or in_flight or state["next"] < len(candidates):
                return
            cancel_timer()
            if state["errors"]:
                last = state["errors"][-1]
                error = NoServerAnswered(
                    f"{what}: {len(state['errors'])} of {len(candidates)} servers failed; "
                    f"last error: {last}"
                )
                # The last server's own exception, for the failure reason.
                error.__cause__ = state["last_exception"]
                result.errback(error)
            else:
                result.errback(NotFound(f"{what}: not found on {state['not_found']} servers"))

        def launch_next() -> None:
            cancel_timer()
            if result.called:
                return
            if state["next"] >= len(candidates):
                maybe_done()
                return
            now = self._reactor.seconds()
            fresh = sum(1 for s in in_flight if now - started.get(s, now) < stale_after)
            if fresh >= max_in_flight:
                # Wait for one of them to end (or the hedge to come round again).
                state["timer"] = self._reactor.callLater(hedge, launch_next)
                return
            server = candidates[state["next"]]
            state["next"] += 1
            if on_attempt is not None:
                on_attempt(server)
            started[server] = self._reactor.seconds()
            d = run_in_background(call, server)
            in_flight[server] = d
            d.addCallbacks(
                lambda value, s=server: succeeded(s, value),
                lambda failure, s=server: errored(s, failure),
            )
            if (
                server in in_flight
                and not result.called
                and state["timer"] is None
                and state["next"] < len(candidates)
            ):
                state["timer"] = self._reactor.callLater(hedge, launch_next)

        def succeeded(server: str, value: Any) -> None:
            in_flight.pop(server, None)
            if result.called:
                return
            cancel_timer()
            self.answered(server)
            losers = list(in_flight.items())
            in_flight.clear()
            now = self._reactor.seconds()
            for other, _ in losers:
                if now - started.get(other, now) >= stale_after:
                    # Silent for four hedge delays while another answered:
                    # presumed dead for the rest of the round.
                    self.failed(other, f"no answer to {what} in {now - started[other]:.0f} s")
            result.callback((server, value))
            # Cancelled after the result is set: their errors are not failures.
            for _, d in losers:
                d.cancel()

        def errored(server: str, failure: Any) -> None:
            in_flight.pop(server, None)
            if result.called:
                return
            error = failure.value
            if isinstance(error, defer.CancelledError):
                return None
            if isinstance(error, HttpResponseException) and error.code == 404:
                # It answered: it is alive, it just has not got it.
                state["not_found"] += 1
                self.answered_without(server)
            else:
                state["errors"].append(f"{server}: {type(error).__name__}: {error}")
                state["last_exception"] = error
                self.failed(server, f"{type(error).__name__}: {error}")
                logger.info(
                    "Resync of %s: %s from %s failed: %s: %s",
                    self._room_id, what, server, type(error).__name__, error,
                )
            launch_next()
            maybe_done()
            return None

        def cancel_all(_: Any) -> None:
            cancel_timer()
            for d in list(in_flight.values()):
                d.cancel()
            in_flight.clear()

        result.addErrback(lambda f: (cancel_all(None), f)[1])
        launch_next()
        return await make_deferred_yieldable(result)

    def answered_without(self, server: str) -> None:
        """The server answered (alive) but did not have what was asked."""
        self._set_aside.discard(server)

    def is_set_aside(self, server: str) -> bool:
        return server in self._set_aside
