"""The network a Synapse under test sees: which server names resolve, to what,
and how fast. A launcher, run as a script in place of `python -m MODULE`:

    python tests/harness/netsim.py TABLE.json -m synapse.app.homeserver -c hs.yaml

It installs two resolvers into Twisted before Synapse starts, then runs the
module as `__main__`. Synapse itself is not touched: it resolves names through
`reactor.nameResolver` (every HTTPS connection, the `.well-known` lookup
included) and `twisted.names.client` (the `_matrix-fed._tcp` SRV lookup), and
both now answer from the table, the way Complement gives its homeservers a DNS
of their own. Nothing is sent to the machine's real DNS for a name the table
knows, or for any name under `.fake` or `.invalid`.

The table (JSON) maps server names (host part, no port) to behaviours:

    {"names": {"s00001.fake": {"kind": "address", "port": 40123},
               "s00002.fake": {"kind": "nxdomain_slow", "delay": 3.0},
               "s00003.fake": {"kind": "refuse"}}}

- `address`: the name resolves to 127.0.0.1, and every connection to it (any
  port: 8448, 443 for `.well-known`) goes to `port` on loopback, where the fake
  resident answers as that server (well, or with 5xx, 404, silence...);
- `nxdomain`: the name does not exist, answered at once;
- `nxdomain_slow`: the name does not exist, answered after `delay` seconds, as
  a name whose authoritative servers are gone makes a resolver wait;
- `refuse`: resolves to loopback port 1, where nothing listens: refused at once.

Other names under `.fake`/`.invalid` do not exist (answered at once); any other
name goes to the system resolver. The table is re-read when the file changes,
so a test may write it after Synapse has started.
"""

import json
import os
import runpy
import sys
from typing import Any

_LOOPBACK = "127.0.0.1"
_CLOSED_PORT = 1
_PRIVATE_SUFFIXES = (".fake", ".invalid")


class Table:
    """The table file, re-read when it changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mtime: float | None = None
        self._names: dict[str, dict[str, Any]] = {}

    def lookup(self, host: str) -> dict[str, Any] | None:
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            mtime = None
        if mtime != self._mtime:
            self._mtime = mtime
            try:
                with open(self.path) as f:
                    self._names = dict(json.load(f).get("names", {}))
            except (OSError, ValueError):
                self._names = {}
        host = host.lower().rstrip(".")
        entry = self._names.get(host)
        if entry is None and host.endswith(_PRIVATE_SUFFIXES):
            return {"kind": "nxdomain"}
        return entry


def install(table_path: str) -> Table:
    """Install the table's resolvers into the global reactor and twisted.names."""
    from twisted.internet import reactor
    from twisted.internet.address import IPv4Address
    from twisted.internet.defer import Deferred, fail
    from twisted.internet.interfaces import IHostnameResolver, IHostResolution
    from twisted.names import client, dns, error
    from zope.interface import implementer

    table = Table(table_path)

    @implementer(IHostResolution)
    class _Resolution:
        def __init__(self, name: str) -> None:
            self.name = name

        def cancel(self) -> None:
            pass

    @implementer(IHostnameResolver)
    class HostnameResolver:
        def __init__(self, system: Any) -> None:
            self._system = system

        def resolveHostName(  # noqa: N802 (Twisted's interface)
            self,
            receiver: Any,
            hostName: str,  # noqa: N803
            portNumber: int = 0,  # noqa: N803
            addressTypes: Any = None,  # noqa: N803
            transportSemantics: str = "TCP",  # noqa: N803
        ) -> Any:
            entry = table.lookup(hostName)
            if entry is None:
                return self._system.resolveHostName(
                    receiver, hostName, portNumber, addressTypes, transportSemantics
                )
            resolution = _Resolution(hostName)
            receiver.resolutionBegan(resolution)
            kind = entry.get("kind")

            def finish(port: int | None) -> None:
                if port is not None:
                    receiver.addressResolved(IPv4Address("TCP", _LOOPBACK, port))
                receiver.resolutionComplete()

            if kind == "address":
                finish(int(entry["port"]))
            elif kind == "refuse":
                finish(_CLOSED_PORT)
            elif kind == "nxdomain_slow":
                reactor.callLater(float(entry.get("delay", 3.0)), finish, None)
            else:  # nxdomain, or a kind this version does not know
                finish(None)
            return resolution

    class SrvResolver:
        """Answers `lookupService` (all Synapse asks of twisted.names): no name
        in the table has SRV records; a slow name takes its delay to say so."""

        def __init__(self, real: Any) -> None:
            self._real = real

        def lookupService(self, name: bytes | str, timeout: Any = None) -> Deferred:  # noqa: N802
            text = name.decode() if isinstance(name, bytes) else name
            host = text.split(".", 2)[-1] if text.startswith("_") else text
            entry = table.lookup(host)
            if entry is None:
                return self._real.lookupService(name, timeout)
            nx = error.DNSNameError(dns.Message(rCode=dns.ENAME))
            if entry.get("kind") == "nxdomain_slow":
                d: Deferred = Deferred()
                reactor.callLater(float(entry.get("delay", 3.0)), d.errback, nx)
                return d
            return fail(nx)

        def __getattr__(self, attr: str) -> Any:
            return getattr(self._real, attr)

    # Synapse installs a resolver of its own at start-up (a getaddrinfo one
    # with its own thread pool): the table goes in front of whichever is
    # installed.
    install = reactor.installNameResolver
    reactor.installNameResolver = lambda resolver: install(HostnameResolver(resolver))
    reactor.installNameResolver(reactor.nameResolver)
    client.theResolver = SrvResolver(client.getResolver())
    return table


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "-m":
        sys.exit("usage: netsim.py TABLE.json -m MODULE [ARGS...]")
    table_path, module = argv[0], argv[2]
    install(table_path)
    sys.argv = [module] + argv[3:]
    # This script's folder must not shadow anything the module imports.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
