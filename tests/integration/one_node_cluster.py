"""The cluster rendering on one embedded node: run as ``python -m`` by test_clickhouse_schema.

chdb reads a configuration file once per process, when the first store opens, so this
runs in a process of its own: the store is opened with a configuration naming a
one-shard cluster ``one`` whose only replica is this node. chdb then runs Distributed
tables for real (an insert is split by the sharding key and written to the local
tables; a SELECT reads them through the cluster), but it cannot do the two parts that
need a server: ``ON CLUSTER`` (no distributed DDL worker) and Replicated tables (no
Keeper session: they stay read-only). Each migration statement goes through
``OneNode``, which drops ``ON CLUSTER`` and makes Replicated engines plain; everything
else, the Distributed tables included, is the cluster rendering as it ships.

The regional's ClickHouse sink then runs with ``cluster="one"`` against it, beside a
sink on a one-server database fed the same blocks, and the program prints what the
test asserts as JSON on its last line.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

CONFIG = """<clickhouse>
  <tcp_port>9000</tcp_port>
  <macros><cluster>one</cluster></macros>
  <remote_servers>
    <one><shard><internal_replication>true</internal_replication>
      <replica><host>localhost</host><port>9000</port></replica></shard></one>
  </remote_servers>
</clickhouse>
"""

_REPLICATED = re.compile(r"ENGINE = Replicated(\w*MergeTree)\('[^']*', '\{replica\}'(?:, (\w+))?\)")


def one_node(sql: str) -> str:
    """``sql`` without what needs a server: ON CLUSTER, Keeper-backed engines."""
    sql = sql.replace(" ON CLUSTER 'one'", "")
    sql = _REPLICATED.sub(lambda m: f"ENGINE = {m.group(1)}({m.group(2) or ''})", sql)
    return sql.replace("replicated_deduplication_window = 10000, "
                       "replicated_deduplication_window_seconds = 604800",
                       "non_replicated_deduplication_window = 10000")


class OneNode:
    """A real chdb client whose DDL is made single-node by ``one_node``."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.commands: list[str] = []

    def command(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        self.commands.append(sql)
        return self.client.command(one_node(sql), *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def spy(sink: Any, seen: list[tuple[str, Any, bool]]) -> None:
    """Record the table and settings of each insert the sink's real client makes."""
    client = sink._client
    real = client.insert_arrow

    def insert_arrow(table: str, data: Any, **kwargs: Any) -> Any:
        settings = kwargs.get("settings") or {}
        seen.append((table, settings.get("distributed_foreground_insert"),
                     "insert_deduplication_token" in settings))
        return real(table, data, **kwargs)

    client.insert_arrow = insert_arrow


async def main(store: Path) -> dict[str, Any]:
    import chdb
    import clickhouse_connect

    from stratoscope.regional.sinks.clickhouse import ClickHouseSink, apply_migrations
    from stratoscope.regional.sinks.clickhouse_retention import Retention, apply_retention
    from tests.integration.test_clickhouse_sink import node_block, rollup_block, snapshot

    (store.parent / "config.xml").write_text(CONFIG)
    engine = chdb.connect(f"file:{store}?config-file={store.parent / 'config.xml'}")
    client = clickhouse_connect.get_client(dsn=f"chdb://{store}")  # shares the engine
    out: dict[str, Any] = {}
    adapter = OneNode(client)
    out["applied"] = apply_migrations(adapter, "clus", cluster="one")
    out["on_cluster"] = sum("ON CLUSTER 'one'" in c for c in adapter.commands)
    out["commands"] = len(adapter.commands)
    out["engines"] = dict(client.query(
        "SELECT name, engine FROM system.tables WHERE database = 'clus'").result_rows)
    out["clusters"] = client.query("SELECT cluster, shard_num, is_local FROM system.clusters"
                                   " WHERE cluster = 'one'").result_rows

    blocks = [node_block("r1", node="n1"), node_block("r1", node="n2", scale=3), rollup_block("r1")]
    clustered = ClickHouseSink(f"chdb://{store}", database="clus", migrate=False, cluster="one")
    single = ClickHouseSink(f"chdb://{store}", database="single")
    inserts: dict[str, list[tuple[str, Any, bool]]] = {"clustered": [], "single": []}
    for key, sink in (("clustered", clustered), ("single", single)):
        await sink.start()
        await sink.health_check()
        spy(sink, inserts[key])
        await sink.deliver(blocks)
    out["inserts"] = inserts
    out["local_rows"] = client.query("SELECT count() FROM clus.metric_points_local").result_rows[0][0]
    out["first"] = await snapshot(clustered)
    out["single"] = await snapshot(single)
    for sink in (clustered, single):
        await sink.stop()
    # a new sink (a restarted regional: nothing remembered in the process) delivers the
    # same blocks again: the token reaches the local tables through the Distributed ones
    again = ClickHouseSink(f"chdb://{store}", database="clus", migrate=False, cluster="one")
    await again.start()
    await again.deliver(blocks)
    out["again"] = await snapshot(again)
    await again.stop()
    for name in ("nope", "{cluster}"):  # not in remote_servers; the macro names 'one'
        try:
            probe = ClickHouseSink(f"chdb://{store}", database="clus", migrate=False, cluster=name)
            await probe.start()
            await probe.stop()
            out[f"start:{name}"] = "started"
        except Exception as exc:
            out[f"start:{name}"] = f"{type(exc).__name__}: {exc}"
    out["retention"] = apply_retention(adapter, "clus", Retention(events=9), "one", allow_shrink=True)
    out["events_local_ttl"] = client.query(
        "SELECT create_table_query FROM system.tables WHERE database = 'clus'"
        " AND name = 'events_local'").result_rows[0][0].split(" TTL ", 1)[1]
    out["retention_again"] = apply_retention(adapter, "clus", Retention(events=9), "one", allow_shrink=True)
    client.close()
    engine.close()
    return out


if __name__ == "__main__":
    result = asyncio.run(main(Path(sys.argv[1])))
    print(json.dumps(result, default=repr), flush=True)
    os._exit(0)  # the embedded engine's threads need not wind down
