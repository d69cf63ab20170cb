#!/usr/bin/env python3
"""How far real edge batches inflate: the sealed body's inflated size over its compressed
size, the basis of the regional's bound on it (``Limits.max_inflation``,
regional/validate.py; docs/SECURITY.md).

Two kinds of input:

- ``--spool DIR``: an edge's spool (edge/spool.py), which holds every batch exactly as
  the forwarder sends it, already sealed. Point an edge at a regional that is not there
  and its batches stay in the spool::

      sudo .venv/bin/stratoscope edge --regional 127.0.0.1:9 --insecure \\
          --spool-dir /tmp/spool --duration 270s --param profile.SAMPLE_HZ=99

- ``--jsonl PATH``: batches as JSON lines (``edge.batch.batch_to_dict``, e.g.
  loadtest/data/*.jsonl.gz), rebuilt with the edge's BatchBuilder and sealed as the edge
  seals them, once with raw columns (the edge's default) and once packed
  (``--wire-columns packed``).

- ``--extremes``: batches of the edge's shape built to compress as well as a real node's
  could: the regional benchmark's node templates (loadtest/regional_throughput.py, real
  series replicated up to 100,000 per batch), a profile of 16,384 rows that differ only in
  pid (one stack, one sample each: a fork-heavy node), a port scan (65,535 series of one
  connection each), a fork storm (100,000 exec and exit events of /bin/true), 50,000
  histogram series of one bucket; and one that is not an edge's shape, 200,000 series of
  value 1 over every pair of two label sets. Not measurements of a node: the margin's test.

For each batch: the compressed body's bytes, the inflated bytes, their ratio, the share
of the inflated bytes that profile blocks take, and whether the regional's bound takes it;
then, per program mix, the count, median, 90th and 99th percentile and maximum of the
ratio, the largest inflated size and how many batches the bound refuses.

    .venv/bin/python loadtest/inflation_ratio.py --jsonl loadtest/data/edge_minute.jsonl.gz
    .venv/bin/python loadtest/inflation_ratio.py --extremes --quiet
    .venv/bin/python loadtest/inflation_ratio.py --spool /tmp/spool --json /tmp/ratios.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zstandard

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(1, str(HERE))

from stratoscope.columns import packed_copy  # noqa: E402
from stratoscope.edge.batch import BatchBuilder, EventRow, batch_from_dict  # noqa: E402
from stratoscope.edge.decode import Histogram, ProfileRow  # noqa: E402
from stratoscope.edge.spool import Spool  # noqa: E402
from stratoscope.regional.validate import NS, Limits  # noqa: E402
from stratoscope.v1 import batch_pb2 as pb  # noqa: E402
from stratoscope.wire import inflation_cap, seal  # noqa: E402

LIMITS = Limits()


def from_jsonl(path: Path) -> Iterator[tuple[str, pb.Batch]]:
    """(source, sealed batch) for each line, raw columns then packed."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        for i, line in enumerate(ln for ln in f if ln.strip()):
            whole = batch_from_dict(json.loads(line))
            yield f"{path.name}:{i + 1} raw", seal(whole)
            yield f"{path.name}:{i + 1} packed", seal(packed_copy(whole))


def from_spool(directory: Path) -> Iterator[tuple[str, pb.Batch]]:
    """(source, batch) for each batch the spool holds, as its forwarder would send it."""
    spool = Spool(directory)
    try:
        for boot, seq in spool.pending():
            data = spool.read((boot, seq))
            if data is not None:
                yield f"{directory.name} seq {seq}", pb.Batch.FromString(data)
    finally:
        spool.close()


def extremes() -> Iterator[tuple[str, pb.Batch]]:
    """(source, sealed batch) of the shapes in the module docstring."""
    import random

    import regional_throughput as rt  # loadtest/, beside this file

    with gzip.open(HERE / "data" / "edge_batch.jsonl.gz", "rt") as f:
        real = json.loads(f.readline())
    for series in (2_000, 20_000, 100_000):
        for t in rt.build_templates(real, 1, series, 1 / 3, 1000, 100, seed=1):
            yield f"benchmark template, {series:,} series", seal(pb.Batch.FromString(t.bodies[0]))

    def builder() -> BatchBuilder:
        return BatchBuilder("node-x", "boot", 1, 10 * NS, 20 * NS, {"region": "eu"})

    b = builder()
    stack = tuple(f"frame_{i}" for i in range(40))
    b.add_profile("cpu", 10_101_010, {ProfileRow(1000 + i, "sh", "/system.slice/build.service", stack[:12], stack):
                                      1 for i in range(16_384)})
    yield "16,384 profile rows of one stack", seal(b.build())
    b = builder()
    b.add_counters("tcp_connections_total", "1", "", ["remote", "port", "comm"],
                   {("10.0.0.66", str(p), "sshd"): 1 for p in range(1, 65_536)})
    yield "port scan: 65,535 series of 1", seal(b.build())
    rnd = random.Random(2)
    t, events = 10 * NS, []
    for i in range(50_000):  # a process started and ended every ~0.1 ms
        for kind, detail in (("exec", "/bin/true"), ("exit", "")):
            t += rnd.randint(50_000, 200_000)
            events.append(EventRow(t, kind, 10_000 + i, 999, "true", "/user.slice/session-1.scope", detail, 0))
    b = builder()
    b.add_events(events, lost=0)
    yield "fork storm: 100,000 events", seal(b.build())
    comms = [f"worker-{i}" for i in range(400)]
    b = builder()
    b.add_histograms("syscall_latency", "ns", "", ["syscall", "comm"],
                     {(f"sys_{i % 500}", comms[i // 500]): Histogram({10: 1}, 0, 1, 1024) for i in range(50_000)})
    yield "50,000 histograms of one bucket", seal(b.build())
    b = builder()  # not an edge's shape: every label pair of a product, every value 1
    b.add_counters("syscalls_total", "calls", "", ["syscall", "comm"],
                   {(f"sys_{i % 500}", comms[i // 500]): 1 for i in range(200_000)})
    yield "200,000 series of 1 over a label product", seal(b.build())


def mix(whole: pb.Batch) -> str:
    """The blocks present: what the edge's programs contributed."""
    parts = [name for name, present in (("metrics", len(whole.metrics)), ("histograms", len(whole.histograms)),
                                        ("profiles", len(whole.profiles)),
                                        ("events", whole.HasField("events"))) if present]
    return "+".join(parts) or "empty"


def measure(source: str, sealed: pb.Batch) -> dict[str, Any]:
    if sealed.codec != pb.CODEC_ZSTD:
        raise SystemExit(f"{source}: not sealed (codec {sealed.codec}): record with --compression zstd")
    raw = zstandard.ZstdDecompressor().decompress(sealed.body)
    whole = pb.Batch.FromString(raw)
    profile = sum(p.ByteSize() for p in whole.profiles)
    cap = inflation_cap(len(sealed.body), LIMITS.max_bytes, LIMITS.max_inflation, LIMITS.inflation_floor)
    return {"source": source, "mix": mix(whole), "compressed": len(sealed.body), "inflated": len(raw),
            "ratio": len(raw) / len(sealed.body), "profile_share": profile / max(1, len(raw)),
            "within_bound": len(raw) <= cap,
            "strings": len(whole.strings), "profile_rows": sum(len(p.samples) or len(p.samples_le) // 8
                                                               for p in whole.profiles)}


def pct(values: list[float], q: float) -> float:
    """The q-quantile, nearest rank (a handful of batches: no interpolation)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def summary(rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    out = []
    for name, rs in sorted(groups.items()):
        ratios = [r["ratio"] for r in rs]
        out.append({"group": name, "batches": len(rs), "p50": statistics.median(ratios),
                    "p90": pct(ratios, 0.9), "p99": pct(ratios, 0.99), "max": max(ratios),
                    "max_inflated": max(r["inflated"] for r in rs),
                    "max_compressed": max(r["compressed"] for r in rs),
                    "over_bound": sum(not r["within_bound"] for r in rs)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jsonl", type=Path, action="append", default=[], help="batches as JSON lines (.gz too)")
    ap.add_argument("--spool", type=Path, action="append", default=[], help="an edge's spool directory")
    ap.add_argument("--extremes", action="store_true", help="built batches that compress best (docstring)")
    ap.add_argument("--json", type=Path, help="write every row and the summary here too")
    ap.add_argument("--quiet", action="store_true", help="the summary only")
    args = ap.parse_args()
    if not args.jsonl and not args.spool and not args.extremes:
        ap.error("give --jsonl, --spool or --extremes")
    rows = [measure(src, b) for path in args.jsonl for src, b in from_jsonl(path)]
    rows += [measure(src, b) for d in args.spool for src, b in from_spool(d)]
    if args.extremes:
        rows += [dict(measure(src, b), mix=src) for src, b in extremes()]
    if not args.quiet:
        print(f"{'batch':40} {'blocks':36} {'compressed':>10} {'inflated':>10} {'ratio':>6} {'profile':>7}  bound")
        for r in rows:
            print(f"{r['source'][:40]:40} {r['mix'][:36]:36} {r['compressed']:>10,} {r['inflated']:>10,} "
                  f"{r['ratio']:>6.2f} {r['profile_share']:>7.0%}  {'within' if r['within_bound'] else 'OVER'}")
    by_mix = summary(rows, lambda r: r["mix"] + (" (packed)" if r["source"].endswith("packed") else ""))
    heavy = summary([r for r in rows if r["profile_share"] >= 0.5], lambda r: "profile >= 50% of the bytes")
    every = summary(rows, lambda r: "all batches")
    print(f"\n{'group':48} {'n':>4} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6} {'max inflated':>13} "
          f"{'over':>5}")
    for s in by_mix + heavy + every:
        print(f"{s['group'][:48]:48} {s['batches']:>4} {s['p50']:>6.2f} {s['p90']:>6.2f} {s['p99']:>6.2f} "
              f"{s['max']:>6.2f} {s['max_inflated']:>13,} {s['over_bound']:>5}")
    print(f"\nbound: {LIMITS.max_inflation}x the compressed body, at least {LIMITS.inflation_floor:,} bytes "
          f"(regional/validate.py Limits); 'over': batches a regional would refuse")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": by_mix + heavy + every}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
