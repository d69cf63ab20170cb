#!/usr/bin/env python3
"""CPU per message of rejecting each kind of bad batch at the regional's ingest gate,
against accepting a good batch of the same size, measured in the same run.

Why: a broken or hostile client can send invalid batches as fast as its link allows, and
what each one costs the ingest process is CPU taken from every other edge. A rejection
that costs less than an acceptance is cheap to absorb; one that costs much more (a body
that inflates a thousandfold, a table that decoding pays for per item) is a lever.

Each case is the wire bytes of one message, taken the way the ingest process takes it:
parsed (``parse_batch``; the gRPC deserializer's ``Batch.FromString``), then
``Gate.admit`` (identity, de-duplication, inflate, decode, validate). The accepted
baseline is the recorded real edge batch (loadtest/data/edge_batch.jsonl.gz: 1,964 metric
and 1,494 histogram series, 279 profile rows, 555 events), sealed as an edge seals it;
each bad case is that batch with one thing spoiled (same size), except the cases about
size, whose wire and inflated bytes are printed beside them. Every message gets a fresh
de-duplication state, so the accepted batch is never a duplicate; the "duplicate" row is
the same batch answered from its identity.

Method: CPU time of this thread (``time.thread_time``) over enough messages to take
~``--budget-ms`` per case, median of ``--repeat`` rounds, the cases in a new random order
each round; "ratio" is a case's CPU per message over the accepted baseline's in the same
round, the median of those per-round ratios. What follows an acceptance (packing the
columns for the merge, the write-ahead log, the merge) is not included: an accepted
batch costs more than its row here says.

    .venv/bin/python loadtest/rejection_cost.py
    .venv/bin/python loadtest/rejection_cost.py --repeat 7 --json /tmp/rejection_cost.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stratoscope.edge.batch import batch_from_dict  # noqa: E402
from stratoscope.regional.dedup import Deduplicator  # noqa: E402
from stratoscope.regional.gate import Gate, RejectionLog  # noqa: E402
from stratoscope.regional.ratelimit import RateSettings  # noqa: E402
from stratoscope.regional.validate import NS, BatchRejected, Limits, parse_batch  # noqa: E402
from stratoscope.v1 import batch_pb2 as pb  # noqa: E402
from stratoscope.v1 import ingest_pb2  # noqa: E402
from stratoscope.wire import header_bytes, seal, varint  # noqa: E402

HERE = Path(__file__).resolve().parent
REAL = HERE / "data" / "edge_batch.jsonl.gz"
NOW = 1_800_000_000 * NS
WINDOW = 10 * NS


def real_batch(path: Path = REAL) -> pb.Batch:
    """The recorded edge batch rebuilt with BatchBuilder (every block: metrics, histograms,
    profile, events), its window ending at NOW and its events moved into that window
    (the recording has boot-relative event times)."""
    with gzip.open(path, "rt") as f:
        d: dict[str, Any] = json.loads(f.readline())
    t0 = min((e["time_ns"] for e in d["events"]), default=0)
    return batch_from_dict(dict(
        d, node_id="node-1", boot_id="0b6c5a52-1f0e-4c43-9a57-8d2f2b8e6a11", seq=1, start_ns=NOW - WINDOW,
        end_ns=NOW, events_lost=0,
        events=[dict(e, time_ns=NOW - WINDOW + (e["time_ns"] - t0) % WINDOW) for e in d["events"]]))


def _copy(b: pb.Batch) -> pb.Batch:
    out = pb.Batch()
    out.CopyFrom(b)
    return out


def _sealed(b: pb.Batch) -> bytes:
    return seal(b).SerializeToString()


def _spoil(fn: Callable[[pb.Batch], None]) -> Callable[[pb.Batch], bytes]:
    """A case: a copy of the real batch spoiled by ``fn``, sealed."""
    def build(real: pb.Batch) -> bytes:
        b = _copy(real)
        fn(b)
        return _sealed(b)
    return build


def _last_metric(b: pb.Batch, kind: int) -> Any:
    return [m for m in b.metrics if m.kind == kind][-1]


def _nan_gauge(b: pb.Batch) -> None:
    """The last counter family turned gauge (the recording has none), its last value NaN."""
    g = _last_metric(b, pb.COUNTER)
    v = np.frombuffer(g.counter_values_le, "<u8").astype("<f8")
    v[-1] = math.nan
    g.kind = pb.GAUGE
    g.ClearField("counter_values_le")
    g.gauge_values_le = v.tobytes()


def _bad_index(b: pb.Batch) -> None:
    m = b.metrics[-1]
    v = np.frombuffer(m.label_values_le, "<u4").copy()
    v[-1] = len(b.strings)
    m.label_values_le = v.tobytes()


def _wrap(b: pb.Batch) -> None:
    c = _last_metric(b, pb.COUNTER)
    v = np.frombuffer(c.counter_values_le, "<u8").copy()
    v[-1] = 2**64 - 1
    c.counter_values_le = v.tobytes()


def _deep_stack(b: pb.Batch) -> None:
    p = b.profiles[0]
    frames = np.frombuffer(p.stack_frames_le, "<u4")
    offs = np.frombuffer(p.stack_offsets_le, "<u4").copy()
    extra = 513 - int(offs[1] - offs[0])  # the first stack made 513 frames deep
    p.stack_frames_le = np.concatenate([frames[:offs[1]], np.full(max(0, extra), frames[0], "<u4"),
                                        frames[offs[1]:]]).astype("<u4").tobytes()
    offs[1:] += max(0, extra)
    p.stack_offsets_le = offs.tobytes()


def _event_far(b: pb.Batch) -> None:
    t = np.frombuffer(b.events.time_ns_le, "<u8").copy()
    t[-1] = 0  # 1970: a ClickHouse partition of its own
    b.events.time_ns_le = t.tobytes()


def _ahead(b: pb.Batch) -> None:
    b.start_ns, b.end_ns = NOW + 390 * NS, NOW + 400 * NS


def _corrupt_body(real: pb.Batch) -> bytes:
    sealed = seal(real)
    body = bytearray(sealed.body)
    body[len(body) // 2] ^= 0xFF
    sealed.body = bytes(body)
    return sealed.SerializeToString()


def _spoofed(real: pb.Batch) -> bytes:
    """The clear header of node-1, a body of another node swallowing it (validate.open_batch)."""
    sealed = seal(real)
    body = _copy(real)
    body.node_id = "victim"
    tail = varint(99 << 3 | 2) + varint(len(header_bytes(real)))  # an unknown field, bytes
    sealed.body = zstandard.ZstdCompressor(level=6).compress(body.SerializeToString() + tail)
    return sealed.SerializeToString()


def _random_bytes(real: pb.Batch) -> bytes:
    return random.Random(20).randbytes(len(_sealed(real)))


def _sealed_raw(real: pb.Batch, raw: bytes) -> bytes:
    return pb.Batch(node_id=real.node_id, boot_id=real.boot_id, seq=1, start_ns=real.start_ns,
                    end_ns=real.end_ns, codec=pb.CODEC_ZSTD,
                    body=zstandard.ZstdCompressor(level=6).compress(raw)).SerializeToString()


def _empty_blocks(real: pb.Batch) -> bytes:
    """16 MiB of empty metric blocks (2 bytes each) in a body of ~1.4 KB."""
    return _sealed_raw(real, pb.Batch(strings=[""]).SerializeToString() + b"\x4a\x00" * ((16 << 20) // 2 - 64))


def _blocks_to_the_floor(real: pb.Batch) -> bytes:
    """As many empty blocks as the floor of the inflation bound lets a small body hold."""
    return _sealed_raw(real, pb.Batch(strings=[""]).SerializeToString()
                       + b"\x4a\x00" * (Limits().inflation_floor // 2 - 2))


def _blocks_at_the_ratio(real: pb.Batch) -> bytes:
    """16 MiB of empty blocks beside enough noise (an unknown field, which the parse
    skips) that the body inflates no more than the bound allows: the dearest parse a
    body can still buy, at a wire size ``max_inflation`` times smaller than inflated."""
    total = (16 << 20) - 1024
    noise = random.Random(20).randbytes(total // Limits().max_inflation + 4096)
    tail = varint(99 << 3 | 2) + varint(len(noise)) + noise
    head = pb.Batch(strings=[""]).SerializeToString()
    return _sealed_raw(real, head + b"\x4a\x00" * ((total - len(head) - len(tail)) // 2) + tail)


def _many_strings(real: pb.Batch) -> bytes:
    b = _copy(real)
    b.strings.extend(f"s{i}" for i in range(200_001 - len(b.strings)))
    return _sealed(b)


#: name -> (expected reason, or "" for ACCEPTED, "dup" for DUPLICATE; builder of the wire bytes)
CASES: dict[str, tuple[str, Callable[[pb.Batch], bytes]]] = {
    "accepted (sealed)": ("", _sealed),
    "accepted (not sealed)": ("", lambda b: b.SerializeToString()),
    "duplicate": ("dup", _sealed),
    "boot_id of 65 bytes": ("identity", _spoil(lambda b: setattr(b, "boot_id", "b" * 65))),
    "boot_id of 8 MiB (not sealed)": ("identity", lambda b: _set_boot(b, 8 << 20)),
    "window 400 s ahead": ("window", _spoil(_ahead)),
    "corrupt zstd body": ("encoding", _corrupt_body),
    "random bytes": ("encoding", _random_bytes),
    "a column in both encodings": ("encoding", _spoil(lambda b: b.metrics[-1].label_keys.append(0))),
    "string index out of range": ("strings", _spoil(_bad_index)),
    "17 unreferenced strings": ("strings", _spoil(lambda b: b.strings.extend(f"x{i}" for i in range(17)))),
    "200,001 strings": ("strings", _many_strings),
    "NaN gauge": ("values", _spoil(_nan_gauge)),
    "counters that wrap": ("values", _spoil(_wrap)),
    "stack of 513 frames": ("stacks", _spoil(_deep_stack)),
    "event time 1970": ("events", _spoil(_event_far)),
    "body swallowing the header": ("identity", _spoofed),
    "8 M empty blocks (16 MiB inflated)": ("inflation", _empty_blocks),
    "32 K empty blocks (to the floor)": ("series", _blocks_to_the_floor),
    "8 M empty blocks at 64x (noise beside)": ("series", _blocks_at_the_ratio),
}


def _set_boot(real: pb.Batch, size: int) -> bytes:
    b = _copy(real)
    b.boot_id = "b" * size
    return b.SerializeToString()


def admit(gate: Gate, wire: bytes) -> tuple[int, str]:
    """One message through the ingest path: the parse, then the gate."""
    try:
        batch = parse_batch(wire)
    except BatchRejected as exc:
        return ingest_pb2.Ack.REJECTED, exc.reason
    ack, _, label = gate.admit(batch, None, len(wire))
    return ack.status, label


def quiet_gate() -> Gate:
    """A gate whose rate-limited rejection log (one line per reason per 10 s) goes nowhere,
    without per-node rate limits (this measures what a message costs, not how often one
    node may send it: the CPU limit would answer RETRY after the first second's worth)."""
    gate = Gate(clock=lambda: NOW, rates=RateSettings(batches_per_s=0, bytes_per_s=0, cpu_per_s=0))
    quiet = logging.getLogger("stratoscope.loadtest.rejections")
    quiet.propagate = False
    gate.rejections = RejectionLog(logger=quiet)
    return gate


def per_message_us(wire: bytes, duplicate: bool, n: int) -> float:
    gate = quiet_gate()
    batch = pb.Batch.FromString(wire) if duplicate else None
    t0 = time.thread_time()
    for _ in range(n):
        gate.dedup = Deduplicator()
        if batch is not None:
            gate.dedup.add(batch.node_id, batch.boot_id, batch.seq)
        admit(gate, wire)
    return 1e6 * (time.thread_time() - t0) / n


def inflated_size(wire: bytes) -> int:
    try:
        b = pb.Batch.FromString(wire)
    except Exception:
        return len(wire)
    if b.codec == pb.CODEC_ZSTD:
        size = zstandard.frame_content_size(b.body)
        return size if size >= 0 else len(wire)
    return len(wire)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="rounds (median reported)")
    ap.add_argument("--budget-ms", type=float, default=300, help="CPU per case per round")
    ap.add_argument("--seed", type=int, default=1, help="order of the cases in each round")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()

    real = real_batch()
    wires = {name: build(real) for name, (_, build) in CASES.items()}
    for name, (want, _) in CASES.items():  # every case gets the answer it is named for
        status, label = admit(quiet_gate(), wires[name])
        if want == "dup":
            continue
        expected = (ingest_pb2.Ack.ACCEPTED, "") if not want else (ingest_pb2.Ack.REJECTED, want)
        if (status, label) != expected:
            raise SystemExit(f"{name}: answered {status} {label!r}, expected {expected}")
    counts = {}
    for name, wire in wires.items():  # messages per round: ~budget_ms of CPU
        one = per_message_us(wire, CASES[name][0] == "dup", 1)
        counts[name] = max(3, min(5000, int(args.budget_ms * 1000 / max(one, 1.0))))
    rnd = random.Random(args.seed)
    runs: dict[str, list[float]] = {name: [] for name in CASES}
    for r in range(args.repeat):
        order = list(CASES)
        rnd.shuffle(order)
        for name in order:
            runs[name].append(per_message_us(wires[name], CASES[name][0] == "dup", counts[name]))
        print(f"round {r + 1}/{args.repeat} done", file=sys.stderr, flush=True)
    base = runs["accepted (sealed)"]
    rows = []
    for name, (want, _) in CASES.items():
        us = statistics.median(runs[name])
        ratio = statistics.median(x / b for x, b in zip(runs[name], base, strict=True))
        rows.append({"case": name, "answer": {"": "accepted", "dup": "duplicate"}.get(want, want),
                     "wire_bytes": len(wires[name]), "inflated_bytes": inflated_size(wires[name]),
                     "us_per_message": round(us, 1), "ratio": round(ratio, 3),
                     "runs_us": [round(x, 1) for x in runs[name]], "messages": counts[name]})
    print(f"\nrejection cost per message, code of {commit()}, {time.strftime('%d %b %Y %H:%M')}, "
          f"median of {args.repeat} rounds (CPU of the parse + Gate.admit)\n")
    print(f"{'case':38} {'answer':10} {'wire':>11} {'inflated':>11} {'µs/message':>11} {'ratio':>7}")
    for row in rows:
        print(f"{row['case']:38} {row['answer']:10} {row['wire_bytes']:>11,} {row['inflated_bytes']:>11,} "
              f"{row['us_per_message']:>11,.1f} {row['ratio']:>7.3f}")
    if args.json:
        args.json.write_text(json.dumps({"commit": commit(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
