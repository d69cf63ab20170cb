"""The demo's report: what the pipeline stored, read back from ClickHouse with SQL.

Runs through a sink's ``query`` so that, with an embedded store, the reader is
the process that owns it. Numbers print through stratoscope/units.py, as
``stratoscope query`` prints them (a p99 reads ``896 ms``, not ``896,376,998``).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stratoscope.histogram import histogram_quantile
from stratoscope.regional.sinks.clickhouse import folded_stacks_sql
from stratoscope.units import format_value

Query = Callable[[str, dict[str, Any] | None], Awaitable[list[tuple]]]

SECTIONS = ("syscalls", "runqueue", "tcp", "block", "process", "stacks")


def _q(buckets: dict[int, int], zero: int, q: float) -> float:
    """Log-linear estimate inside the bucket; 0 for an empty histogram (the report shows numbers)."""
    value = histogram_quantile(q, list(buckets), list(buckets.values()), int(zero), "loglinear")
    return 0.0 if math.isnan(value) else value


async def collect(query: Query, since_s: int) -> dict[str, list[tuple]]:
    """Rows for every section of the report, for windows starting at or after since_s."""
    p = {"since": since_s}
    since = "ts >= toDateTime({since:Int64}, 'UTC')"
    out: dict[str, list[tuple]] = {}

    counts = await query(f"""
        SELECT labels['syscall'] AS syscall, sum(value) AS calls
        FROM metrics WHERE metric = 'syscalls_total' AND node != '' AND {since}
        GROUP BY syscall ORDER BY calls DESC LIMIT 10""", p)
    lat = await query(f"""
        SELECT labels['syscall'] AS syscall, sumMap(bucket_index, bucket_count), sum(zero_count)
        FROM histograms WHERE metric = 'syscall_latency' AND node != '' AND {since}
        GROUP BY syscall""", p)
    by_sc = {r[0]: (dict(zip(r[1][0], r[1][1], strict=True)), r[2]) for r in lat}
    out["syscalls"] = [
        (sc, n, _q(*by_sc.get(sc, ({}, 0)), 0.99)) for sc, n in counts
    ]
    rq = await query(f"""
        SELECT sumMap(bucket_index, bucket_count), sum(zero_count), sum(count)
        FROM histograms WHERE metric = 'sched_runqueue_latency' AND node != '' AND {since}""", p)
    out["runqueue"] = [
        (int(r[2]), _q(dict(zip(r[0][0], r[0][1], strict=True)), r[1], 0.5),
         _q(dict(zip(r[0][0], r[0][1], strict=True)), r[1], 0.99))
        for r in rq if r[2]
    ]
    out["tcp"] = [tuple(r) for r in await query(f"""
        SELECT metric, sum(value) FROM metrics
        WHERE metric IN ('tcp_opens_total', 'tcp_closes_total', 'tcp_retransmits_total',
                         'tcp_resets_sent_total', 'tcp_resets_received_total')
          AND node != '' AND {since}
        GROUP BY metric ORDER BY metric""", p)]
    blk = await query(f"""
        SELECT labels['device'] AS device, labels['op'] AS op, sum(count),
               sumMap(bucket_index, bucket_count), sum(zero_count)
        FROM histograms WHERE metric = 'block_latency' AND node != '' AND {since}
        GROUP BY device, op ORDER BY sum(count) DESC LIMIT 10""", p)
    out["block"] = [
        (d, o, int(n), _q(dict(zip(b[0], b[1], strict=True)), z, 0.99)) for d, o, n, b, z in blk
    ]
    out["process"] = [tuple(r) for r in await query(f"""
        SELECT labels['comm'] AS comm, sum(value) AS execs
        FROM metrics WHERE metric = 'process_events_total' AND labels['event'] = 'exec'
          AND node != '' AND {since}
        GROUP BY comm ORDER BY execs DESC LIMIT 10""", p)]
    sql, params = folded_stacks_sql(start=since_s)
    sql = sql.replace("{db}.", "")
    out["stacks"] = [tuple(r) for r in (await query(sql, params))[:10]]
    return out


#: Units of each section's columns (stratoscope/units.py): durations print as ns/µs/ms/s.
COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "syscalls": (("syscall", "text"), ("calls", "count"), ("p99", "ns")),
    "runqueue": (("samples", "count"), ("p50", "ns"), ("p99", "ns")),
    "tcp": (("metric", "text"), ("total", "count")),
    "block": (("device", "text"), ("op", "text"), ("requests", "count"), ("p99", "ns")),
    "process": (("comm", "text"), ("execs", "count")),
    "stacks": (("stack", "text"), ("samples", "count")),
}
TITLES = {
    "syscalls": "Top syscalls (SQL over ClickHouse)",
    "runqueue": "Run-queue latency",
    "tcp": "TCP",
    "block": "Block I/O",
    "process": "Process execs",
    "stacks": "Hottest stacks (folded, root→leaf)",
}


def render(sections: dict[str, list[tuple]], console: Console | None = None) -> None:
    c = console or Console()
    for name in SECTIONS:
        rows = sections[name]
        if name == "stacks":
            rows = [(s if len(s) < 110 else "…" + s[-109:], n) for s, n in rows]
        t = Table(title=TITLES[name])
        for col, unit in COLUMNS[name]:
            t.add_column(col, justify="left" if unit == "text" else "right")
        for r in rows:
            t.add_row(*[escape(format_value(v, unit)) for v, (_, unit) in zip(r, COLUMNS[name], strict=True)])
        c.print(t)
