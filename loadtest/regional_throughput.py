#!/usr/bin/env python3
"""Regional throughput benchmark: edges -> gRPC -> regional merge -> ClickHouse (+ Kafka).

Results and discussion: docs/BENCHMARKS.md, section "Regional throughput".

1. Realistic batches. A real edge batch (loadtest/data/edge_batch.jsonl.gz, recorded on
   this machine by loadtest/record_batches.py = ``stratoscope edge --once --interval
   10s``; ``--record`` records a fresh one, needs root) is resampled to ``--series``
   series per node per 10 s, a third of them histograms: every series keeps a real
   metric name, real label keys and values and a real bucket shape (families sampled in
   proportion to their size in the real batch; beyond the real count, series are
   replicated with a varied cgroup/container/comm label). ``--churn real`` (default)
   gives each node a universe of series larger than one batch, each series present in
   k of a window's 6 batches with k drawn per family from a recorded real minute
   (loadtest/data/edge_minute.jsonl.gz); ``--churn none`` repeats every series in every
   batch (exactly 6x reduction). Profile rows and events of the real batch ride along
   (``--profile-rows``, ``--events``; event times are moved onto the wall clock, see
   below). Per node template, ``edge.batch.BatchBuilder`` builds one batch per 10 s slot
   of a window, serialized once. A send appends a tiny serialized header (node_id,
   boot_id, seq, start_ns, end_ns) to the body: protobuf merges concatenated messages
   (singular fields: last one wins), so the regional parses exactly the message
   BatchBuilder would have built, at no per-send build cost.

2. Simulated edges. ``--edges`` processes (multiprocessing, spawn) together open
   ``--nodes`` gRPC connections (one channel with its own subchannel, i.e. TCP
   connection, each) and one bidirectional ``Ingest/Stream`` per connection,
   compressed like ``edge.forward.GrpcForwarder``: a lean grpc.aio client of the
   same protocol, one batch in flight per stream, latency measured per batch. With
   ``--compression zstd`` (the edge's default) each template body is sealed once
   (stratoscope/wire.py: a zstd body, identity outside it) and a send appends the
   header to the sealed bytes, exactly as an edge that compressed the batch would
   send it; ``gzip`` is gRPC's own message compression, paid on every send (~1.7 ms
   a batch, a large part of the load generator's CPU), ``none`` neither.

   Why node identities are multiplexed over the streams. The regional closes a window on
   its own wall clock (window end + lateness). Batches for windows in the past (the
   obvious way to compress time) would close at the next 1 s flush tick after their
   first batch, and every later batch would become a late partial: no merge, a flush per
   batch. So every batch is for a real, current window, and a stream carries several
   node identities (own boot_id, seq +1 per batch), each sending 6 batches per window:

   - ``saturation`` (closed loop): each stream sends as fast as acks allow; the b-th
     batch a stream sends in window W is slot b mod 6 of node ``lt<p>-<stream>-<b div
     6>``. A node that would not finish before W ends (at the stream's current ack
     latency) starts in the next window instead. Ack latency here is queueing:
     ~ streams / throughput.
   - ``paced`` (the real shape): ``rate * 10 s / points per batch`` nodes spread over
     the streams, each draining one batch every 10 s at its own phase and sending it at
     once, so every aligned window gets 6 batches per node. The rate is ``--rate`` or
     min(target, 70 % of the saturation end-to-end rate). Latency counts from the
     batch's due time, so a batch delayed behind a slow ack is not hidden.

   Each phase uses a fresh regional process (``stratoscope regional --resolution 60s
   --lateness 5s``, chdb in a fresh directory). Sending ends on a window boundary (a
   paced phase also runs through a full window and the next, so its acks see a window
   close); the run then waits until the last window closed and every block is
   delivered to every sink. End-to-end rate = points / (first send -> last delivery).

3. Measured: points (series) accepted from the regional's /metrics, batches/s, ack
   latency p50/p90/p99/max, regional CPU (% of one core, /proc/PID/stat, the merge
   process plus its ingest and sink child processes; the merge process's main thread and
   busiest other threads) and RSS (all three kinds of process), machine CPU
   used by other processes, rows in ClickHouse (counted after the regional stopped, by a
   separate process opening its chdb directory), bytes in vs out, row reduction (edge
   series points / metric+histogram rows stored), window flush durations.

4. Configurations: ClickHouse (chdb) only; ClickHouse + Kafka (``--kafka``). Use a
   broker of your own: scripts/test.sh starts *and stops* the one on port 19292.

5. Limits of the parts, single core, in a subprocess: protobuf parse + numpy column
   decode; admission (the ingest gate's validate and dedup, the hand-over, Aggregator.record);
   Aggregator.flush;
   the Arrow tables the ClickHouse sink builds; a bare clickhouse-connect -> chdb insert of the same rows into a fresh
   store with the real schema (hourly materialized views included); a cProfile of
   accept + flush + shape; and the row reduction on the recorded real minute.

Edge caveat found on the way: the edge sends event ``time_ns`` from bpf_ktime_get_ns
(boot-relative), so the sink files events in 1970 and the events table's 30-day TTL
drops them. The benchmark puts its events on the wall clock so they are stored.

Root is only needed for ``--record``::

    .venv/bin/python loadtest/regional_throughput.py --quick
    KAFKA_PORT=19392 scripts/kafka.sh start
    .venv/bin/python loadtest/regional_throughput.py --kafka 127.0.0.1:19392 --json /tmp/rt.json
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import gzip
import io
import json
import math
import multiprocessing as mp
import os
import pickle
import pstats
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA = HERE / "data" / "edge_batch.jsonl.gz"
MINUTE = HERE / "data" / "edge_minute.jsonl.gz"
STRATOSCOPE = ROOT / ".venv" / "bin" / "stratoscope"
PYTHON = ROOT / ".venv" / "bin" / "python"
NS = 1_000_000_000
RES_S = 60  # regional output resolution (--resolution 60s)
LATENESS_S = 5  # --lateness 5s
EDGE_S = 10  # edge drain interval
SLOTS = RES_S // EDGE_S
CLK_TCK = os.sysconf("SC_CLK_TCK")
METHOD = "/stratoscope.v1.Ingest/Stream"

TARGETS = {
    "points_per_s": 500_000.0,  # paced, sustained end to end into ClickHouse
    "ack_p99_ms": 100.0,  # paced
    "memory_mb": 4096.0,  # paced: the regional's footprint (sum of PSS)
    "stall_ms": 50.0,  # paced: longest event-loop stall, ingest and merge
    "points_per_cpu_s": 1_000_000.0,  # saturation: points per regional CPU-second
    "share_of_bare_insert": 0.8,  # saturation: end to end / the bare insert limit (parts)
}
#: Label keys varied (first one present) when a series is replicated beyond the real count.
VARY_KEYS = ("container", "cgroup", "comm", "remote", "device", "port", "syscall")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ============================================================================ real batch


def record_batch(dest: Path, interval: str = "10s") -> None:
    """Record one real edge batch (needs root: loads the BPF programs) into dest (gzip JSONL)."""
    with tempfile.TemporaryDirectory(prefix="rt-record-") as d:
        out = Path(d) / "edge.jsonl"
        cmd = [str(STRATOSCOPE), "edge", "--once", "--interval", interval, "--metrics-port", "0",
               "--output", f"jsonl:{out}"]
        log(f"recording a real edge batch: {' '.join(cmd)}")
        subprocess.run(cmd, check=True, timeout=600)
        line = out.read_text().splitlines()[0]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(dest, "wt") as f:
        f.write(line + "\n")
    log(f"recorded {dest} ({dest.stat().st_size} bytes)")


def load_real(path: Path) -> dict[str, Any]:
    with gzip.open(path, "rt") as f:
        return json.loads(f.readline())


# ============================================================================ templates


@dataclass
class Template:
    """One node's batches for the 6 slots of a window, serialized without identity fields."""

    bodies: list[bytes]
    points: float  # metric + histogram series per batch (mean over the slots)
    histogram_series: int
    profile_rows: int
    events: int
    points_slots: list[int]  # series in each slot's batch
    universe: int  # distinct series over the window


def help_texts() -> dict[str, str]:
    from stratoscope.edge.spec import CountersMap, HistogramMap, ProfileMap, discover, load_spec

    out: dict[str, str] = {}
    for path in discover().values():
        for m in load_spec(path).maps:
            if isinstance(m, CountersMap):
                for v in m.values:
                    out[v.metric] = v.help
            elif isinstance(m, HistogramMap | ProfileMap):
                out[m.metric] = m.help
    return out


def _alloc(sizes: list[int], total: int) -> list[int]:
    """Split total in proportion to sizes (largest remainder), at least 1 per non-empty family."""
    s = sum(sizes)
    if not s or total <= 0:
        return [0] * len(sizes)
    raw = [total * x / s for x in sizes]
    out = [max(1, int(r)) if x else 0 for r, x in zip(raw, sizes, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    i = 0
    while sum(out) < total:
        if sizes[order[i % len(order)]]:
            out[order[i % len(order)]] += 1
        i += 1
    while sum(out) > total:
        j = max(range(len(out)), key=lambda k: out[k])
        out[j] -= 1
    return out


def _pick_series(fam: dict[str, Any], target: int, rng: random.Random) -> list[dict[str, Any]]:
    real = fam["series"]
    if target <= len(real):
        return rng.sample(real, target)
    keys = list(real[0]["labels"])
    vary = next((k for k in VARY_KEYS if k in keys), keys[-1] if keys else None)
    out = list(real)
    copy = 0
    while len(out) < target:
        copy += 1
        for s in real:
            if len(out) >= target:
                break
            c = dict(s)
            c["labels"] = dict(s["labels"])
            if vary is not None:
                v = c["labels"][vary]
                c["labels"][vary] = f"{v}-r{copy}" if v else f"replica-{copy}"
            out.append(c)
    return out


def churn_model(path: Path) -> dict[str, list[float]]:
    """P(a series appears in k of the 6 batches of a window), k = 1..6, per metric family
    ("*" = all families), from the first 6 consecutive batches of a recorded minute."""
    with gzip.open(path, "rt") as f:
        dicts = [json.loads(line) for line in f if line.strip()][:SLOTS]
    if len(dicts) < SLOTS:
        raise ValueError(f"{path}: fewer than {SLOTS} batches")
    seen: dict[str, dict[tuple[str, ...], int]] = {}
    for d in dicts:
        for m in d["metrics"] + d["histograms"]:
            fam = seen.setdefault(m["name"], {})
            for s_ in m["series"]:
                key = tuple(sorted(s_["labels"].items()))
                fam[key] = fam.get(key, 0) + 1
    out: dict[str, list[float]] = {}
    total = [0] * SLOTS
    for name, fam in seen.items():
        hist = [0] * SLOTS
        for k in fam.values():
            hist[min(k, SLOTS) - 1] += 1
            total[min(k, SLOTS) - 1] += 1
        if sum(hist) >= 20:
            out[name] = [h / sum(hist) for h in hist]
    out["*"] = [h / sum(total) for h in total]
    return out


def build_templates(
    real: dict[str, Any], n: int, series: int, hist_share: float, profile_rows: int,
    events: int, seed: int, churn: dict[str, list[float]] | None = None,
) -> list[Template]:
    """Node templates; with ``churn`` each family's series universe is larger than a batch
    and every series appears in k of the 6 slots, k drawn from the family's real
    distribution, keeping ~``series`` series per batch."""
    from stratoscope.edge.batch import BatchBuilder, EventRow
    from stratoscope.edge.decode import Histogram, ProfileRow
    from stratoscope.v1 import batch_pb2 as pb

    helps = help_texts()
    cfams = [m for m in real["metrics"] if m["series"]]
    hfams = [h for h in real["histograms"] if h["series"]]
    n_hist = round(series * hist_share) if hfams else 0
    c_alloc = _alloc([len(f["series"]) for f in cfams], series - n_hist)
    h_alloc = _alloc([len(f["series"]) for f in hfams], n_hist)
    prof = real["profiles"][0] if real["profiles"] else None
    real_events = real["events"]
    out: list[Template] = []
    for t in range(n):
        rng = random.Random(seed * 100_003 + t)
        node_labels = {"region": "lt-region", "cluster": f"lt-cluster-{t % 4}"}

        def universe(f: dict[str, Any], k: int,
                     rng: random.Random = rng) -> tuple[list[dict[str, Any]], list[set[int]]]:
            """The family's series and, for each, the slots it appears in."""
            if not churn:
                return _pick_series(f, k, rng), [set(range(SLOTS))] * k
            dist = churn.get(f["name"], churn["*"])
            mean_k = sum((i + 1) * p for i, p in enumerate(dist))
            ser = _pick_series(f, max(k, round(k * SLOTS / mean_k)), rng)
            ks = rng.choices(range(1, SLOTS + 1), weights=dist, k=len(ser))
            return ser, [set(rng.sample(range(SLOTS), kk)) for kk in ks]

        cs = [(f, *universe(f, k)) for f, k in zip(cfams, c_alloc, strict=True) if k]
        hs = [(f, *universe(f, k)) for f, k in zip(hfams, h_alloc, strict=True) if k]
        prows = []
        if prof is not None and profile_rows:
            ps = prof["samples"]
            prows = rng.sample(ps, min(profile_rows, len(ps)))
        evs: list[dict[str, Any]] = []
        if events and real_events:
            if events <= len(real_events):
                evs = sorted(rng.sample(real_events, events), key=lambda e: e["time_ns"])
            else:
                evs = [dict(real_events[i % len(real_events)],
                            time_ns=real_events[i % len(real_events)]["time_ns"] + i)
                       for i in range(events)]
            # The edge sends event time_ns from the kernel's monotonic clock (boot-relative);
            # ClickHouse would file them in 1970 and the events TTL drops them. Put them on
            # the wall clock, as their window's time, so they are stored like real events.
            t_first = evs[0]["time_ns"]
            base = (int(time.time()) // RES_S) * RES_S * NS
            evs = [dict(e, time_ns=base + (e["time_ns"] - t_first) % (EDGE_S * NS)) for e in evs]
        bodies = []
        points = hist_series = 0
        points_slots = []
        for slot in range(SLOTS):
            b = BatchBuilder("", "", 0, 0, 0, node_labels)  # identity goes in the per-send header

            def scale(v: int, rng: random.Random = rng) -> int:
                return max(1, round(v * rng.uniform(0.5, 1.5))) if v else 0

            points = hist_series = 0
            for f, ser, present in cs:
                keys = list(f["series"][0]["labels"])
                kind = pb.GAUGE if f["kind"] == "gauge" else pb.COUNTER
                vals = {tuple(s["labels"][k] for k in keys): scale(int(s["value"]))
                        for s, sl in zip(ser, present, strict=True) if slot in sl}
                b.add_counters(f["name"], f["unit"], helps.get(f["name"], ""), keys, vals, kind)
                points += len(vals)
            for f, ser, present in hs:
                keys = list(f["series"][0]["labels"])
                hist = {}
                for s, sl in zip(ser, present, strict=True):
                    if slot not in sl:
                        continue
                    buckets = {int(i): scale(int(c)) for i, c in s["buckets"].items()}
                    zero = scale(int(s["zero_count"]))
                    total = sum(buckets.values()) + zero
                    ratio = total / s["count"] if s["count"] else 1.0
                    hist[tuple(s["labels"][k] for k in keys)] = Histogram(
                        buckets=buckets, zero=zero, count=total, sum=int(s["sum"] * ratio))
                b.add_histograms(f["name"], f["unit"], helps.get(f["name"], ""), keys, hist)
                points += len(hist)
                hist_series += len(hist)
            if prows:
                rows: dict[Any, int] = {}
                for p in prows:
                    key = ProfileRow(p["pid"], p["comm"], p["cgroup"],
                                     tuple(p["kernel_stack"]) if p["kernel_stack"] else None,
                                     tuple(p["user_stack"]) if p["user_stack"] else None)
                    rows[key] = rows.get(key, 0) + scale(int(p["count"]))
                b.add_profile(prof["name"], int(prof["period_ns"]), rows)
            if evs:
                b.add_events([EventRow(**e) for e in evs], 0)
            bodies.append(b.build().SerializeToString())
            points_slots.append(points)
        uni = sum(len(x[1]) for x in cs + hs)
        out.append(Template(bodies, sum(points_slots) / SLOTS, hist_series, len(prows), len(evs),
                            points_slots, uni))
    return out


def dict_to_batch(d: dict[str, Any], helps: dict[str, str]) -> Any:
    """A recorded batch (batch_to_dict form) back to pb.Batch, metrics and histograms only."""
    from stratoscope.edge.batch import BatchBuilder
    from stratoscope.edge.decode import Histogram
    from stratoscope.v1 import batch_pb2 as pb

    b = BatchBuilder(d["node_id"], d["boot_id"], d["seq"], d["start_ns"], d["end_ns"],
                     d["node_labels"])
    for m in d["metrics"]:
        if m["series"]:
            keys = list(m["series"][0]["labels"])
            b.add_counters(m["name"], m["unit"], helps.get(m["name"], ""), keys,
                           {tuple(s["labels"][k] for k in keys): s["value"] for s in m["series"]},
                           pb.GAUGE if m["kind"] == "gauge" else pb.COUNTER)
    for h in d["histograms"]:
        if h["series"]:
            keys = list(h["series"][0]["labels"])
            b.add_histograms(h["name"], h["unit"], helps.get(h["name"], ""), keys, {
                tuple(s["labels"][k] for k in keys): Histogram(
                    buckets={int(i): c for i, c in s["buckets"].items()}, zero=s["zero_count"],
                    count=s["count"], sum=s["sum"])
                for s in h["series"]})
    return b.build()


def real_minute_reduction(path: Path) -> dict[str, Any] | None:
    """Row reduction of the regional merge on real minutes of one node's batches.

    The load generator repeats every series in all 6 batches of a window (exactly 6x);
    real series come and go (short-lived processes, idle syscalls), so they merge less.
    In steady state every aligned 60 s window holds exactly 6 of an edge's 10 s batches;
    a short recording does not, so every run of 6 consecutive recorded batches is
    re-stamped into one window and merged; the result is the mean over those runs.
    """
    if not path.exists():
        return None
    from collections import Counter

    from stratoscope.regional.merge import Aggregator, MergeSettings
    from stratoscope.regional.sinks.kafka import block_batch

    with gzip.open(path, "rt") as f:
        dicts = [json.loads(line) for line in f if line.strip()]
    if len(dicts) < SLOTS:
        return None
    helps = help_texts()
    base = (int(time.time()) // RES_S - 10) * RES_S * NS
    groups = []
    fam_points: Counter[str] = Counter()
    fam_rows: Counter[str] = Counter()
    for g in range(len(dicts) - SLOTS + 1):
        agg = Aggregator(MergeSettings(resolution_s=RES_S, lateness_s=LATENESS_S), "real")
        points = 0
        for j, d in enumerate(dicts[g:g + SLOTS]):
            d = dict(d, start_ns=base + j * EDGE_S * NS, end_ns=base + (j + 1) * EDGE_S * NS)
            agg.record(dict_to_batch(d, helps))
            for m in d["metrics"] + d["histograms"]:
                points += len(m["series"])
                fam_points[m["name"]] += len(m["series"])
        rows = rollup = 0
        for blk in agg.flush(0, force=True):
            batch = block_batch(blk)
            st = batch.strings
            for name, n in ([(st[m.name], len(m.counter_values) + len(m.gauge_values))
                             for m in batch.metrics]
                            + [(st[h.name], len(h.count)) for h in batch.histograms]):
                if batch.node_id:
                    rows += n
                    fam_rows[name] += n
                else:
                    rollup += n
        groups.append((points, rows, rollup))
    fams = sorted(((fam_points[k] / fam_rows[k], k, fam_points[k], fam_rows[k]) for k in fam_rows),
                  key=lambda x: x[2], reverse=True)
    red = [p / r for p, r, _ in groups if r]
    return {
        "batches": len(dicts), "windows": len(groups),
        "points": sum(g[0] for g in groups) / len(groups),
        "rows": sum(g[1] for g in groups) / len(groups),
        "rollup_rows": sum(g[2] for g in groups) / len(groups),
        "reduction": sum(red) / len(red), "reduction_min": min(red), "reduction_max": max(red),
        "reduction_with_rollups": sum(p / (r + u) for p, r, u in groups) / len(groups),
        "families": [{"metric": k, "points": p, "rows": r, "reduction": x} for x, k, p, r in fams[:8]],
    }


def header(node_id: str, boot_id: str, seq: int, start_ns: int, end_ns: int) -> bytes:
    from stratoscope.v1 import batch_pb2 as pb

    return pb.Batch(node_id=node_id, boot_id=boot_id, seq=seq, start_ns=start_ns,
                    end_ns=end_ns).SerializeToString()


# ============================================================================ load generator


def _rusage_s() -> float:
    t = os.times()
    return t.user + t.system


def worker_main(idx: int, nodes: int, target: str, templates_path: str, compression: str,
                conn: Any) -> None:
    """One simulated-edge process: ``nodes`` connections/streams (runs in a spawned process)."""
    import asyncio

    try:
        asyncio.run(_worker(idx, nodes, target, templates_path, compression, conn))
    except Exception as exc:  # report, don't hang the parent
        import traceback

        conn.send({"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"})


async def _worker(idx: int, nodes: int, target: str, templates_path: str, compression: str,
                  conn: Any) -> None:
    import asyncio
    from array import array

    import grpc

    from stratoscope.v1 import ingest_pb2

    with open(templates_path, "rb") as f:
        templates: list[Template] = pickle.load(f)
    options = [
        ("grpc.max_send_message_length", 32 * 1024 * 1024),
        ("grpc.max_receive_message_length", 32 * 1024 * 1024),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per simulated node
    ]
    comp = grpc.Compression.Gzip if compression == "gzip" else grpc.Compression.NoCompression
    if compression == "zstd":  # sealed once per template slot, as an edge seals a batch once
        import zstandard

        from stratoscope.v1 import batch_pb2
        from stratoscope.wire import LEVEL

        zc = zstandard.ZstdCompressor(level=LEVEL)
        for tpl in templates:
            tpl.bodies = [batch_pb2.Batch(codec=batch_pb2.CODEC_ZSTD, body=zc.compress(b))
                          .SerializeToString() for b in tpl.bodies]
    channels = [grpc.aio.insecure_channel(target, options=options, compression=comp)
                for _ in range(nodes)]
    await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), 60)
    conn.send({"ready": True})
    loop = asyncio.get_running_loop()
    plan = await loop.run_in_executor(None, conn.recv)  # {"t_start", "t_stop", "ks"}
    # ks: nodes carried by each stream (paced), or None (closed loop)
    t_start, t_stop, ks = plan["t_start"], plan["t_stop"], plan["ks"]
    boot = uuid.uuid4().hex[:16]
    seqs: dict[str, int] = {}
    ack_t = array("d")
    ack_lat = array("f")
    ack_due = array("f")
    status = {"accepted": 0, "duplicate": 0, "rejected": 0, "retry": 0, "errors": 0}
    acc = {"points": 0, "batches": 0, "bytes": 0, "nodes": set()}
    reasons: list[str] = []
    retry_reasons: dict[str, int] = {}  # which bound turned batches away

    est: dict[int, float] = {}  # per stream: EWMA of the ack latency, s

    def batches_closed(s: int) -> Any:
        """Closed loop: node-major rotation through the current wall-clock window."""
        window, b = -1, 0
        while True:
            now = time.time()
            # a node identity always gets its 6 slots in one window, switched between nodes
            # only; a node that would not finish before the window's end (at the current
            # ack latency) goes to the next window, which the regional accepts early
            if b % SLOTS == 0:
                w = int(now // RES_S) * RES_S
                if now + SLOTS * est.get(s, 0.2) + 0.5 >= w + RES_S:
                    w += RES_S
                if w >= t_stop:
                    return
                if w != window:
                    window, b = w, 0
            v, slot = divmod(b, SLOTS)
            b += 1
            start_s = window + slot * EDGE_S
            yield None, v, slot, start_s * NS, (start_s + EDGE_S) * NS

    def batches_paced(s: int, k: int) -> Any:
        """Paced, the real shape: this stream carries k nodes, each draining one batch every
        10 s at its own phase and sending it at once; batch i is due at t0 + (i + phi) * 10/k
        and covers the 10 s before it. Every aligned 60 s window gets 6 batches per node."""
        period = EDGE_S / k
        phi = (idx * 0.381966 + s * 0.618034) % 1.0
        t0 = math.floor(t_start / EDGE_S) * EDGE_S
        i = max(0, math.ceil((t_start - t0) / period - phi))
        while True:
            due = t0 + (i + phi) * period
            if due >= t_stop:
                return
            j, v = divmod(i, k)
            i += 1
            end_ns = int(due * NS)
            yield due, v, j % SLOTS, end_ns - EDGE_S * NS, end_ns

    async def stream(s: int) -> None:
        call = channels[s].stream_stream(
            METHOD, request_serializer=None, response_deserializer=ingest_pb2.Ack.FromString)()
        if ks is not None and ks[s] == 0:
            return
        gen = batches_closed(s) if ks is None else batches_paced(s, ks[s])
        await asyncio.sleep(max(0.0, t_start - time.time()))
        try:
            for due, v, slot, start_ns, end_ns in gen:
                if due is not None and due > time.time():
                    await asyncio.sleep(due - time.time())
                node = f"lt{idx:02d}-{s:04d}-{v:03d}"
                seq = seqs[node] = seqs.get(node, 0) + 1
                tpl = templates[(idx * 7919 + s * 31 + v) % len(templates)]
                msg = tpl.bodies[slot] + header(node, boot, seq, start_ns, end_ns)
                while True:
                    t0 = time.perf_counter()
                    sent = time.time()
                    await call.write(msg)
                    ack = await call.read()
                    lat = time.perf_counter() - t0
                    est[s] = 0.8 * est.get(s, lat) + 0.2 * lat
                    if ack is grpc.aio.EOF:
                        raise RuntimeError("stream closed by the regional")
                    now = time.time()
                    ack_t.append(now - t_start)
                    ack_lat.append(lat)
                    # due -> ack: what an edge that streams without waiting for acks
                    # (GrpcForwarder) would see; equals send -> ack when on schedule
                    ack_due.append(now - (due if due is not None else sent))
                    if ack.status == ingest_pb2.Ack.RETRY:
                        status["retry"] += 1
                        retry_reasons[ack.reason] = retry_reasons.get(ack.reason, 0) + 1
                        await asyncio.sleep(0.5)
                        continue
                    break
                if ack.status == ingest_pb2.Ack.ACCEPTED:
                    status["accepted"] += 1
                    acc["points"] += tpl.points_slots[slot]
                    acc["batches"] += 1
                    acc["bytes"] += len(msg)
                    acc["nodes"].add(node)
                elif ack.status == ingest_pb2.Ack.DUPLICATE:
                    status["duplicate"] += 1
                else:
                    status["rejected"] += 1
                    if len(reasons) < 5:
                        reasons.append(ack.reason)
            await call.done_writing()
        except (grpc.aio.AioRpcError, RuntimeError) as exc:
            status["errors"] += 1
            if len(reasons) < 5:
                reasons.append(f"{type(exc).__name__}: {exc}")

    cpu0 = _rusage_s()
    w0 = time.time()
    await asyncio.gather(*(stream(s) for s in range(nodes)))
    cpu = _rusage_s() - cpu0
    wall = time.time() - max(w0, t_start)
    for c in channels:
        await c.close()
    conn.send({
        "idx": idx, "status": status, "points": acc["points"], "batches": acc["batches"],
        "bytes": acc["bytes"], "node_ids": len(acc["nodes"]), "cpu_s": cpu, "wall_s": wall,
        "ack_t": ack_t.tobytes(), "ack_lat": ack_lat.tobytes(), "ack_due": ack_due.tobytes(),
        "reasons": reasons, "retry_reasons": retry_reasons,
    })


# ============================================================================ regional process


def code_fingerprint() -> str:
    """Short hash of the code a regional process loads (other people edit it meanwhile)."""
    import hashlib

    h = hashlib.sha256()
    files = sorted([*(ROOT / "regional").rglob("*.py"), *(ROOT / "stratoscope").rglob("*.py"),
                    ROOT / "edge" / "batch.py"])
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(port: int) -> dict[tuple[str, str], float]:
    """Prometheus text -> {(name without _total, labels text): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name = m.group(1)
        if name.endswith("_created"):
            continue
        name = name.removesuffix("_total")
        with contextlib.suppress(ValueError):
            out[(name, m.group(2) or "")] = float(m.group(3))
    return out


def metric(s: dict[tuple[str, str], float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for (n, lab), v in s.items() if n == name and all(w in lab for w in want))


def proc_cpu(pid: int, tid: int | None = None) -> float:
    """CPU seconds of a thread, or of a process plus its reaped children (the regional
    reduces closed windows in short-lived forked children)."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    own = int(fields[11]) + int(fields[12])
    return (own if tid else own + int(fields[13]) + int(fields[14])) / CLK_TCK


def child_pids(pid: int) -> list[int]:
    """The regional's child processes (its gRPC ingest and its sinks run in them)."""
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def children_cpu(pid: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for c in child_pids(pid):
        with contextlib.suppress(OSError, ValueError):
            out[c] = proc_cpu(c)
    return out


def family_rss_mb(pid: int, peak: bool = False) -> float:
    """RSS (or peak RSS) of the regional plus its sink processes."""
    total = rss_mb(pid)[1 if peak else 0]
    for c in child_pids(pid):
        with contextlib.suppress(OSError, ValueError):
            total += rss_mb(c)[1 if peak else 0]
    return total


def family_memory_mb(pid: int) -> dict[str, tuple[float, float]]:
    """Per process of the regional's tree (merge, ingest, sinks, frame children, by
    name/pid): (RSS, PSS) now. PSS splits pages shared by several processes (a frame
    child's copy-on-write pages of the merge process) among them, so the PSS sum is
    the tree's footprint; an RSS sum counts shared pages once per process."""
    out: dict[str, tuple[float, float]] = {}
    for p in [pid, *child_pids(pid)]:
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/{p}/comm") as f:
                name = "merge" if p == pid else f.read().strip()
            out[f"{name}/{p}"] = _two_fields_mb(f"/proc/{p}/smaps_rollup", "Rss:", "Pss:")
    return out


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (thread name, CPU seconds)."""
    out: dict[int, tuple[str, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            out[int(tid)] = (comm, proc_cpu(pid, int(tid)))
        except (OSError, ValueError):
            continue
    return out


def thread_groups(pid: int, th0: dict[int, tuple[str, float]],
                  th1: dict[int, tuple[str, float]], total: float) -> dict[str, Any]:
    """CPU seconds of the merge process's main thread (its asyncio loop: flush timer,
    delivery queues), of all its other threads (the hand-over reader that decodes and
    records batches, the frame builder, sink packing), and the busiest threads by name.
    The ingest and sink processes are counted separately (children_cpu). Thread names are not a reliable role: chdb renames
    the Python worker threads it runs queries on."""
    per = {tid: (name, cpu - th0.get(tid, (name, 0.0))[1]) for tid, (name, cpu) in th1.items()}
    main = per.get(pid, ("", 0.0))[1]
    top = sorted(((cpu, name, tid) for tid, (name, cpu) in per.items() if tid != pid),
                 reverse=True)[:5]
    return {"main": main, "other": max(0.0, total - main),
            "top": [{"tid": tid, "name": name, "cpu_s": cpu} for cpu, name, tid in top]}


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    total = sum(v[:7])  # without steal
    return (total - idle) / CLK_TCK, total / CLK_TCK


def _two_fields_mb(path: str, a: str, b: str) -> tuple[float, float]:
    """Two "Name: N kB" fields of a /proc file, in MB (0 where absent)."""
    got = {a: 0.0, b: 0.0}
    with open(path) as f:
        for line in f:
            key = line.split(maxsplit=1)[0] if line.strip() else ""
            if key in got:
                got[key] = int(line.split()[1]) / 1024
    return got[a], got[b]


def rss_mb(pid: int) -> tuple[float, float]:
    """(RSS, peak RSS) of a process, MB."""
    return _two_fields_mb(f"/proc/{pid}/status", "VmRSS:", "VmHWM:")


class Regional:
    """`stratoscope regional` as a child process, on a fresh chdb directory."""

    #: Extra `stratoscope regional` arguments (--regional-arg), e.g. --no-fork-frames.
    extra: list[str] = []

    def __init__(self, workdir: Path, kafka: str | None, topic_prefix: str) -> None:
        self.port = free_port()
        self.mport = free_port()
        self.chdir = workdir / "clickhouse"
        self.logfile = workdir / "regional.log"
        self.cmd = [str(STRATOSCOPE), "regional", "--insecure", "--listen", f"127.0.0.1:{self.port}",
                    "--metrics-port", str(self.mport), "--query-listen", "none",
                    "--clickhouse", f"chdb://{self.chdir}", "--wal-dir", str(workdir / "wal"),
                    "--resolution", f"{RES_S}s", "--lateness", f"{LATENESS_S}s"]
        if kafka:
            self.cmd += ["--kafka", kafka, "--kafka-topic-prefix", topic_prefix]
        self.cmd += self.extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 180) -> None:
        log(f"starting: {' '.join(self.cmd)}")
        self._log = open(self.logfile, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"regional exited with {self.proc.returncode}: "
                                   f"{self.logfile.read_text()[-2000:]}")
            try:
                scrape(self.mport)
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"regional did not come up in {timeout_s}s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout_s: float = 300) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log("regional did not stop in time: SIGKILL")
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc


def create_topics(bootstrap: str, prefix: str) -> None:
    """Create the run's Kafka topics up front (auto-creation delays the first deliveries)."""
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    async def go() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(f"{prefix}.{k}", 1, 1)
                                       for k in ("metrics", "profiles", "events")])
        finally:
            await admin.close()

    asyncio.run(go())


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


#: what the report calls a table -> the ClickHouse table counted (the point tables, not
#: the views that join them to their labels)
COUNT_TABLES = {"metrics": "metric_points", "histograms": "histogram_points", "series": "series",
                "profile_samples": "profile_samples", "profile_stacks": "profile_stacks", "events": "events",
                "nodes": "nodes", "metrics_1h": "metric_points_1h", "histograms_1h": "histogram_points_1h"}


def count_rows(chdir: Path) -> dict[str, int]:
    """Open the (stopped) regional's chdb directory in a fresh process and count rows."""
    code = (
        "import json, sys\n"
        "from stratoscope.regional.sinks.clickhouse import connect\n"
        "c = connect('chdb://' + sys.argv[1])\n"
        "out = {}\n"
        f"for k, t in {COUNT_TABLES!r}.items():\n"
        "    out[k] = c.query(f'SELECT count() FROM stratoscope.{t}').result_rows[0][0]\n"
        "for k, t in (('metrics', 'metric_points'), ('histograms', 'histogram_points')):\n"
        "    out[k + '_rollup'] = c.query(\n"
        "        f\"SELECT count() FROM stratoscope.{t} WHERE node = ''\").result_rows[0][0]\n"
        "out['windows'] = c.query('SELECT uniqExact(ts) FROM stratoscope.metric_points').result_rows[0][0]\n"
        "out['nodes_distinct'] = c.query(\"SELECT uniqExact(node) FROM stratoscope.metric_points WHERE node != ''\").result_rows[0][0]\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run([str(PYTHON), "-c", code, str(chdir)], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"counting rows failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ============================================================================ one run


@dataclass
class RunResult:
    config: str
    phase: str
    sinks: list[str]
    offered_points_s: float | None
    send_s: float = 0.0
    e2e_s: float = 0.0
    points: float = 0.0
    batches: float = 0.0
    batch_status: dict[str, float] = field(default_factory=dict)
    client_status: dict[str, int] = field(default_factory=dict)
    late_batches: float = 0.0
    ingest_points_s: float = 0.0
    e2e_points_s: float = 0.0
    batches_s: float = 0.0
    equivalent_nodes: float = 0.0
    node_ids: int = 0
    ack_ms: dict[str, float] = field(default_factory=dict)
    ack_ms_outside_close: dict[str, float] = field(default_factory=dict)
    stalls: list[dict[str, float]] = field(default_factory=list)
    #: per process (ingest, merge): the longest event-loop stall (ms) and stalls over 50 ms
    loop_stall_ms: dict[str, float] = field(default_factory=dict)
    loop_stalls_over_50ms: dict[str, float] = field(default_factory=dict)
    regional_cpu_pct: float = 0.0
    regional_cpu_s: float = 0.0
    thread_cpu_pct: dict[str, float] = field(default_factory=dict)
    sinks_cpu_pct: float = 0.0
    top_threads: list[dict[str, Any]] = field(default_factory=list)
    rss_mb_max: float = 0.0
    #: the largest sum of PSS over the regional's processes, sampled every 2 s (its footprint)
    pss_mb_max: float = 0.0
    #: each process's PSS in the sample with the largest sum (name/pid)
    pss_mb_at_max: dict[str, float] = field(default_factory=dict)
    #: the largest RSS sampled per process (name/pid)
    rss_mb_by_process: dict[str, float] = field(default_factory=dict)
    loadgen_cpu_pct: float = 0.0
    bytes_in: float = 0.0
    bytes_out: float = 0.0
    wire_bytes_sent: float = 0.0
    blocks: float = 0.0
    delivered: dict[str, float] = field(default_factory=dict)
    sink_failed: dict[str, float] = field(default_factory=dict)
    last_delivery_s: dict[str, float] = field(default_factory=dict)
    flushes: list[dict[str, float]] = field(default_factory=list)
    #: per window: its end (s after start), blocks, seconds from its close to stored
    window_lags: list[dict[str, float | None]] = field(default_factory=list)
    sustained: bool = False
    #: RETRY answers by their reason (sink backlog, or the held-points bound)
    retry_reasons: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    rows_s: float = 0.0
    reduction: float = 0.0
    reduction_nodes_only: float = 0.0
    points_per_cpu_s: float = 0.0
    points_per_main_cpu_s: float = 0.0
    machine_busy_pct: float = 0.0
    others_cpu_pct: float = 0.0
    regional_rc: int = 0
    code: str = ""
    errors: list[str] = field(default_factory=list)
    acks: dict[str, list[float]] = field(default_factory=dict)  # raw, for the JSON
    timeline: list[dict[str, Any]] = field(default_factory=list)


def _pct(a: Any, q: float) -> float:
    import numpy as np

    return float(np.percentile(a, q)) if len(a) else float("nan")


def run_phase(
    args: argparse.Namespace, config: str, kafka: str | None, phase: str,
    rate_points_s: float | None, templates_path: Path, points_per_batch: float, workroot: Path,
) -> RunResult:
    import numpy as np

    workdir = Path(tempfile.mkdtemp(prefix=f"{config}-{phase}-", dir=workroot))
    prefix = f"lt{int(time.time())}"
    reg = Regional(workdir, kafka, prefix)
    if kafka:
        try:
            create_topics(kafka, prefix)
        except Exception as exc:
            log(f"creating Kafka topics {prefix}.*: {exc} (left to auto-creation)")
    res = RunResult(config, phase, ["clickhouse"] + (["kafka"] if kafka else []), rate_points_s)
    res.code = code_fingerprint()
    ctx = mp.get_context("spawn")
    per = [args.nodes // args.edges + (1 if i < args.nodes % args.edges else 0)
           for i in range(args.edges)]
    procs: list[Any] = []
    pipes: list[Any] = []
    try:
        reg.start()
        for i, n in enumerate(per):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, name=f"rt-edge-{i}",
                            args=(i, n, f"127.0.0.1:{reg.port}", str(templates_path),
                                  args.compression, child), daemon=True)
            p.start()
            procs.append(p)
            pipes.append(parent)
        for p in pipes:
            msg = p.recv()
            if "error" in msg:
                raise RuntimeError(f"edge process failed: {msg['error']}")
        t_start = time.time() + 1.0
        t_stop = math.ceil((t_start + args.seconds) / RES_S) * RES_S  # end on a window boundary
        if rate_points_s:
            # ack latency must see a full window close (its flush runs on the event loop):
            # send through the first (almost) full window and the one after it
            first_full = math.ceil((t_start - LATENESS_S) / RES_S) * RES_S
            t_stop = max(t_stop, first_full + 2 * RES_S)
        ks_all: list[int] | None = None
        if rate_points_s:
            # simulated nodes, each sending one batch per 10 s, spread over the streams
            total = max(1, round(rate_points_s / points_per_batch * EDGE_S))
            ks_all = [total // args.nodes + (1 if g < total % args.nodes else 0)
                      for g in range(args.nodes)]
            res.offered_points_s = total * points_per_batch / EDGE_S
        first = 0
        for p, n in zip(pipes, per, strict=True):
            p.send({"t_start": t_start, "t_stop": t_stop,
                    "ks": ks_all[first:first + n] if ks_all else None})
            first += n
        log(f"{config}/{phase}: sending {t_stop - t_start:.0f} s until the window boundary "
            f"{time.strftime('%H:%M:%S', time.localtime(t_stop))}"
            + (f", offered {res.offered_points_s:,.0f} points/s ({sum(ks_all or [])} nodes)"
               if rate_points_s else ", closed loop"))

        # -- sampling: CPU, RSS, /metrics timeline --------------------------------
        timeline: list[tuple[float, dict[tuple[str, str], float]]] = []
        rss_max = [0.0]
        pss_max = [0.0]
        pss_at_max: dict[str, float] = {}
        rss_by_process: dict[str, float] = {}
        stop_sampling = threading.Event()

        def sampler() -> None:
            n = 0
            while not stop_sampling.is_set():
                with contextlib.suppress(Exception):
                    rss_max[0] = max(rss_max[0], family_rss_mb(reg.pid))
                if n % 4 == 0:  # smaps_rollup walks the page tables: every 2 s
                    with contextlib.suppress(Exception):
                        mem = family_memory_mb(reg.pid)
                        total = sum(pss for _, pss in mem.values())
                        if total > pss_max[0]:
                            pss_max[0] = total
                            pss_at_max.clear()
                            pss_at_max.update({k: pss for k, (_, pss) in mem.items()})
                        for k, (rss, _) in mem.items():
                            rss_by_process[k] = max(rss_by_process.get(k, 0.0), rss)
                n += 1
                if mem_available_mb() < args.min_free_mb:  # protect the shared machine
                    res.errors.append(f"machine below {args.min_free_mb:.0f} MB available at "
                                      f"regional RSS {rss_max[0]:.0f} MB: regional killed")
                    log(res.errors[-1])
                    with contextlib.suppress(OSError):
                        os.kill(reg.pid, signal.SIGKILL)
                    return
                with contextlib.suppress(Exception):
                    timeline.append((time.time(), scrape(reg.mport)))
                stop_sampling.wait(0.5)

        while time.time() < t_start:
            time.sleep(0.01)
        cpu0, th0, m0 = proc_cpu(reg.pid), thread_cpu(reg.pid), machine_cpu()
        kids0 = children_cpu(reg.pid)
        sampler_t = threading.Thread(target=sampler, daemon=True)
        sampler_t.start()
        results = []
        for p in pipes:
            msg = p.recv()
            if "error" in msg:
                raise RuntimeError(f"edge process failed: {msg['error']}")
            results.append(msg)
        t_sent = time.time()

        # -- tail: wait until the last window closed and every block is delivered --
        while time.time() < t_stop + LATENESS_S + 0.5:
            time.sleep(0.2)
        def alive_scrape() -> dict[tuple[str, str], float] | None:
            if reg.proc is not None and reg.proc.poll() is not None:
                raise RuntimeError(f"regional died (rc {reg.proc.returncode}); "
                                   + "; ".join(res.errors))
            try:
                return scrape(reg.mport)
            except OSError:  # slow while the event loop holds the GIL: try again
                return None

        s0 = None
        while s0 is None:
            s0 = alive_scrape()
        c0 = metric(s0, "stratoscope_regional_flush_seconds_count")
        deadline = time.time() + args.tail_timeout
        t_done = None
        while time.time() < deadline:
            s = alive_scrape()
            if s is None:
                continue
            if metric(s, "stratoscope_regional_flush_seconds_count") >= c0 + 2:
                total = metric(s, "stratoscope_regional_blocks")
                ok = all(metric(s, "stratoscope_regional_sink_delivered_blocks", sink=k)
                         + metric(s, "stratoscope_regional_sink_failed_blocks", sink=k)
                         + metric(s, "stratoscope_regional_sink_dropped_blocks", sink=k) >= total
                         and metric(s, "stratoscope_regional_sink_queued_blocks", sink=k) == 0
                         for k in res.sinks)
                if ok:
                    t_done = time.time()
                    break
            time.sleep(0.2)
        if t_done is None:
            res.errors.append(f"sinks had not caught up {args.tail_timeout:.0f} s after the last window")
            t_done = time.time()
        cpu1, th1, m1 = proc_cpu(reg.pid), thread_cpu(reg.pid), machine_cpu()
        kids1 = children_cpu(reg.pid)
        # VmHWM: each process's own peak (their sum is an upper bound: the peaks need not
        # coincide, and a frame child's copy-on-write pages count in both processes)
        rss_max[0] = max(rss_max[0], family_rss_mb(reg.pid, peak=True))
        stop_sampling.set()
        sampler_t.join(5)
        final = None
        while final is None:
            final = alive_scrape()
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
        res.regional_rc = reg.stop()

    # -- numbers -------------------------------------------------------------
    el = t_done - t_start
    res.send_s = t_stop - t_start
    res.e2e_s = el
    res.points = metric(final, "stratoscope_regional_points")
    res.batch_status = {st: metric(final, "stratoscope_regional_batches", status=st)
                        for st in ("accepted", "duplicate", "rejected", "retry")}
    res.batches = res.batch_status["accepted"]
    res.late_batches = metric(final, "stratoscope_regional_late_batches")
    for proc in ("ingest", "merge"):
        ns = "stratoscope_regional_event_loop"
        res.loop_stall_ms[proc] = 1e3 * metric(final, f"{ns}_longest_stall_seconds", process=proc)
        res.loop_stalls_over_50ms[proc] = (
            metric(final, f"{ns}_stall_seconds_count", process=proc)
            - metric(final, f"{ns}_stall_seconds_bucket", process=proc, le="0.05"))
    res.ingest_points_s = res.points / res.send_s
    res.e2e_points_s = res.points / el
    res.batches_s = res.batches / res.send_s
    res.equivalent_nodes = res.batches_s * EDGE_S
    res.client_status = {k: sum(r["status"][k] for r in results) for k in results[0]["status"]}
    res.node_ids = sum(r["node_ids"] for r in results)
    res.wire_bytes_sent = sum(r["bytes"] for r in results)
    for r in results:
        res.errors += r["reasons"]
        for reason, n in r["retry_reasons"].items():
            res.retry_reasons[reason] = res.retry_reasons.get(reason, 0) + n
    ack_t = np.concatenate([np.frombuffer(r["ack_t"], dtype=np.float64) for r in results])
    lat_send = np.concatenate([np.frombuffer(r["ack_lat"], dtype=np.float32) for r in results]) * 1e3
    lat = np.concatenate([np.frombuffer(r["ack_due"], dtype=np.float32) for r in results]) * 1e3
    res.acks = {"t_s": [round(float(x), 3) for x in ack_t],
                "due_ms": [round(float(x), 1) for x in lat],
                "send_ms": [round(float(x), 1) for x in lat_send]}
    res.timeline = [
        {"t_s": round(t - t_start, 2),
         "points": metric(s_, "stratoscope_regional_points"),
         "blocks": metric(s_, "stratoscope_regional_blocks"),
         "flush_sum_s": metric(s_, "stratoscope_regional_flush_seconds_sum"),
         "delivered": {k: metric(s_, "stratoscope_regional_sink_delivered_blocks", sink=k)
                       for k in res.sinks}}
        for t, s_ in timeline]
    res.ack_ms = {"n": float(len(lat)), "p50": _pct(lat, 50), "p90": _pct(lat, 90),
                  "p99": _pct(lat, 99), "max": float(lat.max()) if len(lat) else float("nan"),
                  "send_p50": _pct(lat_send, 50), "send_p99": _pct(lat_send, 99)}
    # acks in the 20 s after a window closes (end + lateness): the flush runs on the event loop
    abs_t = ack_t + t_start
    since_close = (abs_t - LATENESS_S) % RES_S
    outside = lat[since_close > 20]
    res.ack_ms_outside_close = {"n": float(len(outside)), "p50": _pct(outside, 50),
                                "p99": _pct(outside, 99)}
    if len(lat):
        sec = np.floor(ack_t).astype(np.int64)
        worst = []
        for s_ in np.unique(sec):
            m = lat[sec == s_]
            worst.append((float(m.max()), int(s_)))
        worst.sort(reverse=True)
        for mx, s_ in worst[:3]:
            t_abs = t_start + s_
            res.stalls.append({"t_s": s_, "max_ms": mx,
                               "s_after_window_close": (t_abs - LATENESS_S) % RES_S})
    dcpu = cpu1 - cpu0
    sinks_cpu = sum(c1 - kids0.get(pid_, 0.0) for pid_, c1 in kids1.items())
    res.regional_cpu_s = dcpu + sinks_cpu
    res.regional_cpu_pct = 100 * (dcpu + sinks_cpu) / el
    res.sinks_cpu_pct = 100 * sinks_cpu / el
    tg = thread_groups(reg.pid, th0, th1, dcpu)
    res.thread_cpu_pct = {"main": 100 * tg["main"] / el, "other": 100 * tg["other"] / el}
    res.top_threads = [dict(t, pct=100 * t["cpu_s"] / el) for t in tg["top"]]
    res.rss_mb_max = rss_max[0]
    res.pss_mb_max = pss_max[0]
    res.pss_mb_at_max = dict(sorted(pss_at_max.items(), key=lambda kv: -kv[1]))
    res.rss_mb_by_process = dict(sorted(rss_by_process.items(), key=lambda kv: -kv[1]))
    res.loadgen_cpu_pct = 100 * sum(r["cpu_s"] for r in results) / max(1e-9, t_sent - t_start)
    res.machine_busy_pct = 100 * (m1[0] - m0[0]) / el
    res.others_cpu_pct = max(0.0, res.machine_busy_pct - res.regional_cpu_pct
                             - 100 * sum(r["cpu_s"] for r in results) / el)
    res.bytes_in = metric(final, "stratoscope_regional_bytes_in")
    res.bytes_out = metric(final, "stratoscope_regional_bytes_out")
    res.blocks = metric(final, "stratoscope_regional_blocks")
    res.delivered = {k: metric(final, "stratoscope_regional_sink_delivered_blocks", sink=k)
                     for k in res.sinks}
    res.last_delivery_s = {k: metric(final, "stratoscope_regional_sink_last_delivery_seconds", sink=k)
                           for k in res.sinks}
    res.sink_failed = {k: metric(final, "stratoscope_regional_sink_failed_blocks", sink=k)
                       + metric(final, "stratoscope_regional_sink_dropped_blocks", sink=k)
                       for k in res.sinks}
    # window closes seen in the timeline: flush time and time to delivery
    prev = None
    for t, s in timeline:
        if prev is not None:
            pt, ps = prev
            dblocks = metric(s, "stratoscope_regional_blocks") - metric(ps, "stratoscope_regional_blocks")
            if dblocks > 0:
                res.flushes.append({
                    "at_s": t - t_start, "blocks": dblocks,
                    "flush_s": metric(s, "stratoscope_regional_flush_seconds_sum")
                    - metric(ps, "stratoscope_regional_flush_seconds_sum"),
                })
        prev = (t, s)
    # the sampler stops before the last scrape: it closes the timeline at t_done
    res.timeline.append({"t_s": round(t_done - t_start, 2), "points": res.points, "blocks": res.blocks,
                         "flush_sum_s": metric(final, "stratoscope_regional_flush_seconds_sum"),
                         "delivered": dict(res.delivered)})
    res.window_lags = window_lags(res.timeline, t_start, t_stop, res.sinks)
    # sustained: every batch offered was accepted (no RETRY) and every window was stored
    # before the next one closed, so the backlog cannot grow however long it runs
    res.sustained = (res.batch_status.get("retry", 0) == 0 and bool(res.window_lags)
                     and all(w["lag_s"] is not None and w["lag_s"] < RES_S for w in res.window_lags))
    if res.points and res.regional_cpu_s:
        res.points_per_cpu_s = res.points / res.regional_cpu_s
        main = res.thread_cpu_pct["main"] * el / 100
        res.points_per_main_cpu_s = res.points / main if main else 0.0
    try:
        res.rows = count_rows(reg.chdir)
        stored = res.rows["metrics"] + res.rows["histograms"]
        nodes_only = stored - res.rows["metrics_rollup"] - res.rows["histograms_rollup"]
        res.rows_s = stored / el
        res.reduction = res.points / stored if stored else 0.0
        res.reduction_nodes_only = res.points / nodes_only if nodes_only else 0.0
    except Exception as exc:
        res.errors.append(f"row count: {exc}")
    if res.regional_rc not in (0, -signal.SIGTERM):
        res.errors.append(f"regional exited with {res.regional_rc}; see {reg.logfile}")
    logtext = reg.logfile.read_text(errors="replace")
    for line in logtext.splitlines():
        if " ERROR " in line or "Traceback" in line:
            res.errors.append(f"regional log: {line[:200]}")
            break
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return res


def window_lags(timeline: list[dict[str, Any]], t_start: float, t_stop: float,
                sinks: list[str]) -> list[dict[str, float | None]]:
    """Per window of the phase: seconds from its close (end + lateness) until the sinks
    had delivered every block emitted before the next window closed (None: never).

    A regional that keeps up stores each window within one window length of its close;
    one that falls behind shows lags that grow from window to window.
    """
    ends = list(range(math.ceil((t_start + 1e-6) / RES_S) * RES_S, int(t_stop) + 1, RES_S))
    out: list[dict[str, float | None]] = []
    for i, end in enumerate(ends):
        close = end + LATENESS_S - t_start
        nxt = ends[i + 1] + LATENESS_S - t_start if i + 1 < len(ends) else math.inf
        before = [t for t in timeline if t["t_s"] < nxt]
        if not before:
            continue
        blocks = before[-1]["blocks"]
        done = next((t["t_s"] for t in timeline
                     if min(t["delivered"].get(k, 0.0) for k in sinks) >= blocks and t["t_s"] >= close), None)
        out.append({"end_s": end - t_start, "blocks": blocks,
                    "lag_s": None if done is None else round(done - close, 1)})
    return out


# ============================================================================ parts (subprocess)


def parts_main(spec_path: str) -> None:
    """Single-core limits of the parts, on the same batches; prints one JSON object."""
    import pyarrow as pa

    from stratoscope.regional.gate import Gate
    from stratoscope.regional.handover import pack
    from stratoscope.regional.merge import MergeSettings
    from stratoscope.regional.service import Regional as Core
    from stratoscope.regional.sinks.clickhouse import apply_migrations, connect, dedup_token
    from stratoscope.regional.sinks.clickhouse_arrow import INSERT_ORDER, TARGET, arrow_tables
    from stratoscope.v1 import batch_pb2 as pb
    from stratoscope.v1 import ingest_pb2

    spec = json.loads(Path(spec_path).read_text())
    with open(spec["templates"], "rb") as f:
        templates: list[Template] = pickle.load(f)
    k = spec["nodes"]
    w = (int(time.time()) // RES_S - 3) * RES_S
    raw: list[bytes] = []
    for n in range(k):
        tpl = templates[n % len(templates)]
        for slot in range(SLOTS):
            s_ns = (w + slot * EDGE_S) * NS
            raw.append(tpl.bodies[slot] + header(f"part-{n:04d}", "boot", slot + 1, s_ns, s_ns + EDGE_S * NS))
    points = sum(sum(templates[n % len(templates)].points_slots) for n in range(k))
    clock = (w + RES_S + 30) * NS
    out: dict[str, Any] = {"nodes": k, "batches": len(raw), "points": points,
                           "bytes": sum(map(len, raw))}

    # The parts run on one thread: their times are its CPU time (time.thread_time), which
    # other work on a shared machine inflates far less than wall time; the bare insert
    # (chdb's own threads) is timed on the wall clock.
    def best(fn: Any, reps: int = 3) -> float:
        ts = []
        for _ in range(reps):
            gc.collect()
            t0 = time.thread_time()
            fn()
            ts.append(time.thread_time() - t0)
        return min(ts)

    # 1. protobuf parse + numpy column decode (either column encoding, as the regional does)
    from stratoscope.regional.batchcols import decode as decode_columns

    def decode() -> None:
        for r in raw:
            decode_columns(pb.Batch.FromString(r))

    t = best(decode)
    out["decode_s"] = t
    out["decode_points_s"] = points / t
    t = best(lambda: [pb.Batch.FromString(r) for r in raw])
    out["parse_only_points_s"] = points / t

    parsed = [pb.Batch.FromString(r) for r in raw]
    series_only = []
    for b in parsed:
        c = pb.Batch()
        c.CopyFrom(b)
        c.ClearField("profiles")
        c.ClearField("events")
        series_only.append(c)

    def core() -> Core:
        return Core(MergeSettings(resolution_s=RES_S, lateness_s=LATENESS_S), [], clock=lambda: clock,
                    regional_id="bench")

    def admit(r: Core, gate: Gate, b: Any) -> Any:
        """A batch's path in a running regional: the ingest process's gate, the hand-over
        of its columns, the merge (the pipe between them is not part of this)."""
        ack, cols, label = gate.admit(b, None, b.ByteSize())
        if cols is None:
            r.count(ack.status, label, None, None)
        else:
            r.accept_admitted(pack(cols), b.ByteSize())
        return ack

    def rss() -> float:
        return rss_mb(os.getpid())[0]

    def shape(blocks: list[Any]) -> dict[str, Any]:
        """Arrow tables of every frame (one window here), as the ClickHouse sink builds them."""
        frames = {id(b.frame): b.frame for b in blocks}
        out: dict[str, Any] = {}
        for f in frames.values():
            tabs = arrow_tables(f, list(range(len(f.parts)))).tables
            for name, t in tabs.items():
                out[name] = pa.concat_tables([out[name], t]) if name in out else t
        return out

    def accept_flush(batches: list[Any]) -> dict[str, Any]:
        r = core()
        gc.collect()
        m0 = rss()
        t0 = time.thread_time()
        gate = Gate(clock=lambda: clock)
        for b in batches:
            a = admit(r, gate, b)
            assert a.status == ingest_pb2.Ack.ACCEPTED, a
        t1 = time.thread_time()
        m1 = rss()
        held = r.aggregator.held()[0] if hasattr(r.aggregator, "held") else 0
        blocks = r.aggregator.flush(clock, force=True)
        t2 = time.thread_time()
        m2 = rss()
        shape(blocks[:1])  # pyarrow's one-time warm-up (~0.4 s in a fresh process) is not shaping
        t2 = time.thread_time()
        tables = shape(blocks)
        t3 = time.thread_time()
        m3 = rss()
        rows = {n: tb.num_rows for n, tb in tables.items()}
        # bytes of resident memory added per edge point by each stage (state kept alive)
        mem = {"window_state": (m1 - m0) * 2**20 / points, "blocks": (m2 - m1) * 2**20 / points,
               "shaped_rows": (m3 - m2) * 2**20 / points}
        return {"held_bytes": held, "accept_s": t1 - t0, "flush_s": t2 - t1, "shape_s": t3 - t2, "mem": mem,
                "blocks": len(blocks), "rows": rows, "_tables": tables, "_blocks": blocks}

    for label, batches in (("full", parsed), ("series_only", series_only)):
        runs = []
        for _ in range(2):
            runs.append(accept_flush(batches))
            if len(runs) > 1:  # keep the faster one alive only
                runs = [min(runs, key=lambda x: x["accept_s"] + x["flush_s"] + x["shape_s"])]
        mem = runs[0]["mem"] if label == "full" else None
        r = runs[0]
        mh = r["rows"]["metric_points"] + r["rows"]["histogram_points"]
        out[label] = {
            "accept_points_s": points / r["accept_s"], "flush_points_s": points / r["flush_s"],
            "shape_rows_s": sum(r["rows"].values()) / r["shape_s"],
            "accept_ms_per_batch": 1e3 * r["accept_s"] / len(batches),
            "flush_s": r["flush_s"], "shape_s": r["shape_s"], "blocks": r["blocks"],
            "rows": r["rows"], "reduction": points / mh if mh else 0.0,
            "merge_points_s": points / (r["accept_s"] + r["flush_s"] + r["shape_s"]),
            "held_bytes_per_point": r["held_bytes"] / points,
            "bytes_out": sum({id(b.frame): b.frame.nbytes for b in r["_blocks"]}.values()),
        }
        if mem:
            out["mem_bytes_per_point"] = mem
        if label == "full":
            tables = r["_tables"]
            blocks = r["_blocks"]

    # 2. cProfile of accept + flush + shape (full batches)
    prof = cProfile.Profile()
    r = core()
    gate = Gate(clock=lambda: clock)
    prof.enable()
    for b in parsed:
        admit(r, gate, b)
    bl = r.aggregator.flush(clock, force=True)
    shape(bl)
    prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    total = sum(v[2] for v in st.stats.values())  # tottime sum
    top = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:18]
    out["profile_total_s"] = total
    out["profile_top"] = [
        {"function": f"{Path(fn).name}:{line}({name})", "ncalls": v[1], "tottime_s": v[2],
         "cumtime_s": v[3], "pct": 100 * v[2] / total}
        for (fn, line, name), v in top
    ]
    cum = sorted(st.stats.items(), key=lambda kv: kv[1][3], reverse=True)
    out["profile_cum"] = [
        {"function": f"{Path(fn).name}:{line}({name})", "cumtime_s": v[3], "pct": 100 * v[3] / total}
        for (fn, line, name), v in cum
        if "regional" in fn and name not in ("<module>",)
    ][:14]

    # 3. bare clickhouse-connect -> chdb insert of the same rows (fresh store, real schema)
    d = tempfile.mkdtemp(prefix="rt-insert-", dir=spec["workdir"])
    client = connect(f"chdb://{d}/ch")
    apply_migrations(client, "stratoscope")
    ids = [b.block_id for b in blocks]
    ins: dict[str, Any] = {}
    for name in INSERT_ORDER:
        tb = tables.get(name)
        if tb is None:
            continue
        t0 = time.perf_counter()
        client.insert_arrow(
            TARGET.get(name, name), tb, database="stratoscope",
            settings={"insert_deduplication_token": dedup_token(name, ids), "insert_deduplicate": 1,
                      "deduplicate_blocks_in_dependent_materialized_views": 1, "async_insert": 0,
                      "optimize_on_insert": 0},
        )
        ins[name] = {"rows": tb.num_rows, "s": time.perf_counter() - t0}
    mh_rows = ins["metric_points"]["rows"] + ins["histogram_points"]["rows"]
    mh_s = ins["metric_points"]["s"] + ins["histogram_points"]["s"]
    out["insert"] = ins
    out["insert_rows_s_metrics_histograms"] = mh_rows / mh_s
    out["insert_rows_s_all"] = sum(v["rows"] for v in ins.values()) / sum(v["s"] for v in ins.values())
    out["insert_points_equiv_s"] = out["insert_rows_s_metrics_histograms"] * out["full"]["reduction"]
    stored = client.query("SELECT count() FROM stratoscope.metric_points").result_rows[0][0]
    out["insert_check_metrics_rows"] = stored
    client.close()
    shutil.rmtree(d, ignore_errors=True)
    out["storage"] = storage_cpu(tables, ids, spec["workdir"])
    print(json.dumps(out))


#: inserts of the parts window per storage-cost measurement (a MergeTree merges parts
#: only once there are several)
STORAGE_REPEATS = 10


def storage_cpu(tables: dict[str, Any], ids: list[str], workdir: str) -> dict[str, Any]:
    """CPU a chdb store spends per stored metric/histogram row, background merges included.

    An insert's own time is only part of what storage costs: MergeTree merges every
    part again in background threads (twice for the hourly roll-ups, which are
    collapsed only by merges). The same window is inserted ``STORAGE_REPEATS`` times
    into a fresh store and CPU is counted until the merges have settled, then again
    with merges stopped (loadtest/chdb_storage.py).
    """
    from chdb_storage import store_cost

    inserts = [(tables, ids)] * STORAGE_REPEATS
    return {"merges_stopped": store_cost(inserts, "stop-merges", workdir=workdir),
            "with_merges": store_cost(inserts, "shipped", workdir=workdir)}


def run_parts(templates_path: Path, nodes: int, workroot: Path) -> dict[str, Any]:
    spec = workroot / "parts.json"
    spec.write_text(json.dumps({"templates": str(templates_path), "nodes": nodes,
                                "workdir": str(workroot)}))
    log(f"parts: decode / accept / flush / shape / chdb insert on {nodes} nodes x {SLOTS} batches"
        " (single process)")
    code = code_fingerprint()
    r = subprocess.run([str(PYTHON), str(Path(__file__).resolve()), "--_parts", str(spec)],
                       capture_output=True, text=True, cwd=ROOT, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"parts benchmark failed: {r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["code"] = code
    return out


# ============================================================================ report


def fmt(x: float, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.0f}{unit}"


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024 // 1024
    import platform

    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem, "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_start": os.getloadavg()}


def report(args: argparse.Namespace, tinfo: dict[str, Any], parts: dict[str, Any] | None,
           runs: list[RunResult], mach: dict[str, Any], real_red: dict[str, Any] | None) -> str:
    L: list[str] = []
    p = L.append
    p("")
    p("=" * 100)
    p(f"Regional throughput  ({mach['cores']} cores, {mach['cpu']}, {mach['mem_gib']} GiB, "
      f"load avg at start {mach['loadavg_start'][0]:.2f}, at end {os.getloadavg()[0]:.2f})")
    p(f"batches: {tinfo['points']:.0f} series/node/10 s (~{tinfo['hist_series']:.0f} histograms; "
      f"{tinfo['universe']:.0f} distinct per node-window, churn {tinfo['churn']}), "
      f"{tinfo['profile_rows']} profile rows, {tinfo['events']} events; "
      f"{tinfo['bytes']/1024:.1f} KiB/batch (gzip {tinfo['gzip_bytes']/1024:.1f} KiB, "
      f"zstd {tinfo.get('zstd_bytes', 0)/1024:.1f} KiB); "
      f"{args.nodes} streams in {args.edges} edge processes; compression {args.compression}")
    p("=" * 100)
    hdr = (f"{'config':<18}{'phase':<11}{'points/s in':>12}{'e2e pts/s':>11}{'batch/s':>8}"
           f"{'eq.nodes':>9}{'ack p50':>9}{'ack p99':>9}{'ack max':>9}{'CPU %':>7}{'main %':>7}"
           f"{'mem MB':>8}{'rows/s':>9}{'reduct.':>8}")
    p(hdr)
    p("-" * len(hdr))
    for r in runs:
        p(f"{r.config:<18}{r.phase:<11}{fmt(r.ingest_points_s):>12}{fmt(r.e2e_points_s):>11}"
          f"{r.batches_s:>8.1f}{fmt(r.equivalent_nodes):>9}{r.ack_ms.get('p50', math.nan):>9.1f}"
          f"{r.ack_ms.get('p99', math.nan):>9.1f}{r.ack_ms.get('max', math.nan):>9.0f}"
          f"{r.regional_cpu_pct:>7.0f}{r.thread_cpu_pct.get('main', 0):>7.0f}{(r.pss_mb_max or r.rss_mb_max):>8.0f}"
          f"{fmt(r.rows_s):>9}{r.reduction:>7.1f}x")
    p("")
    codes = sorted({r.code for r in runs})
    if len(codes) > 1:
        p(f"! the regional code changed between phases (fingerprints {', '.join(codes)}): "
          "compare phases with care")
    for r in runs:
        p(f"{r.config}/{r.phase} [code {r.code}]: sent {r.send_s:.0f} s, delivered {r.e2e_s:.0f} s after start; "
          f"{r.points:,.0f} points in {r.batches:,.0f} batches from {r.node_ids} node ids "
          f"(offered {fmt(r.offered_points_s) if r.offered_points_s else 'closed loop'}); "
          f"status {json.dumps({k: int(v) for k, v in r.batch_status.items() if v})}, "
          f"late {r.late_batches:.0f}")
        if r.retry_reasons:
            p(f"    RETRY answers by reason: {json.dumps(r.retry_reasons)}")
        p(f"    bytes in {r.bytes_in/1e6:,.1f} MB -> out {r.bytes_out/1e6:,.1f} MB "
          f"({r.bytes_in/max(1, r.bytes_out):.1f}x); blocks {r.blocks:.0f}, delivered "
          f"{json.dumps({k: int(v) for k, v in r.delivered.items()})}"
          + f" (last delivery took {', '.join(f'{k} {v:.1f}s' for k, v in r.last_delivery_s.items())})"
          + (f", failed/dropped {json.dumps(r.sink_failed)}" if any(r.sink_failed.values()) else ""))
        if r.window_lags:
            lags = ", ".join("never" if w["lag_s"] is None else f"{w['lag_s']:.1f} s" for w in r.window_lags)
            p(f"    window close -> stored: {lags}; sustained: "
              + ("yes (no RETRY, every window stored before the next closed)" if r.sustained else "NO"))
        rows = r.rows
        if rows:
            p(f"    rows: metrics {rows['metrics']:,} (+rollup {rows['metrics_rollup']:,} of them), "
              f"histograms {rows['histograms']:,} (rollup {rows['histograms_rollup']:,}), "
              f"profile_samples {rows['profile_samples']:,}, events {rows['events']:,}, "
              f"nodes {rows['nodes']:,}, series {rows.get('series', 0):,}, windows {rows['windows']}; reduction "
              f"{r.reduction:.2f}x (per-node rows only {r.reduction_nodes_only:.2f}x)")
        p(f"    regional CPU {r.regional_cpu_pct:.0f}% of one core (its ingest and sink processes "
          f"{r.sinks_cpu_pct:.0f}%; merge process: main thread "
          f"{r.thread_cpu_pct.get('main', 0):.0f}%, other threads "
          f"{r.thread_cpu_pct.get('other', 0):.0f}%: "
          + ", ".join(f"{t['name']}/{t['tid']} {t['pct']:.0f}%" for t in r.top_threads[:4]) + "),"
          f" {fmt(r.points_per_cpu_s)} points per regional CPU-second "
          f"({fmt(r.points_per_main_cpu_s)} per main-thread CPU-second); edge processes "
          f"{r.loadgen_cpu_pct:.0f}% while sending; machine busy {r.machine_busy_pct:.0f}% of "
          f"{100 * (os.cpu_count() or 1)}%, other processes ~{r.others_cpu_pct:.0f}%")
        p(f"    ack ms: p50 {r.ack_ms.get('p50', math.nan):.1f} p90 {r.ack_ms.get('p90', math.nan):.1f}"
          f" p99 {r.ack_ms.get('p99', math.nan):.1f} max {r.ack_ms.get('max', math.nan):.0f}"
          f" (n={r.ack_ms.get('n', 0):.0f}; from the batch's due time; send->ack p50 "
          f"{r.ack_ms.get('send_p50', math.nan):.1f} p99 {r.ack_ms.get('send_p99', math.nan):.1f});"
          f" outside the 20 s after a window close: p50 "
          f"{r.ack_ms_outside_close.get('p50', math.nan):.1f} p99 "
          f"{r.ack_ms_outside_close.get('p99', math.nan):.1f}")
        if r.flushes:
            big = sorted(r.flushes, key=lambda f: -f["flush_s"])[:3]
            p("    window flushes (blocks, s from a window's close to its last frame queued): " + ", ".join(
                f"{f['blocks']:.0f} blocks {f['flush_s']:.2f}s @{f['at_s']:.0f}s" for f in big))
        if r.pss_mb_max:
            p(f"    memory: footprint (largest sum of PSS, sampled every 2 s) {r.pss_mb_max:,.0f} MB ("
              + ", ".join(f"{k} {v:,.0f}" for k, v in r.pss_mb_at_max.items()) + "); "
              f"sum of the processes' peak RSS {r.rss_mb_max:,.0f} MB; peak RSS per process: "
              + ", ".join(f"{k} {v:,.0f}" for k, v in list(r.rss_mb_by_process.items())[:5]))
        if r.loop_stall_ms:
            p("    longest event-loop stall: " + ", ".join(
                f"{proc} {ms:.0f} ms ({r.loop_stalls_over_50ms.get(proc, 0):.0f} stalls over 50 ms)"
                for proc, ms in r.loop_stall_ms.items()))
        if r.stalls:
            p("    slowest acks: " + ", ".join(
                f"{s['max_ms']:.0f} ms @{s['t_s']:.0f}s ({s['s_after_window_close']:.0f}s after a close)"
                for s in r.stalls))
        for e in r.errors[:5]:
            p(f"    ! {e}")
    if parts:
        p("")
        p(f"Limits of the parts, one process, one core, thread CPU time ({parts['nodes']} nodes x {SLOTS} batches, "
          f"{parts['points']:,} points; code {parts.get('code', '?')}):")
        f, so = parts["full"], parts["series_only"]
        p(f"  protobuf parse + numpy column decode   {fmt(parts['decode_points_s'])} points/s "
          f"(parse alone {fmt(parts['parse_only_points_s'])})")
        p(f"  admit (gate+hand-over+record)           {fmt(f['accept_points_s'])} points/s "
          f"({f['accept_ms_per_batch']:.2f} ms/batch); series only {fmt(so['accept_points_s'])}")
        p(f"  Aggregator.flush                        {fmt(f['flush_points_s'])} points/s "
          f"({f['flush_s']:.2f} s for the window); series only {fmt(so['flush_points_s'])}")
        p(f"  Arrow tables for ClickHouse             {fmt(f['shape_rows_s'])} rows/s "
          f"({f['shape_s']:.2f} s); series only {fmt(so['shape_rows_s'])}")
        p(f"  accept+flush+shape together             {fmt(f['merge_points_s'])} points/s; "
          f"series only {fmt(so['merge_points_s'])}")
        ins = parts["insert"]
        p(f"  clickhouse-connect Arrow -> chdb insert {fmt(parts['insert_rows_s_metrics_histograms'])}"
          f" rows/s metrics+histograms (= {fmt(parts['insert_points_equiv_s'])} edge points/s at "
          f"{f['reduction']:.1f}x), {fmt(parts['insert_rows_s_all'])} rows/s all tables: " + ", ".join(
              f"{k} {v['rows']:,} rows {v['s']:.2f}s" for k, v in ins.items()))
        sto = parts.get("storage")
        if sto:
            a, b = sto["with_merges"], sto["merges_stopped"]
            p(f"  chdb storage CPU per stored row, background merges included ({STORAGE_REPEATS} inserts of "
              f"this window, {a['rows']:,} rows): {a['cpu_us_per_row']:.1f} us ({a['insert_cpu_s']:.1f} s during "
              f"the inserts + {a['after_cpu_s']:.1f} s of merges after, {a['active_parts']} parts left); "
              f"merges stopped: {b['cpu_us_per_row']:.1f} us = {fmt(1e6 / a['cpu_us_per_row'] * f['reduction'])}"
              f" edge points per storage CPU-second with merges, {fmt(1e6 / b['cpu_us_per_row'] * f['reduction'])}"
              " without")
        mb = parts.get("mem_bytes_per_point")
        if mb:
            p(f"  resident memory per edge point: window state {mb['window_state']:.0f} B, merged "
              f"blocks +{mb['blocks']:.0f} B, shaped insert columns +{mb['shaped_rows']:.0f} B "
              f"(x points per window = regional RSS); the merge's account of the window: "
              f"{f.get('held_bytes_per_point', 0):.0f} B per point")
        p("  cProfile, accept+flush+shape, top functions by own time "
          f"(total {parts['profile_total_s']:.1f} s):")
        for e in parts["profile_top"][:12]:
            p(f"    {e['pct']:5.1f}%  {e['tottime_s']:6.2f}s  {e['ncalls']:>9,}  {e['function']}")
        p("  cumulative, regional code:")
        for e in parts["profile_cum"][:10]:
            p(f"    {e['pct']:5.1f}%  {e['cumtime_s']:6.2f}s  {e['function']}")
    if real_red:
        p("")
        p(f"Row reduction on real minutes of this machine's edge ({MINUTE.name}: every run of "
          f"{SLOTS} consecutive 10 s batches of {real_red['batches']} merged as one window): "
          f"{real_red['points']:,.0f} points -> {real_red['rows']:,.0f} rows per window = "
          f"{real_red['reduction']:.2f}x (min {real_red['reduction_min']:.2f}, max "
          f"{real_red['reduction_max']:.2f}; {real_red['reduction_with_rollups']:.2f}x with "
          f"{real_red['rollup_rows']:,.0f} roll-up rows)")
        p("  largest families: " + ", ".join(
            f"{f['metric']} {f['reduction']:.2f}x" for f in real_red["families"]))
    p("")
    p("Targets (this machine, load generator on the same 2 cores):")

    def verdict(ok: bool) -> str:
        return "MET" if ok else "MISSED"

    for r in runs:
        if r.phase == "paced":
            p99, stall = r.ack_ms.get("p99", math.nan), max(r.loop_stall_ms.values(), default=math.nan)
            mem = r.pss_mb_max or r.rss_mb_max
            at_rate = r.offered_points_s >= 0.95 * TARGETS["points_per_s"]
            p(f"  {r.config} paced at {fmt(r.offered_points_s)} points/s"
              + ("" if at_rate else f" (below the target's {fmt(TARGETS['points_per_s'])})") + ": "
              f"sustained {verdict(r.sustained and at_rate)}; ack p99 {p99:.0f} ms "
              f"[<= {TARGETS['ack_p99_ms']:.0f}] {verdict(p99 <= TARGETS['ack_p99_ms'])}; "
              f"memory {mem:,.0f} MB [<= {TARGETS['memory_mb']:,.0f}] {verdict(mem <= TARGETS['memory_mb'])}; "
              f"longest stall {stall:.0f} ms [<= {TARGETS['stall_ms']:.0f}] {verdict(stall <= TARGETS['stall_ms'])}")
        elif r.phase == "saturation":
            p(f"  {r.config} saturation: {fmt(r.points_per_cpu_s)} points per regional CPU-second "
              f"[>= {fmt(TARGETS['points_per_cpu_s'])}] "
              f"{verdict(r.points_per_cpu_s >= TARGETS['points_per_cpu_s'])}")
            if parts:
                bare = parts["insert_points_equiv_s"]
                share = r.e2e_points_s / bare
                p(f"  {r.config} saturation: end to end {fmt(r.e2e_points_s)} points/s = {share:.2f} x the "
                  f"bare insert limit of the same rows ({fmt(bare)} edge points/s) "
                  f"[>= {TARGETS['share_of_bare_insert']}] {verdict(share >= TARGETS['share_of_bare_insert'])}")
    return "\n".join(L)


# ============================================================================ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=250, help="gRPC streams (connections), default 250")
    ap.add_argument("--edges", type=int, default=2, help="simulated-edge processes, default 2")
    ap.add_argument("--seconds", type=float, default=60,
                    help="send at least this long per phase (extended to the next window boundary)")
    ap.add_argument("--series", type=int, default=2000, help="series per node per batch")
    ap.add_argument("--hist-share", type=float, default=1 / 3, help="share of histogram series")
    ap.add_argument("--profile-rows", type=int, default=1000,
                    help="profile rows per batch (at most the real batch's; default: all of them)")
    ap.add_argument("--events", type=int, default=100,
                    help="events per batch, sampled from the real batch (default 100 = 10/s)")
    ap.add_argument("--templates", type=int, default=24, help="distinct node templates")
    ap.add_argument("--churn", choices=("real", "none"), default="real",
                    help="series churn across a window's 6 batches: 'real' draws each series' "
                         "appearances from the recorded minute (data/edge_minute.jsonl.gz); "
                         "'none' repeats every series in every batch (exactly 6x reduction)")
    ap.add_argument("--kafka", metavar="BOOTSTRAP", help="also run ClickHouse + Kafka")
    ap.add_argument("--compression", choices=("zstd", "gzip", "none"), default="zstd",
                    help="zstd: sealed batches (the edge's default); gzip: gRPC's; none")
    ap.add_argument("--rate", type=float, default=None,
                    help="offered points/s of the paced phase (default: min(target, 70%% of "
                         "the saturation end-to-end rate)); 0 skips the paced phase")
    ap.add_argument("--configs", help="subset of: clickhouse,clickhouse+kafka")
    ap.add_argument("--regional-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `stratoscope regional` (repeat), e.g. --no-fork-frames")
    ap.add_argument("--phases", default="saturation,paced",
                    help="saturation,paced (paced alone needs --rate)")
    ap.add_argument("--parts-nodes", type=int, default=100, help="nodes in the parts benchmark")
    ap.add_argument("--skip-parts", action="store_true")
    ap.add_argument("--parts-only", action="store_true")
    ap.add_argument("--tail-timeout", type=float, default=600)
    ap.add_argument("--min-free-mb", type=float, default=3072,
                    help="kill the regional if the machine's MemAvailable drops below this")
    ap.add_argument("--record", action="store_true", help="record a fresh real batch (root)")
    ap.add_argument("--batch-file", type=Path, default=DATA)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 50 streams, 20 s phases, 30-node parts")
    ap.add_argument("--keep", action="store_true", help="keep the chdb directories and logs")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--_parts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._parts:
        parts_main(args._parts)
        return 0
    Regional.extra = list(args.regional_arg)
    if args.quick:
        args.nodes = min(args.nodes, 50)
        args.seconds = min(args.seconds, 20)
        args.parts_nodes = min(args.parts_nodes, 30)
    args.edges = max(1, min(args.edges, args.nodes))

    mach = machine()
    if args.record or not args.batch_file.exists():
        record_batch(args.batch_file)
    real = load_real(args.batch_file)
    log(f"real batch: {sum(len(m['series']) for m in real['metrics'])} metric series, "
        f"{sum(len(h['series']) for h in real['histograms'])} histogram series, "
        f"{sum(len(p['samples']) for p in real['profiles'])} profile rows, "
        f"{len(real['events'])} events")
    t0 = time.time()
    churn = churn_model(MINUTE) if args.churn == "real" else None
    templates = build_templates(real, args.templates, args.series, args.hist_share,
                                args.profile_rows, args.events, args.seed, churn)
    import zlib

    import zstandard

    from stratoscope.wire import LEVEL

    body = templates[0].bodies[0]
    tinfo = {"points": sum(t.points for t in templates) / len(templates),
             "universe": sum(t.universe for t in templates) / len(templates),
             "churn": args.churn,
             "hist_series": templates[0].histogram_series,
             "profile_rows": templates[0].profile_rows, "events": templates[0].events,
             "bytes": sum(len(b) for t in templates for b in t.bodies) / (len(templates) * SLOTS),
             "gzip_bytes": len(zlib.compress(body, 6)) * 1.0,
             "zstd_bytes": len(zstandard.ZstdCompressor(level=LEVEL).compress(body)) * 1.0}
    log(f"built {len(templates)} node templates x {SLOTS} slots in {time.time() - t0:.1f} s: "
        f"{tinfo['points']} series/batch, {tinfo['bytes'] / 1024:.1f} KiB")
    workroot = Path(tempfile.mkdtemp(prefix="rt-"))
    tpath = workroot / "templates.pkl"
    with open(tpath, "wb") as f:
        pickle.dump(templates, f)
    points_per_batch = sum(t.points for t in templates) / len(templates)

    real_red = None
    try:
        real_red = real_minute_reduction(MINUTE)
        if real_red:
            log(f"real minutes: {real_red['points']:.0f} points -> {real_red['rows']:.0f} rows per "
                f"window: {real_red['reduction']:.2f}x")
    except Exception as exc:  # informative only
        log(f"real-minute reduction failed: {exc}")
    parts = None
    runs: list[RunResult] = []
    failed: list[str] = []
    try:
        if not args.skip_parts:
            parts = run_parts(tpath, args.parts_nodes, workroot)
            log(f"parts: decode {parts['decode_points_s']:,.0f} points/s, accept "
                f"{parts['full']['accept_points_s']:,.0f}, flush {parts['full']['flush_points_s']:,.0f}, "
                f"insert {parts['insert_rows_s_metrics_histograms']:,.0f} rows/s")
        configs = [("clickhouse", None)] + ([("clickhouse+kafka", args.kafka)] if args.kafka else [])
        if args.configs:
            configs = [c for c in configs if c[0] in args.configs.split(",")]
        if args.parts_only:
            configs = []
        def paced(name: str, kafka: str | None, rate: float) -> None:
            try:
                pc = run_phase(args, name, kafka, "paced", rate, tpath, points_per_batch, workroot)
            except Exception as exc:
                log(f"{name}/paced FAILED: {exc}")
                failed.append(f"{name}/paced: {exc}")
                return
            runs.append(pc)
            log(f"{name}/paced: {pc.ingest_points_s:,.0f} points/s in, ack p99 "
                f"{pc.ack_ms.get('p99', math.nan):.0f} ms, CPU {pc.regional_cpu_pct:.0f}%")

        for name, kafka in configs:
            if args.rate and "saturation" not in args.phases.split(","):
                paced(name, kafka, args.rate)
                continue
            try:
                sat = run_phase(args, name, kafka, "saturation", None, tpath, points_per_batch,
                                workroot)
            except Exception as exc:
                log(f"{name}/saturation FAILED: {exc}")
                failed.append(f"{name}/saturation: {exc}")
                continue
            runs.append(sat)
            log(f"{name}/saturation: {sat.ingest_points_s:,.0f} points/s in, {sat.e2e_points_s:,.0f} "
                f"end to end, ack p99 {sat.ack_ms.get('p99', math.nan):.0f} ms, CPU {sat.regional_cpu_pct:.0f}%")
            rate = args.rate
            if rate is None:
                rate = min(TARGETS["points_per_s"], 0.7 * sat.e2e_points_s)
            if rate and rate > 0 and "paced" in args.phases.split(","):
                paced(name, kafka, rate)
    finally:
        text = report(args, tinfo, parts, runs, mach, real_red) if (runs or parts) else ""
        text += "".join(f"\nFAILED {f}" for f in failed)
        print(text, flush=True)
        if args.json:
            args.json.write_text(json.dumps({
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "machine": mach, "batch": tinfo, "targets": TARGETS, "parts": parts,
                "real_minute": real_red, "failed": failed,
                "runs": [asdict(r) for r in runs],
            }, indent=1, default=str))
        if not args.keep:
            shutil.rmtree(workroot, ignore_errors=True)
        else:
            log(f"kept {workroot}")
    if args.parts_only:
        return 0 if parts else 1
    return 0 if runs and not failed and not any(r.errors for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
