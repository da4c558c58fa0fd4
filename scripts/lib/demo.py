"""The demo: a stock Synapse hosts a room, a patched Synapse with
synapse-fastjoin joins it over federation (loopback, TLS), and we watch the
partial-state join and its resync through the module's admin API.

Run it with `scripts/demo` (which sets up the environments first).
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from twisted.internet import defer, task  # noqa: E402

from tests.harness.certs import generate_self_signed  # noqa: E402
from tests.harness.client import poll_until, quote, sleep  # noqa: E402
from tests.harness.fedproxy import FederationProxy  # noqa: E402
from tests.harness.synapse import SynapseServer  # noqa: E402

STATE_PATHS = r"^/_matrix/federation/v1/state(_ids)?/"
ADMIN = "/_synapse/admin/v1/fastjoin"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def show(title: str, body: object) -> None:
    say(title)
    for line in json.dumps(body, indent=2, sort_keys=True).splitlines():
        print("    " + line)


async def run(reactor, args: argparse.Namespace, workdir: Path) -> None:
    proxy = FederationProxy(generate_self_signed(workdir / "proxy-tls"))
    servers: list[SynapseServer] = []
    try:
        public_port = proxy.start()
        say("Starting a stock Synapse 1.163.2 as the resident server (SQLite) ...")
        resident = SynapseServer(
            workdir / "resident",
            variant="stock",
            db="sqlite",
            name="resident",
            federation_tls=False,
            public_port=public_port,
        )
        servers.append(resident)
        resident.start()
        proxy.backend_port = resident.fed_port
        say(f"  resident is {resident.server_name}")

        say("Starting a patched Synapse with synapse-fastjoin as the joining server ...")
        joiner = SynapseServer(
            workdir / "joiner",
            variant="patched",
            db="sqlite",
            name="joiner",
            config={
                "modules": [{"module": "synapse_fastjoin.FastJoinModule", "config": {}}]
            },
        )
        servers.append(joiner)
        joiner.start()
        say(f"  joiner is {joiner.server_name}")

        say(f"Building a room with {args.members} members on the resident ...")
        _, token = resident.register_user("creator")
        creator = resident.client(token)
        room_id = await creator.create_room(preset="public_chat", name="Demo room")
        for i in range(args.members):
            _, token = resident.register_user(f"member{i}")
            await resident.client(token).join(room_id)
        say(f"  {room_id} has {args.members + 1} members")

        admin_id, token = joiner.register_user("admin", admin=True)
        admin = joiner.client(token)

        say(
            f"Holding the resident's /state and /state_ids for {args.hold:.0f} s so the"
            " partial state can be watched (the proxy in front of the resident does it)"
        )
        proxy.hold(STATE_PATHS)
        started = time.monotonic()
        await admin.join(room_id, server_name=resident.server_name)
        say(f"Joined {room_id} as {admin_id} in {time.monotonic() - started:.2f} s")

        status, listing = await admin.get(f"{ADMIN}/rooms")
        show(f"Partial state seen: GET {ADMIN}/rooms -> {status}", listing)

        members_d = defer.ensureDeferred(admin.members(room_id, timeout=120))
        await sleep(0.5)
        if not members_d.called:
            say("GET /members is waiting for the full state, as it should")

        await sleep(max(0.0, args.hold - (time.monotonic() - started)))
        proxy.release()
        say("Released the resident; the resync runs")
        members = await members_d
        say(
            f"Resync done {time.monotonic() - started:.2f} s after the join:"
            f" /members answered with {len(members)} members"
        )

        async def gone() -> bool:
            status, _ = await admin.get(f"{ADMIN}/rooms/{quote(room_id)}")
            return status == 404

        await poll_until(gone, timeout=30, description="the room to leave partial state")
        status, listing = await admin.get(f"{ADMIN}/rooms")
        show(f"GET {ADMIN}/rooms -> {status}", listing)
        status, history = await admin.get(f"{ADMIN}/history")
        show(f"GET {ADMIN}/history -> {status}", history)
    finally:
        say("Stopping everything the demo started ...")
        await proxy.stop()
        for server in reversed(servers):
            server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--members", type=int, default=40, help="members of the room")
    parser.add_argument(
        "--hold", type=float, default=3.0, help="seconds the resync is held back"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the servers' data directory"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fastjoin-demo-"))
    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor, args, workdir)))
    finally:
        if args.keep:
            say(f"Logs and data kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
