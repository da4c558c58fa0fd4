"""Start the fake resident as a separate process and drive its control API
(synchronously: the benchmark's controller is plain threads)."""

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from tests.harness.fakehs.keys import KEY_ID, verify_key_base64
from tests.harness.fakehs.room import RoomSpec

REPO = Path(__file__).resolve().parents[3]


class FakeResidentProcess:
    """`python -m tests.harness.fakehs serve` in a child process.

    Args:
        spec: the room to serve.
        workdir: for the ready file, TLS files and the log.
        personas: residents to play; full_join_only: ignore omit_members.
        python: interpreter to run it with (default: this one).
    """

    def __init__(
        self,
        spec: RoomSpec,
        workdir: Path,
        personas: int = 1,
        full_join_only: bool = False,
        python: str | None = None,
        dead_fraction: float = 0.0,
        dead_kinds: Sequence[str] | None = None,
        server_kinds: dict[str, str] | None = None,
        slow_dns_seconds: float = 3.0,
    ) -> None:
        self.spec = spec
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.personas = personas
        self.full_join_only = full_join_only
        self.python = python or sys.executable
        self.log_path = self.workdir / "fakehs.log"
        self.dead_fraction = dead_fraction
        self.dead_kinds = list(dead_kinds) if dead_kinds else None
        self.server_kinds = dict(server_kinds or {})
        self.slow_dns_seconds = slow_dns_seconds
        self.netsim_table = self.workdir / "netsim.json"
        """The network table for a joining Synapse (`SynapseServer(netsim_table=...)`)."""
        self._proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def start(self, timeout: float = 600.0) -> "FakeResidentProcess":
        ready = self.workdir / "fakehs.ready"
        ready.unlink(missing_ok=True)
        args = [
            self.python, "-m", "tests.harness.fakehs", "serve",
            "--members", str(self.spec.members), "--servers", str(self.spec.servers),
            "--history", str(self.spec.history), "--moderators", str(self.spec.moderators),
            "--room-version", self.spec.room_version,
            "--tls-dir", str(self.workdir / "tls"), "--ready-file", str(ready),
            "--personas", str(self.personas), "--log-file", str(self.log_path),
            "--dead-fraction", str(self.dead_fraction),
            "--slow-dns-seconds", str(self.slow_dns_seconds),
            "--netsim-table", str(self.netsim_table),
        ]
        if self.dead_kinds:
            args += ["--dead-kinds", ",".join(self.dead_kinds)]
        for name, kind in self.server_kinds.items():
            args += ["--server-kind", f"{name}={kind}"]
        if not self.spec.named:
            args.append("--nameless")
        if self.full_join_only:
            args.append("--full-join-only")
        with open(self.workdir / "fakehs.stderr", "ab") as err:
            self._proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"fake resident exited with {self._proc.returncode}: "
                    + (self.workdir / "fakehs.stderr").read_text()[-3000:]
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("fake resident did not become ready")
            time.sleep(0.1)
        self.info = json.loads(ready.read_text())
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def server_name(self) -> str:
        return self.info["server_names"][0]

    @property
    def server_names(self) -> list[str]:
        return self.info["server_names"]

    @property
    def room_id(self) -> str:
        return self.info["room_id"]

    def trusted_key_servers_config(self) -> dict[str, Any]:
        """homeserver.yaml settings that make Synapse use this fake as notary."""
        return {
            "trusted_key_servers": [
                {"server_name": self.server_name, "verify_keys": {KEY_ID: verify_key_base64(self.server_name)}}
            ]
        }

    def control(self, method: str, path: str, body: Any = None, timeout: float = 120.0) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.info["control_url"] + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def add_rule(self, action: str, path: str, **kw: Any) -> Any:
        return self.control("POST", "/rules", {"action": action, "path": path, **kw})

    def release(self, path: str | None = None) -> int:
        return self.control("POST", "/release", {"path": path})["released"]

    def inject(self, rate: float, count: int, state_every: int = 0) -> None:
        self.control("POST", "/inject", {"rate": rate, "count": count, "state_every": state_every})

    def stop_injecting(self) -> int:
        return self.control("POST", "/inject/stop")["injected"]

    def injected(self) -> list[str]:
        return self.control("GET", "/injected")["event_ids"]

    def stats(self) -> dict[str, Any]:
        return self.control("GET", "/stats")

    def world(self) -> dict[str, str]:
        """Every other server of the room and how it behaves."""
        return self.control("GET", "/info")["world"]

    def set_world(self, kinds: dict[str, str]) -> dict[str, str]:
        """Switch some served servers to another served kind (see server.py)."""
        return self.control("POST", "/world", kinds)["world"]

    def stop(self, timeout: float = 20.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> "FakeResidentProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
