"""The fake resident's generated rooms are valid Matrix rooms: a real, stock
Synapse joins one (verifying every signature and hash, with the fake as its
trusted key server) and ends up with exactly the generated member list."""

import pytest
import pytest_twisted

from tests.harness.fakehs.keys import KEY_ID, verify_key_base64
from tests.harness.fakehs.room import RoomSpec, load_or_generate
from tests.harness.fakehs.server import FakeResident


def trusting(resident: FakeResident) -> dict:
    """homeserver.yaml settings that make a server use `resident` as its notary."""
    return {
        "trusted_key_servers": [
            {
                "server_name": resident.server_name,
                "verify_keys": {KEY_ID: verify_key_base64(resident.server_name)},
            }
        ]
    }


@pytest.mark.parametrize(
    "spec",
    [
        RoomSpec(members=300, servers=25, history=10, room_version="10"),
        RoomSpec(members=120, servers=7, history=6, room_version="11", named=False),
        RoomSpec(members=300, servers=25, history=10, room_version="12"),
        RoomSpec(members=120, servers=7, history=6, room_version="12", named=False),
    ],
    ids=["v10-named", "v11-nameless", "v12-named", "v12-nameless"],
)
@pytest.mark.parametrize("full_join_only", [False, True], ids=["partial", "full"])
@pytest_twisted.ensureDeferred
async def test_stock_synapse_joins_a_generated_room_and_sees_every_member(
    synapse_factory, tls_files, tmp_path, spec, full_join_only
):
    room = load_or_generate(spec, tmp_path / "rooms")
    resident = FakeResident(room, tls_files, full_join_only=full_join_only)
    resident.start()
    try:
        joiner = synapse_factory(variant="stock", config=trusting(resident))
        user_id, token = joiner.register_user("joiner")
        client = joiner.client(token)
        await client.join(room.room_id, server_name=resident.server_name, timeout=120)

        members = await client.members(room.room_id, timeout=120)
        joined = sorted(m["state_key"] for m in members if m["content"]["membership"] == "join")
        assert joined == sorted(room.joined_members())
        assert user_id in joined
        assert len(joined) == spec.members + spec.moderators + 1 + 1 + 1  # + creator, resident, joiner

        stats = resident.stats()
        assert stats["unknown_routes"] == []
        if full_join_only:
            assert "state_ids" not in stats["requests"]
        else:
            assert stats["requests"].get("state_ids", 0) + stats["requests"].get("state", 0) >= 1
    finally:
        await resident.stop()
