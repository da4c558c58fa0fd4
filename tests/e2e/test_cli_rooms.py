"""`synapse-fastjoin rooms ...` against a real patched Synapse holding a room
in partial state (the fake resident holds its /state answer)."""

import json
import os
import re

import pytest_twisted
from twisted.internet import utils

from tests.e2e.test_admin_control import history, join, no_partial_rows
from tests.e2e.test_resync_bad_input import STATE, TIMEOUT, assert_complete, start_resident
from tests.harness.client import poll_until, sleep
from tests.harness.synapse import venv_python


async def run_cli(j, *args: str, token: str | None = "") -> tuple[int, str, str]:
    """Run the CLI of the patched environment without blocking the reactor
    (the fake resident runs on it); returns (exit status, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNAPSE_")}
    env["SYNAPSE_URL"] = j.joiner.client_url
    if token is not None:
        env["SYNAPSE_ADMIN_TOKEN"] = token or j.client.access_token
    out, err, code = await utils.getProcessOutputAndValue(
        str(venv_python("patched")), ["-m", "synapse_fastjoin.cli", "rooms", *args], env=env
    )
    return code, out.decode(), err.decode()


@pytest_twisted.ensureDeferred
async def test_list_show_retry_and_watch_until_the_end(synapse_factory, tls_files, tmp_path):
    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.hold(STATE)
        j = await join(synapse_factory, resident)
        await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT, description="/state held")

        code, out, err = await run_cli(j, "list")
        assert code == 0, err
        header, row, total = out.strip().splitlines()
        assert header.split()[:3] == ["ROOM", "STATUS", "PHASE"]
        assert row.split()[:3] == [j.room_id, "resyncing", "fetching_state"]
        assert total == "1 room in partial state"

        code, out, err = await run_cli(j, "show", j.room_id, "--json")
        assert code == 0, err
        shown = json.loads(out)
        assert shown["room_id"] == j.room_id and shown["resync"]["running"] is True
        code, out, _ = await run_cli(j, "show", j.room_id)
        assert f"room:              {j.room_id}" in out and "fetching_state" in out

        code, _, err = await run_cli(j, "retry", j.room_id, "--via", "not a server!")
        assert code == 1 and "M_INVALID_PARAM" in err
        code, out, err = await run_cli(j, "retry", j.room_id, "--via", resident.server_name)
        assert code == 0, err
        assert out.strip() == (
            f"{j.room_id}: the resync is running: it goes on, asking {resident.server_name} first"
        )

        code, _, err = await run_cli(j, "list", token=None)
        assert code == 1 and "no access token" in err
        code, _, err = await run_cli(j, "list", token="not-a-token")
        assert code == 1 and "M_UNKNOWN_TOKEN" in err

        # Watch (not a terminal: plain lines) while the resync goes on to the end.
        watch = utils.getProcessOutputAndValue(
            str(venv_python("patched")),
            ["-m", "synapse_fastjoin.cli", "rooms", "watch", j.room_id, "--interval", "0.2"],
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("SYNAPSE_")},
                "SYNAPSE_URL": j.joiner.client_url,
                "SYNAPSE_ADMIN_TOKEN": j.client.access_token,
            },
        )
        await sleep(1.5)
        resident.release()
        out, err, code = await watch
        out = out.decode()
        assert code == 0, err
        lines = out.strip().splitlines()
        assert len(lines) >= 3, out
        assert re.match(rf"\d\d:\d\d:\d\d {re.escape(j.room_id)}  fetching_state  \d+/\d+ events", lines[0]), lines[0]
        assert re.fullmatch(
            rf"{re.escape(j.room_id)}: resync complete after \S+", lines[-1]
        ), lines[-1]
        await assert_complete(j)

        code, _, err = await run_cli(j, "show", j.room_id)
        assert code == 5 and "M_NOT_FOUND" in err
        code, out, _ = await run_cli(j, "list")
        assert (code, out.strip()) == (0, "No room is in partial state.")
        code, out, _ = await run_cli(j, "watch")
        assert (code, out.strip()) == (0, "No room is in partial state.")
    finally:
        await resident.stop()


@pytest_twisted.ensureDeferred
async def test_abort(synapse_factory, tls_files, tmp_path):
    resident = await start_resident(tls_files, tmp_path)
    try:
        resident.hold(STATE)
        j = await join(synapse_factory, resident)
        await poll_until(lambda: resident.held_count() >= 1, timeout=TIMEOUT, description="/state held")
        code, out, err = await run_cli(j, "abort", j.room_id)
        assert code == 0, err
        assert out.strip() == (
            f"{j.room_id}: resync aborted; 1 local users left the room, 0 waiting requests answered"
        )
        assert no_partial_rows(j)
        assert [o for o, _ in history(j)] == ["aborted"]
        code, _, err = await run_cli(j, "abort", j.room_id)
        assert code == 5 and "M_NOT_FOUND" in err
        resident.release()
    finally:
        await resident.stop()
