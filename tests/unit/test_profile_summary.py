# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""scripts/lib/profile_summary.py's `--areas` and `--transactions` on a
small raw py-spy recording: each stack counted once, in the first area it
names, idle and commits apart."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "lib" / "profile_summary.py"

MAIN = "thread (1): MainThread;<module> (synapse/app/homeserver.py:1)"
POOL = "thread (2): PoolThread-140422925453520-0;Thread.run (threading.py:982)"
CHECKS = "thread (3): PoolThread-fastjoin-checks-0;Thread.run (threading.py:982)"

RECORDING = "\n".join(
    [
        # A run whose stack also holds an auth-chain fetch: the run's (first area).
        f"{MAIN};StagedRuns._process (synapse_fastjoin/handlers/staged_runs.py:1);"
        "fetch_auth_chains (synapse_fastjoin/federation/event_auth.py:2);same_json (x.py:3) 100",
        f"{MAIN};fetch_auth_chains (synapse_fastjoin/federation/event_auth.py:2);"
        "make_event_from_json (synapse/events/__init__.py:9) 50",
        f"{MAIN};EPollReactor.doPoll (twisted/internet/epollreactor.py:1);poll (x.py:1) 500",
        f"{MAIN};something (elsewhere.py:1) 25",
        f"{POOL};DatabasePool.new_transaction (synapse/storage/database.py:833);"
        "persist_outliers_txn (synapse_fastjoin/storage/bulk.py:208);_do_execute (d.py:1) 150",
        f"{POOL};DatabasePool.new_transaction (synapse/storage/database.py:833);"
        "LoggingDatabaseConnection.commit (synapse/storage/database.py:1) 40",
        f"{POOL};Thread.wait (threading.py:1);wait (threading.py:2) 60",
        f"{CHECKS};DatabasePool.new_transaction (synapse/storage/database.py:833);other_txn (o.py:1) 999",
        "",
    ]
)


def _run(tmp_path: Path, *args: str) -> str:
    raw = tmp_path / "rec.txt"
    raw.write_text(RECORDING)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(raw), *args], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def test_areas(tmp_path: Path) -> None:
    out = _run(tmp_path, "--areas", "--detail", "auth chains fetched")
    lines = [line.split() for line in out.splitlines()]
    assert out.splitlines()[0] == "reactor thread, 13.5 s"
    seconds = {" ".join(parts[2:]): float(parts[0]) for parts in lines[1:] if len(parts) > 2 and parts[1] == "s"}
    assert seconds["staged runs"] == 2.0
    assert seconds["auth chains fetched"] == 1.0
    assert seconds["idle"] == 10.0
    assert seconds["other"] == 0.5
    assert "make_event_from_json (synapse/events/__init__.py)" in out
    assert "same_json" not in out.split('"auth chains fetched" by self time:')[1]


def test_transactions(tmp_path: Path) -> None:
    out = _run(tmp_path, "--transactions")
    assert out.splitlines()[0] == "database threads, 5.0 s"
    assert "3.0 s  persist_outliers_txn" in out
    assert "0.8 s  (commits)" in out
    assert "1.2 s  (idle)" in out
    assert "other_txn" not in out
