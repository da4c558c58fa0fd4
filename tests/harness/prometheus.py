"""A real Prometheus (Debian's package) on loopback, scraping Synapse's metrics
listener every second, for the metrics tests.

`scripts/lib/prometheus.sh` installs it (`ensure`) and runs it (`run`: writes
the config and execs Prometheus in the foreground), so this module owns the
process and stops it. Queries go through Prometheus's HTTP API.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from .synapse import REPO_ROOT, free_port, tail_file

SCRIPT = REPO_ROOT / "scripts" / "lib" / "prometheus.sh"


class PrometheusUnavailable(Exception):
    """Prometheus is not installed and could not be installed."""


def ensure_installed(timeout: float = 600.0) -> str:
    """The prometheus binary, installing Debian's package if needed.

    Raises:
        PrometheusUnavailable: with the script's output, if it cannot be had.
    """
    try:
        out = subprocess.run(
            ["bash", str(SCRIPT), "ensure"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PrometheusUnavailable(f"{SCRIPT} ensure: {e}") from None
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise PrometheusUnavailable(
            f"{SCRIPT} ensure exited with {out.returncode}: {out.stderr.strip()[-2000:]}"
        )
    return lines[-1]


class Prometheus:
    """One Prometheus process scraping `targets` (host:port of Synapse
    metrics listeners) at `/_synapse/metrics` every second."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.targets = targets
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> "Prometheus":
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                ["bash", str(SCRIPT), "run", str(self.workdir), str(self.port), *self.targets],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with {self._proc.returncode}:\n{tail_file(self.log_path, 40)}"
                )
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"prometheus not ready after {timeout:.0f}s")
            time.sleep(0.2)

    def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        return tail_file(self.log_path, lines)

    # The HTTP API.

    def api(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """GET /api/v1/<path>; returns `data`, raises on an error status."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
            raise AssertionError(f"prometheus {path} {params}: HTTP {e.code}: {body}") from None
        if body.get("status") != "success":
            raise AssertionError(f"prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate `expr` now; returns the result vector (or a one-item list
        for a scalar)."""
        data = self.api("query", {"query": expr})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expr: str) -> float | None:
        """The single value of `expr` now, or None if it has none."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr}: {len(result)} series: {result}"
        return float(result[0]["value"][1])

    def metric_names(self) -> set[str]:
        return set(self.api("label/__name__/values"))

    def targets_up(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]
