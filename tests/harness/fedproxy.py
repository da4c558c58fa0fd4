"""A TLS-terminating reverse proxy in front of a real Synapse's federation
listener, which a test can tell to hold requests to chosen endpoints.

Production Synapses usually sit behind such a proxy (nginx and the like), so the
resident server runs with a plain-HTTP federation listener and its public port,
the one in its server name, is the proxy's. Holding `/state_ids` and `/state`
keeps a joining server's room in partial state for exactly as long as a test
wants, as Complement does, with no race against a fast resync.

The proxy runs in the test's reactor (pytest-twisted), so tests must await
rather than block while it has work to do.
"""

import logging
import re
from typing import Pattern

from twisted.internet import defer, reactor as default_reactor
from twisted.internet.interfaces import IListeningPort
from twisted.internet.ssl import PrivateCertificate
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from tests.harness.certs import TLSFiles

logger = logging.getLogger(__name__)

# Headers that describe one hop, not the message (RFC 9110 section 7.6.1).
_HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"upgrade",
    b"te",
    b"trailer",
    b"content-length",
}


@implementer(IBodyProducer)
class _BytesProducer:
    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer):  # noqa: N802 (Twisted's interface)
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        pass


class _ProxyResource(Resource):
    isLeaf = True

    def __init__(self, proxy: "FederationProxy") -> None:
        super().__init__()
        self._proxy = proxy

    def render(self, request: Request):
        self._proxy._handle(request)
        return NOT_DONE_YET


class FederationProxy:
    """Forwards HTTPS federation requests to `http://127.0.0.1:<backend_port>`.

    Usage: `start()` before the backend server is configured (its server name
    needs `port`), set `backend_port` once it is running, then `hold(...)`,
    `wait_until_held(...)` and `release(...)` as the test needs.
    """

    def __init__(self, tls: TLSFiles, reactor=default_reactor) -> None:
        self._tls = tls
        self._reactor = reactor
        self.backend_port: int | None = None
        self._listener: IListeningPort | None = None
        self._holds: list[Pattern[str]] = []
        self._held: list[tuple[str, Request]] = []
        self._held_waiters: list[tuple[Pattern[str], defer.Deferred]] = []
        self._agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        self.requests_seen: list[tuple[str, str]] = []
        """(method, path) of every request received, held or not."""

    @property
    def port(self) -> int:
        assert self._listener is not None, "start() the proxy first"
        return self._listener.getHost().port

    def start(self) -> int:
        """Listen on a free loopback port; returns it."""
        with open(self._tls.cert_path, "rb") as c, open(self._tls.key_path, "rb") as k:
            cert = PrivateCertificate.loadPEM(c.read() + b"\n" + k.read())
        site = Site(_ProxyResource(self))
        site.noisy = False
        self._listener = self._reactor.listenSSL(
            0, site, cert.options(), interface="127.0.0.1"
        )
        return self.port

    async def stop(self) -> None:
        self.release()
        if self._listener is not None:
            await self._listener.stopListening()
            self._listener = None

    def hold(self, path_regex: str) -> None:
        """Hold every request whose path matches `path_regex` (re.search) until
        `release` is called."""
        self._holds.append(re.compile(path_regex))

    def release(self, path_regex: str | None = None) -> int:
        """Stop holding `path_regex` (or everything) and forward what was held.
        Returns how many requests were let through."""
        if path_regex is None:
            self._holds = []
        else:
            self._holds = [p for p in self._holds if p.pattern != path_regex]
        released = [(p, r) for p, r in self._held if not self._is_held(p)]
        self._held = [(p, r) for p, r in self._held if self._is_held(p)]
        for _, request in released:
            self._forward(request)
        return len(released)

    def held_paths(self) -> list[str]:
        return [path for path, _ in self._held]

    def wait_until_held(self, path_regex: str, timeout: float = 30.0) -> defer.Deferred:
        """A Deferred that fires once a request matching `path_regex` is being
        held, or fails with TimeoutError after `timeout` seconds."""
        pattern = re.compile(path_regex)
        d: defer.Deferred = defer.Deferred()
        if any(pattern.search(path) for path, _ in self._held):
            d.callback(None)
            return d
        self._held_waiters.append((pattern, d))
        return d.addTimeout(timeout, self._reactor)

    def _is_held(self, path: str) -> bool:
        return any(p.search(path) for p in self._holds)

    def _handle(self, request: Request) -> None:
        path = request.uri.decode("ascii", "replace").split("?", 1)[0]
        self.requests_seen.append((request.method.decode(), path))
        if self._is_held(path):
            logger.info("holding %s %s", request.method.decode(), path)
            self._held.append((path, request))
            for waiter in list(self._held_waiters):
                pattern, d = waiter
                if pattern.search(path):
                    self._held_waiters.remove(waiter)
                    if not d.called:
                        d.callback(None)
            return
        self._forward(request)

    def _forward(self, request: Request) -> None:
        defer.ensureDeferred(self._forward_async(request))

    async def _forward_async(self, request: Request) -> None:
        assert self.backend_port is not None, "set backend_port first"
        finished = request.notifyFinish()
        gone: list[bool] = []
        finished.addErrback(lambda _: gone.append(True))
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in _HOP_BY_HOP and name.lower() != b"host":
                headers.setRawHeaders(name, values)
        headers.setRawHeaders(b"Host", [f"127.0.0.1:{self.backend_port}".encode()])
        body = request.content.read()
        url = f"http://127.0.0.1:{self.backend_port}".encode() + request.uri
        try:
            response = await self._agent.request(
                request.method, url, headers, _BytesProducer(body) if body else None
            )
            content = await readBody(response)
        except Exception as e:
            logger.warning("proxying %s failed: %s", request.uri, e)
            if not gone:
                request.setResponseCode(502)
                request.finish()
            return
        if gone:
            return
        request.setResponseCode(response.code)
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in _HOP_BY_HOP:
                request.responseHeaders.setRawHeaders(name, values)
        request.setHeader(b"Content-Length", str(len(content)).encode())
        request.write(content)
        request.finish()
