"""storage/keys.py on Synapse's schema, SQLite and PostgreSQL: which servers'
keys the store holds already (the key prefetch skips them)."""

from synapse.storage.database import LoggingTransaction
from synapse.storage.engines import PostgresEngine

from synapse_fastjoin.storage.keys import servers_with_keys_valid_until_txn
from tests.unit.test_device_list_queries import full_scans, plan
from tests.unit.test_storage import Database, database  # noqa: F401 (fixture)

NOW = 1_800_000_000_000


def test_servers_with_keys_valid_until(database: Database) -> None:  # noqa: F811
    # (Synapse hands key_json to PostgreSQL as a memoryview.)
    blob: object = memoryview(b"{}") if isinstance(database.engine, PostgresEngine) else b"{}"

    def populate(txn: LoggingTransaction) -> None:
        txn.execute_batch(
            "INSERT INTO server_keys_json (server_name, key_id, from_server, ts_added_ms,"
            " ts_valid_until_ms, key_json) VALUES (?, ?, ?, 0, ?, ?)",
            [
                # s0..s599: fresh keys from two notaries; every 3rd expired.
                (f"s{i}.test", "ed25519:a", notary, NOW - 1 if i % 3 == 0 else NOW + 10**6, blob)
                for i in range(600)
                for notary in ("n1.test", "n2.test")
            ]
            # s1000: an expired key and a fresh one.
            + [("s1000.test", "ed25519:old", "n1.test", NOW - 10, blob),
               ("s1000.test", "ed25519:new", "n1.test", NOW + 10, blob)],
        )

    database.run_sync("populate", populate)
    asked = {f"s{i}.test" for i in range(0, 1200, 2)} | {"s1000.test", "nowhere.test"}

    def query(txn: LoggingTransaction) -> set[str]:
        return servers_with_keys_valid_until_txn(txn, asked, NOW)

    found = database.run_sync("query", query)
    assert found == {f"s{i}.test" for i in range(0, 600, 2) if i % 3 != 0} | {"s1000.test"}

    sql = (
        "SELECT DISTINCT server_name FROM server_keys_json"
        f" WHERE server_name IN ({','.join('?' * 3)}) AND ts_valid_until_ms >= ?"
    )
    lines = plan(database, sql, ("s2.test", "s4.test", "s1000.test", NOW))
    assert not full_scans(lines, ("server_keys_json",)), lines
