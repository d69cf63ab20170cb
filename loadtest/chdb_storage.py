#!/usr/bin/env python3
"""What embedded ClickHouse (chdb) costs per stored row, background merges included.

Results and discussion: docs/BENCHMARKS.md, "Where storage time goes".

Why: a single insert into a fresh store (what a one-off insert benchmark measures)
shows only the insert. MergeTree then merges every part again in
background threads (and the hourly roll-up tables are collapsed only by merges), on the
same cores as the regional. This script builds ``--minutes`` consecutive windows of
``--nodes`` simulated nodes each, from the same realistic batches as the throughput
benchmark (real recorded shapes, churn, a third histograms), reduces each with the
regional's own merge into one frame, and inserts the frames through the ClickHouse
sink's Arrow path into a fresh chdb store with the real schema. It prints the CPU of this
process (every chdb thread) during the inserts and until no merge has run for 3 s,
the rows stored, parts left and bytes per table.

Variants change the fresh store before the inserts (one per run, ``--variant``):
``shipped`` (as migrated), ``stop-merges`` (``SYSTEM STOP MERGES``: a lower bound,
parts pile up), ``no-hourly-views``, ``lz4`` (every ZSTD(1) codec of a plain column
replaced by LZ4), ``setting:NAME=VALUE`` (a MergeTree setting on every table), or
``sql:FILE`` (the statements of FILE, ``{db}`` replaced, e.g. another schema to compare).
``--frame-nodes F --frames-per-insert G`` split each window into frames of F nodes as the
regional does and insert G of them at a time, as the ClickHouse sink joins the frames of
one delivery: fewer, larger parts to merge.

    .venv/bin/python loadtest/chdb_storage.py --variant shipped --minutes 12 --nodes 250
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

TABLES = ("metric_points", "histogram_points", "metric_points_1h", "histogram_points_1h", "series",
          "profile_samples", "events")


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def frames(minutes: int, nodes: int, frame_nodes: int | None = None) -> list[list[Any]]:
    """Per minute, ``nodes`` nodes x 6 batches each reduced by the regional's merge into
    frames of ``frame_nodes`` nodes (default: all in one frame; the regional's hold 250)."""
    import regional_throughput as rt

    from stratoscope.regional.batchcols import decode
    from stratoscope.regional.merge import Aggregator, MergeSettings
    from stratoscope.v1 import batch_pb2 as pb

    templates = rt.build_templates(rt.load_real(rt.DATA), 24, 2000, 1 / 3, 1000, 100, 1,
                                   rt.churn_model(rt.MINUTE))
    base = (int(time.time()) // 60 - minutes - 10) * 60
    out = []
    for k in range(minutes):
        agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=5, frame_nodes=frame_nodes or nodes))
        w = base + k * 60
        for n in range(nodes):
            tpl = templates[n % len(templates)]
            for slot in range(rt.SLOTS):
                s_ns = (w + slot * 10) * rt.NS
                raw = tpl.bodies[slot] + rt.header(f"node-{n:05d}", "boot", slot + 1, s_ns, s_ns + 10 * rt.NS)
                agg.record(decode(pb.Batch.FromString(raw)))
        window: dict[int, Any] = {}
        for b in agg.flush((w + 100) * rt.NS, force=True):
            window.setdefault(id(b.frame), b.frame)
        out.append(list(window.values()))
    return out


def prepare(client: Any, variant: str) -> None:
    if variant == "stop-merges":
        client.command("SYSTEM STOP MERGES")
    elif variant == "no-hourly-views":
        for mv in ("metric_points_1h_mv", "histogram_points_1h_mv"):
            client.command(f"DROP VIEW stratoscope.{mv}")
    elif variant == "lz4":
        cols = client.query(
            "SELECT table, name, type, compression_codec FROM system.columns WHERE database = "
            "'stratoscope' AND compression_codec LIKE '%ZSTD%' AND default_kind = ''").result_rows
        for table, name, type_, codec in cols:
            client.command(f"ALTER TABLE stratoscope.{table} MODIFY COLUMN {name} {type_} "
                           f"{codec.replace('ZSTD(1)', 'LZ4')}")
    elif variant.startswith("setting:"):
        setting = variant.split(":", 1)[1]
        for table in TABLES:
            client.command(f"ALTER TABLE stratoscope.{table} MODIFY SETTING {setting}")
    elif variant.startswith("sql:"):
        from stratoscope.regional.sinks.clickhouse import split_statements
        for stmt in split_statements(Path(variant[4:]).read_text().replace("{db}", "stratoscope")):
            client.command(stmt)
    elif variant != "shipped":
        raise SystemExit(f"unknown variant {variant!r}")


def store_cost(inserts: Sequence[tuple[dict[str, Any], list[str]]], variant: str = "shipped",
               settle_timeout_s: float = 600, workdir: str | None = None) -> dict[str, Any]:
    """Insert ``(Arrow tables by name, block ids)`` sets, in order, into a fresh chdb store
    changed by ``variant``, as the ClickHouse sink does; the CPU of this process (every
    chdb thread) during the inserts and until no merge has run for 3 s, and what is left.

    Also what regional_throughput.py's parts measure. Each set's dedup tokens get its
    position as a prefix, so the same set can be inserted several times.
    """
    from stratoscope.regional.sinks.clickhouse import TARGET, apply_migrations, connect, dedup_token
    from stratoscope.regional.sinks.clickhouse_arrow import INSERT_ORDER

    d = tempfile.mkdtemp(prefix="chdb-storage-", dir=workdir)
    try:
        client = connect(f"chdb://{d}/ch")
        apply_migrations(client, "stratoscope")
        prepare(client, variant)
        rows = 0
        c0, t0 = cpu_s(), time.perf_counter()
        for k, (tables, ids) in enumerate(inserts):
            for name in INSERT_ORDER:
                table = tables.get(name)
                if table is None:
                    continue
                client.insert_arrow(TARGET.get(name, name), table, database="stratoscope", settings={
                    "insert_deduplication_token": f"{k}:" + dedup_token(name, ids), "insert_deduplicate": 1,
                    "deduplicate_blocks_in_dependent_materialized_views": 1, "optimize_on_insert": 0})
                if name in ("metric_points", "histogram_points"):
                    rows += table.num_rows
        c1, t1 = cpu_s(), time.perf_counter()
        quiet = time.monotonic()
        while time.monotonic() - quiet < 3 and time.perf_counter() - t1 < settle_timeout_s:
            if int(client.command("SELECT count() FROM system.merges")):
                quiet = time.monotonic()
            time.sleep(0.2)
        c2, t2 = cpu_s(), time.perf_counter()
        parts = int(client.command("SELECT count() FROM system.parts WHERE active AND database = 'stratoscope'"))
        events = dict(client.query("SELECT event, value FROM system.events WHERE event IN "
                                   "('Merge', 'MergedRows', 'MergedUncompressedBytes', 'InsertedRows', "
                                   "'MergeTotalMilliseconds', 'MergeHorizontalStageTotalMilliseconds', "
                                   "'MergeVerticalStageTotalMilliseconds', 'MergeProjectionStageTotalMilliseconds')"
                                   ).result_rows)
        sizes = client.query("SELECT table, sum(data_compressed_bytes), sum(rows) FROM system.parts "
                             "WHERE active AND database = 'stratoscope' GROUP BY table ORDER BY 2 DESC").result_rows
        client.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return {"rows": rows, "insert_cpu_s": c1 - c0, "insert_wall_s": t1 - t0, "after_cpu_s": c2 - c1,
            "after_wall_s": t2 - t1, "active_parts": parts, "cpu_us_per_row": 1e6 * (c2 - c0) / rows,
            "sizes": [(t, int(b), int(n)) for t, b, n in sizes],
            "events": {k: int(v) for k, v in events.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="shipped")
    ap.add_argument("--minutes", type=int, default=12, help="windows (one insert per table each)")
    ap.add_argument("--nodes", type=int, default=250,
                    help="nodes per window, inserted as one frame (the regional's frames hold 250)")
    ap.add_argument("--settle-timeout", type=float, default=600)
    ap.add_argument("--frame-nodes", type=int, default=None,
                    help="reduce each window into frames of this many nodes (default: one frame)")
    ap.add_argument("--frames-per-insert", type=int, default=1,
                    help="frames joined into one insert per table, as the ClickHouse sink joins "
                         "the frames of one delivery (default 1)")
    args = ap.parse_args()

    from stratoscope.regional.sinks.clickhouse import concat_frames
    from stratoscope.regional.sinks.clickhouse_arrow import arrow_tables

    inserts = []
    for window in frames(args.minutes, args.nodes, args.frame_nodes):
        for i in range(0, len(window), args.frames_per_insert):
            group = window[i:i + args.frames_per_insert]
            tables = concat_frames([arrow_tables(f, list(range(len(f.parts)))).tables for f in group])
            inserts.append((tables, [p.block_id for f in group for p in f.parts]))
    r = store_cost(inserts, args.variant, args.settle_timeout)
    total = r["insert_cpu_s"] + r["after_cpu_s"]
    print(f"{args.variant}: {args.minutes} windows x {args.nodes} nodes, {len(inserts)} inserts per table, "
          f"{r['rows']:,} metric+histogram rows")
    print(f"  CPU during the inserts {r['insert_cpu_s']:.1f} s (wall {r['insert_wall_s']:.1f} s), merges after "
          f"{r['after_cpu_s']:.1f} s (wall {r['after_wall_s']:.1f} s): total {total:.1f} s = "
          f"{r['cpu_us_per_row']:.1f} us per row, {r['rows'] / total:,.0f} rows per CPU-second; "
          f"{r['active_parts']} active parts")
    ev = r["events"]
    print(f"  merges: {ev.get('Merge', 0)} merges, {ev.get('MergedRows', 0):,} rows merged against "
          f"{ev.get('InsertedRows', 0):,} inserted (every table, roll-ups included), "
          f"{ev.get('MergedUncompressedBytes', 0) / 1e6:,.0f} MB; "
          f"merge wall {ev.get('MergeTotalMilliseconds', 0) / 1e3:.1f} s (horizontal "
          f"{ev.get('MergeHorizontalStageTotalMilliseconds', 0) / 1e3:.1f}, vertical "
          f"{ev.get('MergeVerticalStageTotalMilliseconds', 0) / 1e3:.1f})")
    print("  stored: " + ", ".join(f"{t} {b / 1e6:.1f} MB ({n:,} rows)" for t, b, n in r["sizes"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
