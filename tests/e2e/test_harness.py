"""Smoke tests of the end-to-end harness itself, on stock Synapse.

They prove the pieces every other e2e test relies on: two real homeservers
federate over loopback TLS on each selected database backend, the client
helpers work, the servers' databases can be inspected, pause/resume/restart
behave, and a bad ``homeserver.yaml`` makes ``start(expect_failure=True)``
report Synapse's refusal.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from tests.harness.client import ClientAPI, RequestTimeout, poll_until
from tests.harness.synapse import SynapseFactory

pytestmark = pytest.mark.e2e


@pytest_twisted.ensureDeferred
async def test_two_stock_servers_federate(
    synapse_factory: SynapseFactory, db_backend: str
) -> None:
    """User B on server 2 joins A's public room on server 1 and sees A's message."""
    hs1 = synapse_factory("stock", db=db_backend, name="hs1")
    hs2 = synapse_factory("stock", db=db_backend, name="hs2")
    assert hs1.db_backend == hs2.db_backend == db_backend

    alice_id, alice_token = hs1.register_user("alice")
    bob_id, bob_token = hs2.register_user("bob")
    assert alice_id == f"@alice:{hs1.server_name}"
    alice = ClientAPI(hs1.client_url, alice_token)
    bob = hs2.client(bob_token)
    assert await bob.whoami() == bob_id

    room_id = await alice.create_room(preset="public_chat", name="harness smoke")

    # The raw form of a federated join, exactly as a client sends it.
    status, body = await bob.post(
        f"/_matrix/client/v3/join/{room_id}?server_name={hs1.server_name}", {}, timeout=60
    )
    assert status == 200, body
    assert body["room_id"] == room_id

    # Server 1 sees the remote join.
    joined = await poll_until(
        lambda: _joined(alice, room_id, bob_id), timeout=30, description="bob joined on hs1"
    )
    assert alice_id in joined

    text = "hello over loopback federation"
    event_id = await alice.send_message(room_id, text)

    async def bob_sees_message() -> dict[str, Any] | None:
        response = await bob.messages(room_id, limit=20, timeout=10)
        for event in response["chunk"]:
            if event.get("event_id") == event_id:
                return event
        return None

    event = await poll_until(bob_sees_message, timeout=30, description="message on hs2")
    assert event["content"]["body"] == text
    assert event["sender"] == alice_id

    sync = await bob.sync(timeout=0)
    assert room_id in sync["rooms"]["join"]

    # The test can open the server's real database.
    conn = hs2.database.connect()
    try:
        cur = conn.cursor()
        cur.execute(
            f"SELECT room_id FROM rooms WHERE room_id = {hs2.database.placeholder}",
            (room_id,),
        )
        assert cur.fetchall() == [(room_id,)]
    finally:
        conn.close()

    # Both servers log to their own homeserver.log.
    assert "Synapse now listening" in hs1.read_log()
    assert "Synapse now listening" in hs2.read_log()


async def _joined(api: ClientAPI, room_id: str, user_id: str) -> dict[str, Any] | None:
    """``joined_members`` of ``room_id`` if ``user_id`` is in it, else ``None``."""
    members = await api.joined_members(room_id, timeout=10)
    return members if user_id in members else None


@pytest_twisted.ensureDeferred
async def test_pause_resume_restart(synapse_factory: SynapseFactory, db_backend: str) -> None:
    """A paused server answers nothing (bounded by the timeout); restart keeps data."""
    hs = synapse_factory("stock")
    assert hs.db_backend == db_backend
    user_id, token = hs.register_user("carol", admin=True)
    api = hs.client(token)
    room_id = await api.create_room()

    hs.pause()
    assert hs.is_paused
    with pytest.raises(RequestTimeout):
        await api.get("/_matrix/client/v3/account/whoami", timeout=1)
    hs.resume()
    assert await api.whoami() == user_id

    pid = hs.pid
    hs.restart()
    assert hs.pid != pid
    assert hs.start_count == 2
    assert await api.whoami() == user_id
    state = await api.state(room_id)
    assert any(e["type"] == "m.room.create" for e in state)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        # Stock Synapse dies with a traceback while loading the module list.
        ({"modules": [{"module": "does.not.exist"}]}, "No module named 'does'"),
        # A ConfigError is reported as "Error in configuration".
        ({"database": {"name": "nosuchdb"}}, "Unsupported database type 'nosuchdb'"),
    ],
    ids=["unknown-module", "unknown-database"],
)
def test_bad_config_fails_to_start(
    synapse_factory: SynapseFactory, config: dict[str, Any], expected: str
) -> None:
    """Synapse refuses a bad homeserver.yaml: non-zero exit plus the reason."""
    hs = synapse_factory("stock", config=config, start=False)
    result = hs.start(expect_failure=True, timeout=60)
    assert result.returncode != 0
    assert expected in result.stderr, result.output
    assert not hs.is_running
