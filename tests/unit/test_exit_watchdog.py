"""The exit watchdog (tests/harness/watchdog.py, armed by tests/conftest.py):
a pytest run whose tests are done but whose process does not exit (here: a
reactor shutdown trigger that never finishes, as a HomeServer's could) is
reported and ended with the session's own exit status, instead of running
into scripts/test's timeout with nothing said."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.harness.watchdog import EXIT_HANG_BANNER

ROOT = Path(__file__).resolve().parents[2]

HANGING = textwrap.dedent(
    """
    import pytest_twisted
    from twisted.internet import defer, reactor

    OUTCOME = {outcome!r}

    @pytest_twisted.ensureDeferred
    async def test_leaves_a_shutdown_trigger_that_never_finishes():
        reactor.addSystemEventTrigger("before", "shutdown", defer.Deferred)
        assert OUTCOME == "pass"
    """
)


def _run_pytest(tmp_path: Path, name: str, source: str) -> tuple[int, str]:
    """Run pytest on one test file of `source` with this project's conftest
    and ini, the exit watchdog's grace cut to 3 s; its status and output. A
    run the watchdog does not end fails here with subprocess's timeout."""
    test_file = tmp_path / name
    test_file.write_text(source)
    env = {**os.environ, "FASTJOIN_EXIT_GRACE": "3", "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_ADDOPTS", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(test_file), "-p", "tests.conftest", "-p", "no:cacheprovider",
         "--rootdir", str(ROOT), "-c", str(ROOT / "setup.cfg")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("outcome, status", [("pass", 0), ("fail", 1)])
def test_a_hang_at_exit_is_reported_and_ended_with_the_sessions_status(
    tmp_path: Path, outcome: str, status: int
) -> None:
    returncode, output = _run_pytest(tmp_path, "test_hang.py", HANGING.format(outcome=outcome))
    assert returncode == status, output
    assert EXIT_HANG_BANNER in output, output
    # The report names what the reactor waits for and where the threads are.
    assert "shutdown phase 'BEFORE'" in output, output
    assert "before (called, its Deferred may be what waits): <class 'twisted.internet.defer.Deferred'>" in output, output
    assert "every thread's stack:" in output and "Thread 0x" in output, output


def test_a_clean_exit_is_not_reported(tmp_path: Path) -> None:
    returncode, output = _run_pytest(tmp_path, "test_clean.py", "def test_nothing():\n    pass\n")
    assert returncode == 0, output
    assert EXIT_HANG_BANNER not in output, output
