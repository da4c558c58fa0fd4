"""Run the fake resident as its own process, controlled over plain HTTP.

    python -m tests.harness.fakehs generate --members 200000 --servers 1000
    python -m tests.harness.fakehs serve --members 200000 --servers 1000 \\
        --tls-dir DIR --ready-file FILE [--personas 2] [--full-join-only]

`serve` writes a JSON line to the ready file once listening:
`{"server_names": [...], "room_id": ..., "control_url": "http://127.0.0.1:PORT"}`.
The control API (see `process.FakeResidentProcess`) answers on that URL.
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests.harness.certs import TLSFiles, generate_self_signed
from tests.harness.fakehs.room import RoomSpec, load_or_generate
from tests.harness.fakehs.server import DEAD_KINDS, FakeResident, Rule
from tests.harness.fakehs.world import plan_world


class _Control(Resource):
    isLeaf = True

    def __init__(self, resident: FakeResident) -> None:
        super().__init__()
        self.resident = resident

    def render(self, request: Request):
        path = request.path.decode()
        method = request.method.decode()
        try:
            body = json.loads(request.content.read() or b"{}")
            result = self._dispatch(method, path, body)
            code = 200
        except (ValueError, TypeError, KeyError) as e:
            code, result = 400, {"error": f"{type(e).__name__}: {e}"}
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(result).encode()

    def _dispatch(self, method: str, path: str, body: dict[str, Any]) -> Any:
        r = self.resident
        if (method, path) == ("GET", "/info"):
            return {
                "server_names": [p.server_name for p in r.personas],
                "room_id": r.room.room_id,
                "room_version": r.room.spec.room_version,
                "world": r.world,
                "netsim_table": str(r.netsim_table) if r.netsim_table else None,
            }
        if (method, path) == ("POST", "/world"):
            r.set_world({str(k): str(v) for k, v in body.items()})
            return {"world": r.world}
        if (method, path) == ("GET", "/stats"):
            return r.stats()
        if (method, path) == ("POST", "/rules"):
            return r.add_rule(Rule(**body)).as_json()
        if (method, path) == ("DELETE", "/rules"):
            r.clear_rules()
            return {}
        if (method, path) == ("POST", "/release"):
            return {"released": r.release(body.get("path"))}
        if (method, path) == ("POST", "/inject"):
            r.inject(float(body["rate"]), int(body["count"]), int(body.get("state_every", 0)))
            return {}
        if (method, path) == ("POST", "/inject/stop"):
            r.stop_injecting()
            return {"injected": len(r.injected)}
        if (method, path) == ("GET", "/injected"):
            return {"event_ids": r.injected, "sent": r._sender.sent}
        if (method, path) == ("GET", "/room/state"):
            return {"state": [[t, k, e] for (t, k), e in sorted(r.room.current_state.items())]}
        if (method, path) == ("GET", "/room/members"):
            return {"members": r.room.joined_members()}
        if (method, path) == ("GET", "/received"):
            return {
                "pdus": [{"type": p.get("type"), "sender": p.get("sender")} for p in r.received_pdus],
                "edus": r.received_edus,
            }
        if (method, path) == ("POST", "/shutdown"):
            reactor.callLater(0.1, reactor.stop)
            return {}
        raise KeyError(f"no control {method} {path}")


def _spec(args: argparse.Namespace) -> RoomSpec:
    return RoomSpec(
        members=args.members,
        servers=args.servers,
        history=args.history,
        moderators=args.moderators,
        room_version=args.room_version,
        named=not args.nameless,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.fakehs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("generate", "serve"):
        p = sub.add_parser(name)
        p.add_argument("--members", type=int, required=True)
        p.add_argument("--servers", type=int, required=True)
        p.add_argument("--history", type=int, default=40)
        p.add_argument("--moderators", type=int, default=4)
        p.add_argument("--room-version", default="12")
        p.add_argument("--nameless", action="store_true")
        p.add_argument("--cache-dir", type=Path)
        if name == "serve":
            p.add_argument("--tls-dir", type=Path, required=True)
            p.add_argument("--ready-file", type=Path, required=True)
            p.add_argument("--personas", type=int, default=1)
            p.add_argument("--full-join-only", action="store_true")
            p.add_argument("--log-file", type=Path)
            p.add_argument("--dead-fraction", type=float, default=0.0,
                           help="share of the room's other servers that are dead")
            p.add_argument("--dead-kinds", default=",".join(DEAD_KINDS),
                           help=f"comma-separated dead kinds, given out in turn (default: all of {DEAD_KINDS})")
            p.add_argument("--server-kind", action="append", default=[], metavar="NAME=KIND",
                           help="how one server behaves (after --dead-fraction)")
            p.add_argument("--slow-dns-seconds", type=float, default=3.0)
            p.add_argument("--netsim-table", type=Path,
                           help="write the joining server's network table here (tests/harness/netsim.py)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        filename=getattr(args, "log_file", None),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    room = load_or_generate(_spec(args), args.cache_dir)
    if args.command == "generate":
        print(f"{room.room_id}: {len(room.events)} events")
        return 0

    cert, key = args.tls_dir / "tls.crt", args.tls_dir / "tls.key"
    tls = TLSFiles(cert, key) if cert.exists() else generate_self_signed(args.tls_dir)
    overrides = dict(item.split("=", 1) for item in args.server_kind)
    world = plan_world(
        room.spec, args.dead_fraction, [k for k in args.dead_kinds.split(",") if k], overrides
    )
    resident = FakeResident(
        room,
        tls,
        personas=args.personas,
        full_join_only=args.full_join_only,
        world=world,
        netsim_table=args.netsim_table,
        slow_dns_seconds=args.slow_dns_seconds,
    )
    names = resident.start()
    site = Site(_Control(resident))
    site.noisy = False
    control = reactor.listenTCP(0, site, interface="127.0.0.1")
    ready = {
        "server_names": names,
        "room_id": room.room_id,
        "netsim_table": str(args.netsim_table) if args.netsim_table else None,
        "control_url": f"http://127.0.0.1:{control.getHost().port}",
        "pid": os.getpid(),
    }
    tmp = args.ready_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(ready))
    os.replace(tmp, args.ready_file)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
