"""The fetch policy: which servers a resync asks, in what order, and how its
hedged requests behave when servers are slow, dead or do not have an event."""

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from synapse.api.errors import HttpResponseException
from synapse.config._base import ConfigError

from synapse_fastjoin.config import ResyncConfig, parse_config
from synapse_fastjoin.resync.policy import FetchPolicy, NoServerAnswered, NotFound


class _Hs:
    """What the policy uses of a HomeServer: its name and its reactor."""

    hostname = "me.test"

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def get_reactor(self) -> Clock:
        return self._clock


class _Store:
    def __init__(self, records: dict[str, tuple[int, int, int | None, int | None]], backoff: list[str]) -> None:
        self.records = records
        self.backoff = backoff
        self.saved: dict[str, Any] = {}

    async def get_room_servers(self, room_id: str) -> dict[str, Any]:
        return dict(self.records)

    async def get_servers_in_backoff(self, names: list[str]) -> list[str]:
        return [n for n in names if n in self.backoff]

    async def save_room_servers(self, room_id: str, updates: dict[str, Any]) -> None:
        self.saved.update(updates)


def policy(store: Any = None, **config: Any) -> tuple[FetchPolicy, Clock]:
    clock = Clock()
    return FetchPolicy(_Hs(clock), ResyncConfig(**config), "!r:x", store), clock  # type: ignore[arg-type]


def test_ranking_uses_what_is_known_not_the_list_order():
    store = _Store(
        records={"good.test": (3, 0, 2000, None), "flaky.test": (1, 4, 1000, 3000)},
        backoff=["down.test"],
    )
    p, _ = policy(store)
    p.add(["via.test"], answered=True)
    assert p.add(["down.test", "flaky.test", "plain.test", "me.test", "good.test", "down.test"]) == 4
    assert len(p) == 5  # never ourselves, no duplicates
    defer.ensureDeferred(p.refresh())
    # The server that answered, then one that served good state before, then
    # one nothing is known against, then those that failed us or Synapse.
    assert p.ranked() == ["via.test", "good.test", "plain.test", "flaky.test", "down.test"]
    p.failed("via.test", "refused")
    assert p.ranked()[-1] == "via.test"  # set aside for the round
    assert p.ranked()[0] == "good.test"
    p.new_round()
    p.answered("plain.test")
    assert p.ranked()[0] == "plain.test"
    p.prefer(["flaky.test"])
    assert p.ranked()[:2] == ["flaky.test", "plain.test"]


def test_what_was_learnt_is_saved():
    store = _Store({}, [])
    p, _ = policy(store)
    p.add(["a.test", "b.test"])
    p.answered("a.test")
    p.failed("b.test", "HttpResponseException: 502")
    defer.ensureDeferred(p.save())
    assert store.saved["a.test"][:2] == (1, 0)
    assert store.saved["b.test"][:2] == (0, 1)
    assert "502" in store.saved["b.test"][4]


class Remote:
    """Each call to a server returns a Deferred the test fires by hand."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.pending: dict[str, defer.Deferred] = {}
        self.cancelled: list[str] = []

    async def __call__(self, server: str) -> str:
        self.calls.append(server)
        d: defer.Deferred = defer.Deferred(lambda _: self.cancelled.append(server))
        self.pending[server] = d
        return await d


def race(p: FetchPolicy, remote: Remote, **kw: Any) -> tuple[defer.Deferred, list]:
    out: list = []
    d = defer.ensureDeferred(p.race("thing", remote, **kw))
    d.addBoth(out.append)
    return d, out


def test_a_silent_server_costs_one_hedge_delay_and_the_first_answer_wins():
    p, clock = policy(hedge_seconds=2.0, parallel_servers=3)
    p.add(["hang.test", "live.test", "other.test"])
    remote = Remote()
    _, out = race(p, remote)
    assert remote.calls == ["hang.test"]
    clock.advance(1.9)
    assert remote.calls == ["hang.test"]
    clock.advance(0.2)
    assert remote.calls == ["hang.test", "live.test"]
    remote.pending["live.test"].callback("state")
    assert out == [("live.test", "state")]
    # The silent one is given up on at once, and nothing more is asked.
    assert remote.cancelled == ["hang.test"]
    clock.advance(10)
    assert remote.calls == ["hang.test", "live.test"]
    assert p.ranked()[0] == "live.test"


def test_a_failure_moves_on_at_once_and_sets_the_server_aside():
    p, clock = policy(hedge_seconds=5.0)
    p.add(["dead.test", "live.test"])
    remote = Remote()
    _, out = race(p, remote)
    remote.pending["dead.test"].errback(ConnectionRefusedError())
    assert remote.calls == ["dead.test", "live.test"]
    remote.pending["live.test"].callback(1)
    assert out == [("live.test", 1)]
    assert p.is_set_aside("dead.test")
    assert p.ranked() == ["live.test", "dead.test"]


def test_every_server_failing_raises_no_server_answered():
    p, clock = policy(hedge_seconds=1.0, servers_per_attempt=2)
    p.add(["a.test", "b.test", "c.test"])
    remote = Remote()
    _, out = race(p, remote)
    remote.pending["a.test"].errback(HttpResponseException(502, "Bad Gateway", b""))
    remote.pending["b.test"].errback(TimeoutError())
    assert remote.calls == ["a.test", "b.test"]  # at most servers_per_attempt
    assert len(out) == 1 and out[0].check(NoServerAnswered)
    assert "2 of 2 servers failed" in str(out[0].value)


def test_404_everywhere_is_not_found_and_does_not_set_servers_aside():
    p, clock = policy(hedge_seconds=1.0)
    p.add(["a.test", "b.test"])
    remote = Remote()
    _, out = race(p, remote)
    remote.pending["a.test"].errback(HttpResponseException(404, "Not Found", b""))
    remote.pending["b.test"].errback(HttpResponseException(404, "Not Found", b""))
    assert len(out) == 1 and out[0].check(NotFound)
    assert not p.is_set_aside("a.test") and not p.is_set_aside("b.test")


def test_no_more_than_parallel_servers_in_flight():
    p, clock = policy(hedge_seconds=1.0, parallel_servers=2)
    p.add([f"s{i}.test" for i in range(5)])
    remote = Remote()
    _, out = race(p, remote)
    clock.advance(1.0)
    clock.advance(1.0)
    clock.advance(1.0)
    assert remote.calls == ["s0.test", "s1.test"]
    remote.pending["s0.test"].errback(ConnectionRefusedError())
    assert remote.calls == ["s0.test", "s1.test", "s2.test"]
    remote.pending["s2.test"].callback("x")
    assert out == [("s2.test", "x")]
    assert remote.cancelled == ["s1.test"]


def test_cancelling_the_race_cancels_every_request():
    p, clock = policy(hedge_seconds=1.0)
    p.add(["a.test", "b.test"])
    remote = Remote()
    d, out = race(p, remote)
    clock.advance(1.0)
    d.cancel()
    assert sorted(remote.cancelled) == ["a.test", "b.test"]
    assert len(out) == 1 and out[0].check(defer.CancelledError)
    clock.advance(10)
    assert remote.calls == ["a.test", "b.test"]


def test_no_server_known():
    p, _ = policy()
    _, out = race(p, Remote())
    assert len(out) == 1 and out[0].check(NoServerAnswered)


@pytest.mark.parametrize(
    "resync,key",
    [
        ({"fetch_method": "sometimes"}, "fetch_method"),
        ({"hedge_seconds": 0}, "hedge_seconds"),
        ({"hedge_seconds": True}, "hedge_seconds"),
        ({"servers_per_attempt": 0}, "servers_per_attempt"),
    ],
)
def test_bad_fetch_policy_settings_stop_start_up_naming_the_key(resync, key):
    with pytest.raises(ConfigError, match=key):
        parse_config({"resync": resync})


def test_fetch_policy_settings_are_read():
    config = parse_config(
        {"resync": {"fetch_method": "events", "hedge_seconds": 0.5, "servers_per_attempt": 7}}
    ).resync
    assert (config.fetch_method, config.hedge_seconds, config.servers_per_attempt) == ("events", 0.5, 7)


def test_servers_that_never_answer_do_not_hold_places_for_ever():
    """parallel_servers bounds the requests that may still answer soon; one
    unanswered for four hedge delays is presumed dead and no longer counts,
    so a list full of silent servers is still walked to its live end."""
    p, clock = policy(hedge_seconds=1.0, parallel_servers=2, servers_per_attempt=10)
    names = [f"silent{i}.test" for i in range(6)] + ["live.test"]
    p.add(names)
    remote = Remote()
    _, out = race(p, remote)
    for _ in range(40):
        clock.advance(0.5)
        if "live.test" in remote.pending:
            break
    assert "live.test" in remote.pending, remote.calls
    remote.pending["live.test"].callback("ok")
    assert out == [("live.test", "ok")]
    assert sorted(remote.cancelled) == sorted(names[:-1])


def test_servers_set_aside_are_not_asked_again_in_the_round():
    p, clock = policy(hedge_seconds=1.0)
    p.add(["dead.test", "live.test"])
    p.failed("dead.test", "refused")
    remote = Remote()
    _, out = race(p, remote)
    assert remote.calls == ["live.test"]
    remote.pending["live.test"].errback(ConnectionRefusedError())
    assert len(out) == 1 and out[0].check(NoServerAnswered)
    p.new_round()
    _, out = race(p, remote)
    assert remote.calls[-1] == "dead.test"  # a new round: everyone may be asked again
