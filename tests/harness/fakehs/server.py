"""The fake resident: a Twisted HTTPS server answering federation requests for
one generated room, with controls for tests (hold, fail, delay, cut, corrupt)
and live traffic it pushes to the servers that joined.

One process can play several residents ("personas") of the same room, each
with its own port, server name (`localhost:<port>`) and key, so that a joining
server has other servers in the room to fall back to.
"""

import hashlib
import io
import itertools
import os
import json
import logging
import random
import re
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Pattern

import attr
import treq
from canonicaljson import encode_canonical_json
from signedjson.sign import sign_json
from twisted.internet import defer, reactor as default_reactor, ssl
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.protocols.basic import FileSender
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from tests.harness.certs import TLSFiles
from tests.harness.fakehs.events import event_id as compute_event_id, finalise_event
from tests.harness.fakehs.keys import KEY_ID, notarised_keys_json, server_keys_json, signing_key
from tests.harness.fakehs.room import Room, StoredEvent

logger = logging.getLogger(__name__)

# Bodies larger than this are streamed with a producer (see `_write`).
_STREAM_ABOVE = 1024 * 1024

ACTIONS = (
    "hold", "fail", "delay", "cut", "stall", "truncate", "malformed", "oversize", "endless", "forge",
)
FORGE_MODES = ("bad_signature", "bad_hash", "extra_events", "other_event", "empty")

# How the room's other servers behave (see `FakeResident`'s `world`). The
# first three are the DNS's doing (tests/harness/netsim.py), the rest ours.
NETSIM_KINDS = ("nxdomain", "nxdomain_slow", "refuse")
SERVED_KINDS = ("live", "hang", "error5xx", "notfound404", "partial")
DEAD_KINDS = ("nxdomain_slow", "refuse", "hang", "error5xx", "notfound404", "partial")
WORLD_KINDS = NETSIM_KINDS + SERVED_KINDS


class HTTPError(Exception):
    def __init__(self, code: int, errcode: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.body = encode_canonical_json({"errcode": errcode, "error": message})


@attr.s(slots=True, auto_attribs=True)
class Rule:
    """A misbehaviour applied to requests whose path matches `path`.

    `times` limits how many requests it applies to (None: until removed);
    `server`, to the requests addressed to that one of the servers we play
    (None: all of them).
    """

    action: str
    path: str
    times: int | None = None
    server: str | None = None
    status: int = 500
    seconds: float = 0.0
    after_bytes: int = 0
    size: int = 0
    mode: str = "bad_signature"
    pattern: Pattern[str] = attr.ib(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; use one of {ACTIONS}")
        if self.action == "forge" and self.mode not in FORGE_MODES:
            raise ValueError(f"unknown forge mode {self.mode!r}; use one of {FORGE_MODES}")
        self.pattern = re.compile(self.path)

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in attr.asdict(self).items() if k != "pattern"}


@implementer(IPolicyForHTTPS)
class _NoVerifyTLS:
    """Test peers use self-signed certificates; a fake remote does not check them."""

    def creatorForNetloc(self, hostname: bytes, port: int) -> ssl.CertificateOptions:  # noqa: N802
        return ssl.CertificateOptions(verify=False)


class _Persona:
    def __init__(self, port: IListeningPort | None, server_name: str | None = None) -> None:
        self.port = port
        if server_name is None:
            assert port is not None
            server_name = f"localhost:{port.getHost().port}"
        self.server_name = server_name
        self.user_id = f"@resident:{self.server_name}"


class _Silent(Protocol):
    """Accepts a connection and says nothing, ever: the costly kind of dead
    server (the caller waits for its own timeout)."""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        pass


class FakeResident:
    """Serves `room` over federation. Create, `start()`, use, `stop()`.

    Args:
        room: the generated room (see `room.load_or_generate`).
        tls: certificate and key for the listeners.
        personas: how many residents of the room to play (each its own port).
        full_join_only: ignore `omit_members` and always answer `/send_join`
            with the full state, like a resident that does not do MSC3706.
        world: how each other server of the room (by name: the room's own
            server names, or any) behaves, one of `WORLD_KINDS`:
            `live` serves the room as a resident does; `error5xx` and
            `notfound404` answer every request so; `partial` serves every
            other event and cuts `/state` half-way; `hang` accepts connections
            and never answers; `nxdomain`, `nxdomain_slow` and `refuse` are
            names the joining server cannot reach (no server of ours).
            The served kinds share one port, told apart by the Host header.
        netsim_table: where to write the table that tells a joining Synapse
            started through tests/harness/netsim.py how to reach `world`.
        slow_dns_seconds: how long an `nxdomain_slow` lookup takes.
    """

    def __init__(
        self,
        room: Room,
        tls: TLSFiles,
        personas: int = 1,
        full_join_only: bool = False,
        reactor: Any = default_reactor,
        world: dict[str, str] | None = None,
        netsim_table: Path | None = None,
        slow_dns_seconds: float = 3.0,
    ) -> None:
        unknown = {k for k in (world or {}).values() if k not in WORLD_KINDS}
        if unknown:
            raise ValueError(f"unknown server kinds {sorted(unknown)}; use {WORLD_KINDS}")
        self.world: dict[str, str] = dict(world or {})
        self.netsim_table = netsim_table
        self.slow_dns_seconds = slow_dns_seconds
        self._world_personas: dict[str, _Persona] = {}
        self._world_port: IListeningPort | None = None
        self._hang_port: IListeningPort | None = None
        self.room = room
        self.tls = tls
        self.persona_count = personas
        self.full_join_only = full_join_only
        self.reactor = reactor
        self.personas: list[_Persona] = []
        self.rules: list[Rule] = []
        self._held: list[tuple[Rule, Callable[[], None]]] = []
        self.received_pdus: list[dict[str, Any]] = []
        self.received_edus: list[dict[str, Any]] = []
        self.received_by: dict[str, list[dict[str, Any]]] = {}
        """PDUs received per server we play (the /send's destination)."""
        self.received_edus_by: dict[str, list[dict[str, Any]]] = {}
        """EDUs received per server we play."""
        self.hidden_servers: set[str] = set()
        """Servers left out of `/send_join`'s `servers_in_room` (a resident
        whose view of the room is incomplete)."""
        self._cert: Any = None
        self.requests: list[tuple[str, str, int]] = []
        """(method, path, status) of every request answered."""
        self.bytes_served: dict[str, int] = {}
        self.requests_per_endpoint: dict[str, int] = {}
        self.unknown_routes: list[str] = []
        self.requests_per_server: dict[str, int] = {}
        self.joined_servers: list[str] = []
        """Servers that joined through us: where live traffic is pushed."""
        self.injected: list[str] = []
        self._inject_loop: LoopingCall | None = None
        self._sender = _FederationSender(self)
        self._routes = _routes(self)
        self._key_servers = set(room.spec.server_names())

    # Life cycle.

    def start(self) -> list[str]:
        """Listen (one port per persona); each persona joins the room. Returns
        the personas' server names."""
        with open(self.tls.cert_path, "rb") as c, open(self.tls.key_path, "rb") as k:
            cert = self._cert = ssl.PrivateCertificate.loadPEM(c.read() + b"\n" + k.read())
        for _ in range(self.persona_count):
            self._listen_persona()
        for persona in self.personas:
            self.room.create_event(
                persona.user_id,
                "m.room.member",
                {"membership": "join", "displayname": "Resident"},
                persona.user_id,
            )
        kinds = set(self.world.values())
        if kinds & (set(SERVED_KINDS) - {"hang"}):
            site = Site(_WorldDispatcher(self))
            site.noisy = False
            self._world_port = self.reactor.listenSSL(0, site, cert.options(), interface="127.0.0.1")
        if "hang" in kinds:
            self._hang_port = self.reactor.listenTCP(
                0, Factory.forProtocol(_Silent), interface="127.0.0.1"
            )
        self._key_servers.update(self.world)
        if self.netsim_table is not None:
            self.write_netsim_table(self.netsim_table)
        return [p.server_name for p in self.personas]

    def _listen_persona(self) -> _Persona:
        site = Site(_Dispatcher(self))
        site.noisy = False
        port = self.reactor.listenSSL(0, site, self._cert.options(), interface="127.0.0.1")
        persona = _Persona(port)
        self.personas.append(persona)
        site.resource.persona = persona  # type: ignore[attr-defined]
        self._key_servers.add(persona.server_name)
        return persona

    def add_persona(self, join: bool = True) -> str:
        """Play one more resident (after `start()`): a new port and server
        name whose user joins the room now, the join pushed to the servers
        that joined through us. Returns its server name."""
        persona = self._listen_persona()
        if join:
            self.membership(persona.user_id, "join")
        return persona.server_name

    def membership(self, user_id: str, membership: str, sender: str | None = None) -> StoredEvent:
        """Create a membership event for `user_id` (by `sender`, default the
        user) and push it to the servers that joined through us."""
        content: dict[str, Any] = {"membership": membership}
        event = self.room.create_event(sender or user_id, "m.room.member", content, user_id)
        self.push(event)
        return event

    def push(self, event: StoredEvent) -> None:
        """Send an event of the room to the servers that joined through us."""
        self._sender.send_pdu(event)

    def serve_keys_for(self, server_name: str) -> None:
        """Notarise `server_name`'s key (fake.keys) for the servers asking us."""
        self._key_servers.add(server_name)

    def netsim_names(self) -> dict[str, dict[str, Any]]:
        """How a joining server reaches each server of `world` (netsim.py's table)."""
        names: dict[str, dict[str, Any]] = {}
        for name, kind in self.world.items():
            host = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
            if kind == "nxdomain_slow":
                names[host] = {"kind": kind, "delay": self.slow_dns_seconds}
            elif kind in NETSIM_KINDS:
                names[host] = {"kind": kind}
            elif kind == "hang":
                assert self._hang_port is not None
                names[host] = {"kind": "address", "port": self._hang_port.getHost().port}
            else:
                assert self._world_port is not None
                names[host] = {"kind": "address", "port": self._world_port.getHost().port}
        return names

    def write_netsim_table(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"names": self.netsim_names()}, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def set_world(self, world: dict[str, str]) -> None:
        """Change how some servers behave from now on (served kinds only: a
        name's DNS kind is fixed once the joining server has the table)."""
        for name, kind in world.items():
            if kind not in SERVED_KINDS or self.world.get(name) not in SERVED_KINDS:
                raise ValueError(f"{name}: can only switch between {SERVED_KINDS}")
            if kind == "hang" or self.world[name] == "hang":
                raise ValueError(f"{name}: 'hang' uses its own port; it cannot be switched")
            self.world[name] = kind

    async def stop(self) -> None:
        self.stop_injecting()
        self.release()
        for persona in self.personas:
            assert persona.port is not None
            await persona.port.stopListening()
        for port in (self._world_port, self._hang_port):
            if port is not None:
                await port.stopListening()

    @property
    def server_name(self) -> str:
        return self.personas[0].server_name

    # Controls.

    def add_rule(self, rule: Rule) -> Rule:
        self.rules.append(rule)
        return rule

    def hold(self, path: str) -> Rule:
        return self.add_rule(Rule("hold", path))

    def clear_rules(self) -> None:
        self.rules = []
        self.release()

    def release(self, path: str | None = None) -> int:
        """Remove hold rules (all, or those for `path`) and let held requests go."""
        self.rules = [
            r for r in self.rules if not (r.action == "hold" and (path is None or r.path == path))
        ]
        released = [(r, go) for r, go in self._held if r not in self.rules]
        self._held = [(r, go) for r, go in self._held if r in self.rules]
        for _, go in released:
            go()
        return len(released)

    def held_count(self) -> int:
        """How many requests are being held right now."""
        return len(self._held)

    def _rule_for(self, path: str, actions: tuple[str, ...], server: str | None = None) -> Rule | None:
        for rule in self.rules:
            if rule.server is not None and rule.server != server:
                continue
            if rule.action in actions and rule.pattern.search(path):
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self.rules.remove(rule)
                return rule
        return None

    # Live traffic.

    def inject(self, rate: float, count: int, state_every: int = 0) -> None:
        """Create `count` events at `rate` per second from existing members
        (every `state_every`-th a topic change by a moderator, 0: messages
        only) and push them to every server that joined."""
        self.stop_injecting()
        rng = random.Random(len(self.room.events))
        spec = self.room.spec
        members = [spec.member(i) for i in range(spec.members)] or [spec.creator]
        counter = itertools.count(1)

        def one() -> None:
            n = next(counter)
            if n > count:
                self.stop_injecting()
                return
            if state_every and n % state_every == 0 and spec.moderators:
                event = self.room.create_event(
                    spec.moderator(n % spec.moderators), "m.room.topic", {"topic": f"live topic {n}"}, ""
                )
            else:
                event = self.room.create_event(
                    rng.choice(members), "m.room.message", {"msgtype": "m.text", "body": f"live {n}"}
                )
            self.injected.append(event.event_id)
            self._sender.send_pdu(event)

        self._inject_loop = LoopingCall(one)
        self._inject_loop.clock = self.reactor
        self._inject_loop.start(1.0 / rate, now=False)

    def stop_injecting(self) -> None:
        if self._inject_loop is not None and self._inject_loop.running:
            self._inject_loop.stop()
        self._inject_loop = None

    def stats(self) -> dict[str, Any]:
        return {
            "bytes_served": dict(self.bytes_served),
            "requests": dict(self.requests_per_endpoint),
            "requests_per_server": dict(self.requests_per_server),
            "unknown_routes": list(self.unknown_routes),
            "received_pdus": len(self.received_pdus),
            "received_edus": len(self.received_edus),
            "injected": len(self.injected),
            "injected_sent": self._sender.sent,
            # The live traffic's sender: requests failed (and retried), PDUs
            # the joiner refused (by event id: its error), PDUs still queued.
            "send_failures": self._sender.failures,
            "pdu_errors": dict(list(self._sender.pdu_errors.items())[:20]),
            "pdu_error_count": len(self._sender.pdu_errors),
            "send_queued": {d: len(q) for d, q in self._sender.queues.items() if q},
            "joined_servers": list(self.joined_servers),
            "held": len(self._held),
            "rules": [r.as_json() for r in self.rules],
        }

    # Request handling.

    def handle(self, persona: _Persona, request: Request) -> None:
        path = urllib.parse.unquote(request.path.decode("ascii", "replace"))
        method = request.method.decode()
        endpoint, handler, args = self._route(method, path)
        self.requests_per_endpoint[endpoint] = self.requests_per_endpoint.get(endpoint, 0) + 1
        server = persona.server_name
        self.requests_per_server[server] = self.requests_per_server.get(server, 0) + 1
        kind = self.world.get(server, "live")
        if kind in ("error5xx", "notfound404"):
            code = 502 if kind == "error5xx" else 404
            errcode = "M_UNKNOWN" if kind == "error5xx" else "M_NOT_FOUND"
            self._write(request, endpoint, path, code,
                        encode_canonical_json({"errcode": errcode, "error": f"{server} is {kind}"}))
            return
        if kind == "partial" and endpoint == "event" and args and _serves_not(args[0]):
            self._write(request, endpoint, path, 404,
                        encode_canonical_json({"errcode": "M_NOT_FOUND", "error": "not here"}))
            return

        def go() -> None:
            if request.finished or getattr(request, "_disconnected", False):
                return
            fail = self._rule_for(path, ("fail",), server)
            if fail is not None:
                body = encode_canonical_json({"errcode": "M_UNKNOWN", "error": "fake failure"})
                self._write(request, endpoint, path, fail.status, body)
                return
            try:
                code, body = 200, handler(persona, request, *args)
            except HTTPError as e:
                code, body = e.code, e.body
            except Exception as e:  # a bug in the fake: say so loudly
                logger.exception("fake resident failed on %s %s", method, path)
                code, body = 500, encode_canonical_json({"errcode": "M_UNKNOWN", "error": str(e)})
            if kind == "partial" and endpoint == "state" and code == 200:
                body = body[: len(body) // 2]
            self._respond(request, endpoint, path, code, body, server)

        hold = self._rule_for(path, ("hold",), server)
        if hold is not None:
            logger.info("holding %s %s for %s", method, path, server)
            self._held.append((hold, go))
            return
        delay = self._rule_for(path, ("delay",), server)
        if delay is not None:
            self.reactor.callLater(delay.seconds, go)
            return
        go()

    def _route(self, method: str, path: str) -> tuple[str, Callable[..., bytes], tuple[str, ...]]:
        for route_method, pattern, name, handler in self._routes:
            m = pattern.match(path)
            if m and route_method == method:
                return name, handler, m.groups()
        self.unknown_routes.append(f"{method} {path}")
        logger.warning("fake resident: unknown route %s %s", method, path)

        def unknown(*_: Any) -> bytes:
            raise HTTPError(404, "M_UNRECOGNIZED", f"unknown route {method} {path}")

        return "unknown", unknown, ()

    def _respond(
        self, request: Request, endpoint: str, path: str, code: int, body: bytes, server: str | None = None
    ) -> None:
        rule = self._rule_for(
            path, ("cut", "stall", "truncate", "malformed", "oversize", "endless", "forge"), server
        )
        if rule is None or code != 200:
            self._write(request, endpoint, path, code, body)
        elif rule.action == "stall":
            # Headers and the first bytes, then nothing more, ever.
            request.setResponseCode(code)
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Content-Length", str(len(body)).encode())
            request.write(body[: rule.after_bytes])
            self._count(endpoint, rule.after_bytes)
        elif rule.action == "cut":
            request.setResponseCode(code)
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Content-Length", str(len(body)).encode())
            request.write(body[: rule.after_bytes])
            self._count(endpoint, rule.after_bytes)
            # Close once the bytes written are sent: an abort would throw away
            # what is still buffered (headers included), so the peer would see
            # a refused request, not a body cut part-way.
            request.channel.loseConnection()  # type: ignore[union-attr]
        elif rule.action == "truncate":
            self._write(request, endpoint, path, code, body[: len(body) // 2])
        elif rule.action == "malformed":
            self._write(request, endpoint, path, code, b"<html>this is not JSON</html>")
        elif rule.action == "oversize":
            padding = b',"padding":"' + b"x" * rule.size + b'"}'
            self._write(request, endpoint, path, code, body.rstrip(b"}") + padding)
        elif rule.action == "endless":
            _EndlessBody(self, request, endpoint, rule.size or 8 * 1024**3).start()
        elif rule.action == "forge":
            self._write(request, endpoint, path, code, self._forge(body, rule.mode))

    def _write(self, request: Request, endpoint: str, path: str, code: int, body: bytes) -> None:
        self.requests.append((request.method.decode(), path, code))
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        self._count(endpoint, len(body))
        if len(body) <= _STREAM_ABOVE:
            request.write(body)
            request.finish()
            return
        # Large bodies go out as Synapse sends them: through a producer that
        # follows the client's pace, finishing only once the last byte is
        # handed to the transport. (Writing all at once and finishing would
        # re-arm Twisted's 60 s idle timeout and cut off a slow reader.)
        d = FileSender().beginFileTransfer(io.BytesIO(body), request)
        d.addCallbacks(
            lambda _: None if request.finished or getattr(request, "_disconnected", False) else request.finish(),
            lambda f: logger.info("fake resident: %s not fully sent: %s", path, f.getErrorMessage()),
        )

    def _count(self, endpoint: str, n: int) -> None:
        self.bytes_served[endpoint] = self.bytes_served.get(endpoint, 0) + n

    def _forge(self, body: bytes, mode: str) -> bytes:
        """Corrupt the events of a response: every other non-create event gets a
        broken signature or content hash, or extra validly signed events that
        the state does not contain are added."""
        doc = json.loads(body)
        lists = [k for k in ("pdus", "state", "auth_chain") if isinstance(doc.get(k), list)]
        if mode == "empty":
            for key in lists:
                doc[key] = []
        elif mode == "other_event":
            # Each event replaced by another event of the room (signed and
            # valid in itself, but not the one asked for).
            for key in lists:
                doc[key] = [self.room.events[1].as_dict() for _ in doc[key]]
        elif mode == "extra_events":
            spec = self.room.spec
            extra = []
            for i in range(10):
                stranger = f"@stranger{i}:{spec.server_name(0)}"
                ev = {
                    "type": "m.room.member",
                    "room_id": self.room.room_id,
                    "sender": stranger,
                    "state_key": stranger,
                    "content": {"membership": "join"},
                    "origin_server_ts": int(time.time() * 1000),
                    "depth": 1,
                    "prev_events": [],
                    "auth_events": [],
                }
                finalise_event(self.room.version, ev, spec.server_name(0))
                extra.append(ev)
            doc[lists[0]].extend(extra)
        else:
            for key in lists:
                for i, ev in enumerate(doc[key]):
                    if ev.get("type") == "m.room.create" or i % 2:
                        continue
                    if mode == "bad_signature":
                        for sigs in ev.get("signatures", {}).values():
                            for key_id in sigs:
                                sigs[key_id] = "A" * 86
                    else:
                        ev.setdefault("content", {})["forged"] = True
        return encode_canonical_json(doc)

    # Persisting what the joining server sends us.

    def accept_pdu(self, pdu: dict[str, Any]) -> None:
        self.received_pdus.append(pdu)
        if pdu.get("room_id") != self.room.room_id:
            return
        if not all(p in self.room.by_id for p in pdu.get("prev_events", [])):
            return
        event_id = compute_event_id(self.room.version, pdu)
        self.room.add(StoredEvent.from_dict(event_id, pdu))


class _Dispatcher(Resource):
    isLeaf = True

    def __init__(self, resident: FakeResident) -> None:
        super().__init__()
        self.resident = resident
        self.persona: _Persona | None = None

    def render(self, request: Request):
        request.notifyFinish().addErrback(lambda _: setattr(request, "_disconnected", True))
        assert self.persona is not None
        self.resident.handle(self.persona, request)
        return NOT_DONE_YET


class _WorldDispatcher(Resource):
    """The port every served server of the `world` shares: the Host header
    says which server a request is for."""

    isLeaf = True

    def __init__(self, resident: FakeResident) -> None:
        super().__init__()
        self.resident = resident

    def render(self, request: Request):
        request.notifyFinish().addErrback(lambda _: setattr(request, "_disconnected", True))
        host = (request.getHeader(b"host") or b"").decode("ascii", "replace")
        name = host if host in self.resident.world else host.rsplit(":", 1)[0]
        if name not in self.resident.world:
            request.setResponseCode(421)
            return encode_canonical_json({"errcode": "M_UNKNOWN", "error": f"not {host}"})
        persona = self.resident._world_personas.get(name)
        if persona is None:
            persona = self.resident._world_personas[name] = _Persona(None, name)
        self.resident.handle(persona, request)
        return NOT_DONE_YET


def _serves_not(event_id: str) -> bool:
    """Which events a `partial` server does not have: about half, fixed per id."""
    return hashlib.sha256(event_id.encode()).digest()[0] % 2 == 1


class _EndlessBody:
    """Streams a never-ending JSON array until the client gives up (or `limit`
    bytes, so a broken client cannot make the fake run forever)."""

    CHUNK = b'{"type":"m.room.member","padding":"' + b"x" * 65000 + b'"},'

    def __init__(self, resident: FakeResident, request: Request, endpoint: str, limit: int) -> None:
        self.resident = resident
        self.request = request
        self.endpoint = endpoint
        self.limit = limit
        self.sent = 0
        self.paused = False

    def start(self) -> None:
        self.request.setResponseCode(200)
        self.request.setHeader(b"Content-Type", b"application/json")
        self.request.registerProducer(self, True)
        self.request.write(b'{"pdus":[')
        self.resumeProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        while not self.paused and self.sent < self.limit:
            if getattr(self.request, "_disconnected", False):
                return
            self.request.write(self.CHUNK)
            self.sent += len(self.CHUNK)
            self.resident._count(self.endpoint, len(self.CHUNK))
        if self.sent >= self.limit:
            self.request.unregisterProducer()
            self.request.channel.transport.abortConnection()  # type: ignore[union-attr]

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True

    def stopProducing(self) -> None:  # noqa: N802
        self.paused = True
        self.sent = self.limit


class _FederationSender:
    """Pushes PDUs to the joined servers with `/send`, one transaction in
    flight per destination, signed with X-Matrix as the first persona."""

    def __init__(self, resident: FakeResident) -> None:
        self.resident = resident
        self.queues: dict[str, list[bytes]] = {}
        self.busy: set[str] = set()
        self.sent = 0
        self.failures = 0
        """/send requests that failed (no answer, or not 200): retried."""
        self.pdu_errors: dict[str, Any] = {}
        """event id -> the error a destination answered for it in /send."""
        self._txn = itertools.count(int(time.time()))
        self._agent = Agent(
            resident.reactor,
            contextFactory=_NoVerifyTLS(),
            pool=HTTPConnectionPool(resident.reactor, persistent=True),
        )
        self._http = treq.client.HTTPClient(self._agent)

    def send_pdu(self, event: StoredEvent) -> None:
        for destination in self.resident.joined_servers:
            self.queues.setdefault(destination, []).append(event.json)
            if destination not in self.busy:
                defer.ensureDeferred(self._drain(destination))

    async def _drain(self, destination: str) -> None:
        self.busy.add(destination)
        try:
            while self.queues.get(destination):
                batch, self.queues[destination] = self.queues[destination][:50], self.queues[destination][50:]
                if not await self._send(destination, batch):
                    # Put it back and retry shortly: the joiner may be busy.
                    self.queues[destination] = batch + self.queues[destination]
                    d: defer.Deferred = defer.Deferred()
                    self.resident.reactor.callLater(1.0, d.callback, None)
                    await d
        finally:
            self.busy.discard(destination)

    async def _send(self, destination: str, pdus: list[bytes]) -> bool:
        origin = self.resident.server_name
        txn_id = str(next(self._txn))
        uri = f"/_matrix/federation/v1/send/{txn_id}"
        now = int(time.time() * 1000)
        content = json.loads(
            b'{"origin":' + json.dumps(origin).encode()
            + b',"origin_server_ts":' + str(now).encode()
            + b',"pdus":[' + b",".join(pdus) + b"]}"
        )
        signed = sign_json(
            {"method": "PUT", "uri": uri, "origin": origin, "destination": destination, "content": content},
            origin,
            signing_key(origin),
        )
        sig = signed["signatures"][origin][KEY_ID]
        auth = f'X-Matrix origin="{origin}",destination="{destination}",key="{KEY_ID}",sig="{sig}"'
        try:
            response = await self._http.put(
                f"https://{destination}{uri}",
                data=encode_canonical_json(content),
                headers={"Authorization": auth, "Content-Type": "application/json"},
                timeout=60,
            )
            body = await response.content()
        except Exception as e:
            logger.warning("sending to %s failed: %s", destination, e)
            self.failures += 1
            return False
        if response.code == 200:
            try:
                results = json.loads(body).get("pdus", {})
            except ValueError:
                results = {}
            errors = {k: v for k, v in results.items() if isinstance(v, dict) and v.get("error")}
            if errors:
                self.pdu_errors.update(errors)
                logger.warning("%s refused %d PDUs: %s", destination, len(errors), list(errors.items())[:3])
        if response.code != 200:
            logger.warning("sending to %s: HTTP %d", destination, response.code)
            self.failures += 1
            return False
        self.sent += len(pdus)
        return True


# Route handlers. Each returns the JSON body of a 200 answer, or raises HTTPError.

def _json_body(request: Request) -> Any:
    try:
        return json.loads(request.content.read() or b"{}")
    except ValueError:
        raise HTTPError(400, "M_NOT_JSON", "body is not JSON")


def _query(request: Request, name: str) -> str | None:
    values = request.args.get(name.encode())
    return values[0].decode() if values else None


def _routes(resident: FakeResident) -> list[tuple[str, Pattern[str], str, Callable[..., bytes]]]:
    room = resident.room
    F = "/_matrix/federation"

    def check_room(room_id: str) -> None:
        if room_id != room.room_id:
            raise HTTPError(404, "M_NOT_FOUND", f"unknown room {room_id}")

    def event_or_404(event_id: str) -> StoredEvent:
        event = room.by_id.get(event_id)
        if event is None:
            raise HTTPError(404, "M_NOT_FOUND", f"unknown event {event_id}")
        return event

    def own_keys(persona: _Persona, request: Request, *_: str) -> bytes:
        return encode_canonical_json(server_keys_json(persona.server_name))

    def query_keys(persona: _Persona, request: Request) -> bytes:
        wanted = _json_body(request).get("server_keys", {})
        docs = [notarised_keys_json(s, persona.server_name) for s in wanted if s in resident._key_servers]
        return encode_canonical_json({"server_keys": docs})

    def query_one_key(persona: _Persona, request: Request, server: str, *_: str) -> bytes:
        docs = [notarised_keys_json(server, persona.server_name)] if server in resident._key_servers else []
        return encode_canonical_json({"server_keys": docs})

    def version(persona: _Persona, request: Request) -> bytes:
        return b'{"server":{"name":"synapse-fastjoin fake resident","version":"1"}}'

    def make_join(persona: _Persona, request: Request, room_id: str, user_id: str) -> bytes:
        check_room(room_id)
        versions = [v.decode() for v in request.args.get(b"ver", [])]
        if room.spec.room_version not in versions:
            raise HTTPError(400, "M_INCOMPATIBLE_ROOM_VERSION", "room version not supported by joiner")
        prev = room.forward_extremities()
        content = {"membership": "join"}
        template = {
            "type": "m.room.member",
            "room_id": room.room_id,
            "sender": user_id,
            "state_key": user_id,
            "content": content,
            "origin_server_ts": int(time.time() * 1000),
            "depth": max(room.by_id[p].depth for p in prev) + 1,
            "prev_events": prev,
            "auth_events": room.auth_events_for("m.room.member", user_id, user_id, content),
        }
        return encode_canonical_json({"event": template, "room_version": room.spec.room_version})

    def send_join(persona: _Persona, request: Request, room_id: str, event_id: str) -> bytes:
        check_room(room_id)
        event = _json_body(request)
        if compute_event_id(room.version, event) != event_id:
            raise HTTPError(400, "M_BAD_JSON", "event id does not match the event")
        missing = [p for p in event.get("prev_events", []) if p not in room.by_id]
        if missing:
            raise HTTPError(400, "M_BAD_JSON", f"unknown prev_events {missing}")
        omit_members = _query(request, "omit_members") == "true" and not resident.full_join_only
        # The state before the join: the state after its prev events.
        state = room.state_before(event_id) if event_id in room.by_id else _state_after(room, event["prev_events"])
        joiner = event["state_key"]
        if omit_members:
            state_ids = [
                eid for (etype, skey), eid in state.items()
                if etype != "m.room.member" or skey == joiner
            ]
            if ("m.room.name", "") not in state and ("m.room.canonical_alias", "") not in state:
                # MSC3943: heroes for a nameless room.
                heroes = [u for u in room.joined_members(state) if u != joiner][:5]
                state_ids += [state[("m.room.member", u)] for u in heroes]
            chain = room.auth_chain(state_ids + list(event["auth_events"]))
            in_state = set(state_ids)
            chain = [e for e in chain if e not in in_state]
        else:
            state_ids = list(state.values())
            chain = room.auth_chain(state_ids + list(event["auth_events"]))
        state_ids.sort(key=room.index_of)
        servers = [s for s in room.servers_in_room(state) if s not in resident.hidden_servers]
        room.add(StoredEvent.from_dict(event_id, event))
        joining_server = joiner.split(":", 1)[1]
        if joining_server not in resident.joined_servers:
            resident.joined_servers.append(joining_server)
        return (
            b'{"origin":' + json.dumps(persona.server_name).encode()
            + b',"members_omitted":' + (b"true" if omit_members else b"false")
            + b',"servers_in_room":' + encode_canonical_json(servers if omit_members else [])
            + b',"state":' + room.json_list(state_ids)
            + b',"auth_chain":' + room.json_list(chain)
            + b',"event":' + encode_canonical_json(event)
            + b"}"
        )

    def state_ids(persona: _Persona, request: Request, room_id: str) -> bytes:
        check_room(room_id)
        at = event_or_404(_query(request, "event_id") or "")
        state = list(room.state_before(at.event_id).values())
        return encode_canonical_json({"pdu_ids": state, "auth_chain_ids": room.auth_chain(state)})

    def state(persona: _Persona, request: Request, room_id: str) -> bytes:
        check_room(room_id)
        at = event_or_404(_query(request, "event_id") or "")
        state = sorted(room.state_before(at.event_id).values(), key=room.index_of)
        return b'{"pdus":' + room.json_list(state) + b',"auth_chain":' + room.json_list(room.auth_chain(state)) + b"}"

    def get_event(persona: _Persona, request: Request, event_id: str) -> bytes:
        event = event_or_404(event_id)
        return (
            b'{"origin":' + json.dumps(persona.server_name).encode()
            + b',"origin_server_ts":' + str(int(time.time() * 1000)).encode()
            + b',"pdus":[' + event.json + b"]}"
        )

    def event_auth(persona: _Persona, request: Request, room_id: str, event_id: str) -> bytes:
        check_room(room_id)
        event = event_or_404(event_id)
        return b'{"auth_chain":' + room.json_list(room.auth_chain([event.event_id])) + b"}"

    def get_missing_events(persona: _Persona, request: Request, room_id: str) -> bytes:
        check_room(room_id)
        body = _json_body(request)
        limit = int(body.get("limit", 10))
        earliest = set(body.get("earliest_events", []))
        stop: set[str] = set(earliest)
        for e in earliest:
            if e in room.by_id:
                stop |= room.ancestors(e)
        found: set[str] = set()
        todo = [p for e in body.get("latest_events", []) if e in room.by_id for p in room.by_id[e].prev_events]
        while todo:
            current = todo.pop()
            if current in found or current in stop or current not in room.by_id:
                continue
            found.add(current)
            todo.extend(room.by_id[current].prev_events)
        ordered = sorted(found, key=room.index_of)[-limit:]
        return b'{"events":' + room.json_list(ordered) + b"}"

    def backfill(persona: _Persona, request: Request, room_id: str) -> bytes:
        check_room(room_id)
        limit = int(_query(request, "limit") or 10)
        start = [v.decode() for v in request.args.get(b"v", []) if v.decode() in room.by_id]
        found: list[str] = []
        seen: set[str] = set()
        todo = list(start)
        while todo and len(found) < limit:
            todo.sort(key=room.index_of)
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            found.append(current)
            todo.extend(p for p in room.by_id[current].prev_events if p in room.by_id)
        return (
            b'{"origin":' + json.dumps(persona.server_name).encode()
            + b',"origin_server_ts":' + str(int(time.time() * 1000)).encode()
            + b',"pdus":' + room.json_list(found) + b"}"
        )

    def send(persona: _Persona, request: Request, txn_id: str) -> bytes:
        body = _json_body(request)
        results = {}
        for pdu in body.get("pdus", []):
            resident.received_by.setdefault(persona.server_name, []).append(pdu)
            resident.accept_pdu(pdu)
            try:
                results[compute_event_id(room.version, pdu)] = {}
            except Exception:
                pass
        resident.received_edus.extend(body.get("edus", []))
        resident.received_edus_by.setdefault(persona.server_name, []).extend(body.get("edus", []))
        return encode_canonical_json({"pdus": results})

    def user_devices(persona: _Persona, request: Request, user_id: str) -> bytes:
        return encode_canonical_json({"user_id": user_id, "stream_id": 0, "devices": []})

    def keys_query(persona: _Persona, request: Request) -> bytes:
        wanted = _json_body(request).get("device_keys", {})
        return encode_canonical_json({"device_keys": {u: {} for u in wanted}})

    def keys_claim(persona: _Persona, request: Request) -> bytes:
        return b'{"one_time_keys":{}}'

    def r(method: str, path: str, name: str, handler: Callable[..., bytes]):
        return (method, re.compile("^" + path + "$"), name, handler)

    return [
        r("GET", r"/_matrix/key/v2/server(?:/([^/]*))?", "key_server", own_keys),
        r("POST", r"/_matrix/key/v2/query", "key_query", query_keys),
        r("GET", r"/_matrix/key/v2/query/([^/]+)(?:/([^/]*))?", "key_query", query_one_key),
        r("GET", F + r"/v1/version", "version", version),
        r("GET", F + r"/v1/make_join/([^/]+)/([^/]+)", "make_join", make_join),
        r("PUT", F + r"/v2/send_join/([^/]+)/([^/]+)", "send_join", send_join),
        r("GET", F + r"/v1/state_ids/([^/]+)", "state_ids", state_ids),
        r("GET", F + r"/v1/state/([^/]+)", "state", state),
        r("GET", F + r"/v1/event/([^/]+)", "event", get_event),
        r("GET", F + r"/v1/event_auth/([^/]+)/([^/]+)", "event_auth", event_auth),
        r("POST", F + r"/v1/get_missing_events/([^/]+)", "get_missing_events", get_missing_events),
        r("GET", F + r"/v1/backfill/([^/]+)", "backfill", backfill),
        r("PUT", F + r"/v1/send/([^/]+)", "send", send),
        r("GET", F + r"/v1/user/devices/([^/]+)", "user_devices", user_devices),
        r("POST", F + r"/v1/user/keys/query", "keys_query", keys_query),
        r("POST", F + r"/v1/user/keys/claim", "keys_claim", keys_claim),
    ]


def _state_after(room: Room, prev_events: list[str]) -> dict[tuple[str, str], str]:
    """The state after `prev_events` (the state a new event on top of them sees)."""
    state: dict[tuple[str, str], str] = {}
    for prev in sorted(prev_events, key=room.index_of):
        state.update(room.state_before(prev))
        event = room.by_id[prev]
        if event.is_state:
            state[(event.type, event.state_key)] = prev  # type: ignore[index]
    return state
