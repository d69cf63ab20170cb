#!/usr/bin/env python3
"""What the cluster path's Distributed hop costs the ClickHouse sink, on one embedded node.

Why: with ``clickhouse.cluster`` set the sink inserts into Distributed tables in the
foreground (docs/CLICKHOUSE.md); every insert is split by the sharding key and passed
to the local tables. This measures that hop alone, against the one-server path, in the
same chdb process: a one-shard cluster ``one`` (tests/integration/one_node_cluster.py:
the cluster rendering with ON CLUSTER dropped and Replicated engines made plain). No
network and no replication are included, so it is a lower bound of a real cluster's
insert cost, and the ratio is what matters.

It builds ``--minutes`` windows of ``--nodes`` simulated nodes from the recorded batches
(chdb_storage.frames), delivers each window through a one-server sink and a cluster
sink (alternating which goes first), and prints the wall time and process CPU of the
deliveries of each, and their ratio.

    .venv/bin/python loadtest/cluster_insert.py --minutes 6 --nodes 250
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


async def run(minutes: int, nodes: int, workdir: str) -> dict[str, Any]:
    import chdb
    import clickhouse_connect
    from chdb_storage import cpu_s, frames

    from stratoscope.regional.frame import blocks_of
    from stratoscope.regional.sinks.clickhouse import ClickHouseSink, apply_migrations
    from tests.integration.one_node_cluster import CONFIG, OneNode

    store = Path(workdir) / "store"
    (Path(workdir) / "config.xml").write_text(CONFIG)
    engine = chdb.connect(f"file:{store}?config-file={Path(workdir) / 'config.xml'}")
    client = clickhouse_connect.get_client(dsn=f"chdb://{store}")
    apply_migrations(client, "single")
    apply_migrations(OneNode(client), "clus", cluster="one")
    windows = frames(minutes, nodes, 250)
    sinks = {"single": ClickHouseSink(f"chdb://{store}", database="single", migrate=False),
             "cluster": ClickHouseSink(f"chdb://{store}", database="clus", migrate=False, cluster="one")}
    spent = {k: [0.0, 0.0] for k in sinks}
    for s in sinks.values():
        await s.start()
    for k, window in enumerate(windows):
        blocks = [b for f in window for b in blocks_of(f)]
        order = list(sinks) if k % 2 == 0 else list(reversed(sinks))
        for name in order:
            c0, t0 = cpu_s(), time.perf_counter()
            await sinks[name].deliver(blocks)
            spent[name][0] += time.perf_counter() - t0
            spent[name][1] += cpu_s() - c0
    rows = {name: client.query(f"SELECT count() FROM {db}.metric_points").result_rows[0][0]
            for name, db in (("single", "single"), ("cluster", "clus"))}
    for s in sinks.values():
        await s.stop()
    client.close()
    engine.close()
    return {"windows": len(windows), "nodes": nodes, "rows": rows, "spent": spent}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=int, default=6)
    ap.add_argument("--nodes", type=int, default=250)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cluster-insert-") as d:
        r = asyncio.run(run(args.minutes, args.nodes, d))
    s, c = r["spent"]["single"], r["spent"]["cluster"]
    print(f"{r['windows']} windows x {r['nodes']} nodes; metric_points rows: one server "
          f"{r['rows']['single']}, cluster {r['rows']['cluster']}")
    print(f"one server: {s[0]:.2f} s wall, {s[1]:.2f} s CPU")
    print(f"cluster:    {c[0]:.2f} s wall, {c[1]:.2f} s CPU")
    print(f"cluster / one server: wall x{c[0] / s[0]:.2f}, CPU x{c[1] / s[1]:.2f}", flush=True)
    os._exit(0)  # the embedded engine's threads need not wind down


if __name__ == "__main__":
    raise SystemExit(main())
