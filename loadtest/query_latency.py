#!/usr/bin/env python3
"""How long each cookbook query takes on a fleet-sized store, read directly and through
the regional's read endpoint.

Builds ``--minutes`` windows of ``--nodes`` simulated nodes (the recorded batches of the
throughput benchmark, reduced by the regional's merge as chdb_storage.py does) into a
fresh embedded store, then times every query of deploy/clickhouse/queries over the
whole fleet (no --node), ``--runs`` times after one warm-up run:

* direct: this process's clickhouse-connect client on the store (``--clickhouse chdb://``);
* endpoint: ``stratoscope regional`` on the same store, its read endpoint over HTTP (what
  ``stratoscope query`` uses while a regional runs): HTTP, JSON and the hop to the sink
  process on top of the same SQL.

The store's background merges finish before any timing. Prints rows, the median of
each and their ratio, measured in this run.

    .venv/bin/python loadtest/query_latency.py --nodes 100 --minutes 10
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

EXTRA = {"latency_quantiles": {"metric": "syscall_latency", "label": "syscall"},
         "counter_per_hour": {"metric": "syscalls_total", "label": "syscall"}}


def fill(store: str, minutes: int, nodes: int) -> int:
    """The windows into a fresh store at ``store`` (in a child process: chdb lets one
    process hold a directory); metric + histogram rows stored."""
    from chdb_storage import frames

    from stratoscope.regional.sinks.clickhouse import (
        TARGET,
        apply_migrations,
        concat_frames,
        connect,
        dedup_token,
    )
    from stratoscope.regional.sinks.clickhouse_arrow import INSERT_ORDER, arrow_tables

    client = connect(f"chdb://{store}")
    apply_migrations(client, "stratoscope")
    rows = 0
    for k, window in enumerate(frames(minutes, nodes, 250)):
        tables = concat_frames([arrow_tables(f, list(range(len(f.parts)))).tables for f in window])
        ids = [p.block_id for f in window for p in f.parts]
        for name in INSERT_ORDER:
            table = tables.get(name)
            if table is None:
                continue
            client.insert_arrow(TARGET.get(name, name), table, database="stratoscope", settings={
                "insert_deduplication_token": f"{k}:" + dedup_token(name, ids), "insert_deduplicate": 1,
                "deduplicate_blocks_in_dependent_materialized_views": 1, "optimize_on_insert": 0})
            if name in ("metric_points", "histogram_points"):
                rows += table.num_rows
    quiet = time.monotonic()  # background merges done: both ways read the same parts
    while time.monotonic() - quiet < 5:
        if int(client.command("SELECT count() FROM system.merges")):
            quiet = time.monotonic()
        time.sleep(0.2)
    client.close()
    return rows


def values(name: str) -> dict[str, Any]:
    now = int(time.time())
    return {"start": now - 3 * 3600, "end": now + 1, **EXTRA.get(name, {})}


def time_direct(store: str, runs: int) -> dict[str, tuple[int, float]]:
    """(rows, median seconds) of each query read in this process."""
    import asyncio

    from stratoscope.query.cookbook import cookbook, run
    from stratoscope.regional.sinks.clickhouse import ClickHouseSink

    async def go() -> dict[str, tuple[int, float]]:
        sink = ClickHouseSink(f"chdb://{store}", migrate=False)
        await sink.start()
        out = {}
        try:
            for name, q in cookbook().items():
                times, n = [], 0
                for i in range(runs + 1):
                    t0 = time.perf_counter()
                    r = await run(sink.query, q, values(name), max_rows=100_000, timeout_s=120)
                    if i:
                        times.append(time.perf_counter() - t0)
                    n = len(r.rows)
                out[name] = (n, statistics.median(times))
        finally:
            await sink.stop()
        return out

    return asyncio.run(go())


def _in_child(fn: Any, *args: Any) -> Any:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def time_endpoint(store: str, runs: int, names: list[str]) -> dict[str, tuple[int, float]]:
    qport, ingest = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stratoscope.cli", "regional", "--insecure", "--clickhouse", f"chdb://{store}",
         "--listen", f"127.0.0.1:{ingest}", "--metrics-port", "0", "--query-listen", f"127.0.0.1:{qport}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{qport}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/queries", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the regional's read endpoint did not come up") from None
                time.sleep(0.3)
        out = {}
        for name in names:
            qs = "&".join(f"{k}={v}" for k, v in values(name).items())
            times, n = [], 0
            for i in range(runs + 1):
                t0 = time.perf_counter()
                body = json.loads(urllib.request.urlopen(f"{url}/query/{name}?{qs}", timeout=180).read())
                if i:
                    times.append(time.perf_counter() - t0)
                n = len(body["rows"])
            out[name] = (n, statistics.median(times))
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--minutes", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="query-latency-")
    store = os.path.join(d, "ch")
    try:
        t0 = time.perf_counter()
        rows = _in_child(fill, store, args.minutes, args.nodes)
        print(f"store: {args.minutes} windows x {args.nodes} nodes, {rows:,} metric+histogram rows "
              f"(built in {time.perf_counter() - t0:.0f} s)")
        direct = _in_child(time_direct, store, args.runs)
        endpoint = time_endpoint(store, args.runs, list(direct))
        print(f"{'query':24} {'rows':>7} {'direct ms':>10} {'endpoint ms':>12} {'ratio':>6}")
        for name, (n, t) in direct.items():
            n2, t2 = endpoint[name]
            flag = "" if n == n2 else f"  (endpoint rows {n2})"
            print(f"{name:24} {n:7,} {t * 1e3:10.1f} {t2 * 1e3:12.1f} {t2 / t:6.2f}{flag}")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
