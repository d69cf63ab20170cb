"""A process that owns an embedded ClickHouse store, for tests of a store killed mid-insert.

``deliver-and-die DIR``: store three windows' blocks through ClickHouseSink, then
SIGKILL itself (the engine dies holding the directory, its ``status`` file left behind).
``replay DIR [--no-repair]``: start a sink on the same store, deliver the same blocks
again (what the regional's write-ahead log replays after a crash) and print the totals
as JSON. ``--no-repair`` marks the store as already opened in this process, so the
sink skips its repair: the run that shows what the repair is for.

A process of its own because chdb hosts one engine per process and the test process
holds another store.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

from stratoscope.edge.batch import BatchBuilder
from stratoscope.edge.decode import Histogram
from stratoscope.regional.frame import Block
from stratoscope.regional.sinks import clickhouse
from stratoscope.regional.sinks.clickhouse import ClickHouseSink
from tests.frames import merged_blocks

NS = 1_000_000_000
DB = "stratoscope"
#: Three windows two hours ago (inside every TTL), each stored by inserts of its own.
HOUR = (int(time.time()) // 3600 - 2) * 3600
WINDOWS = (HOUR, HOUR + 60, HOUR + 120)
#: What the store must hold once every window is stored once.
EXPECTED = {"read_calls": 100 * len(WINDOWS), "latency_count": 7 * len(WINDOWS),
            "hourly_latency_count": 7 * len(WINDOWS), "hourly_read_calls": 100 * len(WINDOWS)}


def blocks() -> list[Block]:
    out: list[Block] = []
    for i, start in enumerate(WINDOWS):
        bb = BatchBuilder("n1", "boot-1", i + 1, start * NS, (start + 60) * NS, {"region": "r"})
        bb.add_counters("syscalls_total", "1", "syscalls", ["syscall"], {("read",): 100})
        bb.add_histograms("syscall_latency", "ns", "", ["syscall"], {
            ("read",): Histogram(buckets={3: 5, 5: 2}, zero=0, count=7, sum=90)})
        out += merged_blocks(bb.build(), regional_id="killed-store")
    return out


def totals(sink: ClickHouseSink) -> dict[str, int]:
    client = sink._client
    one = lambda sql: int(client.query(sql.format(db=DB)).result_rows[0][0])  # noqa: E731
    return {
        "read_calls": one("SELECT sum(value) FROM {db}.metrics WHERE metric = 'syscalls_total'"),
        "latency_count": one("SELECT sum(count) FROM {db}.histograms"),
        "hourly_latency_count": one("SELECT sum(count) FROM {db}.histograms_1h"),
        "hourly_read_calls": one("SELECT sum(value) FROM {db}.metrics_1h WHERE metric = 'syscalls_total'"),
    }


async def main(mode: str, path: str, no_repair: bool) -> None:
    if no_repair:
        clickhouse._OPENED_HERE.add(path)
    sink = ClickHouseSink(f"chdb://{path}", database=DB)
    await sink.start()
    for blk in blocks():  # one delivery per window: inserts of their own
        await sink.deliver([blk])
    if mode == "deliver-and-die":
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    print(json.dumps({"totals": totals(sink), "tokens_forgotten": sink.tokens_forgotten}))
    await sink.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], "--no-repair" in sys.argv[3:]))
