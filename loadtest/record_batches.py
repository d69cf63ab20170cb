#!/usr/bin/env python3
"""Record real edge batches for loadtest/regional_throughput.py (needs root: loads BPF).

Runs ``stratoscope edge --interval 10s --duration ... --output jsonl:...`` on this machine
and stores the batches, gzip-compressed JSON lines (``edge.batch.batch_to_dict`` form):

- ``loadtest/data/edge_batch.jsonl.gz``: one 10 s batch, the template the benchmark
  resamples to ``--series`` series per node;
- ``loadtest/data/edge_minute.jsonl.gz`` (``--minute``): eight consecutive 10 s batches
  (a full 60 s regional window whatever the phase), from which the benchmark measures the
  row reduction the regional gets on real series churn (series that do not appear in
  every 10 s batch of a window merge less than 6x);
- ``loadtest/data/edge_profile.jsonl.gz`` (``--profile``): one 60 s batch of the profile
  program alone at 99 Hz, the most profile-heavy batch an edge sends, recorded while
  the machine compiles (loadtest/inflation_ratio.py; tests/unit/test_inflation.py).

    sudo .venv/bin/python loadtest/record_batches.py            # one batch
    sudo .venv/bin/python loadtest/record_batches.py --minute   # a minute of batches
    sudo .venv/bin/python loadtest/record_batches.py --profile  # 60 s of profile alone
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
STRATOSCOPE = HERE.parent / ".venv" / "bin" / "stratoscope"


def record(dest: Path, batches: int, interval_s: int = 10, extra: tuple[str, ...] = ()) -> int:
    with tempfile.TemporaryDirectory(prefix="rt-record-") as d:
        out = Path(d) / "edge.jsonl"
        cmd = [str(STRATOSCOPE), "edge", "--interval", f"{interval_s}s", "--metrics-port", "0",
               "--output", f"jsonl:{out}", *extra]
        cmd += ["--once"] if batches == 1 else ["--duration", f"{batches * interval_s + 3}s"]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, timeout=900)
        lines = [ln for ln in out.read_text().splitlines() if ln.strip()]
    if not lines:
        raise SystemExit("the edge produced no batch")
    lines = lines[:batches]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(dest, "wt") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{dest}: {len(lines)} batch(es), {dest.stat().st_size} bytes", file=sys.stderr)
    return len(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minute", action="store_true", help="record 8 consecutive 10 s batches")
    ap.add_argument("--profile", action="store_true",
                    help="record one 60 s batch of the profile program alone at 99 Hz")
    ap.add_argument("--out", type=Path, help="destination (default: loadtest/data/...)")
    args = ap.parse_args()
    if args.minute:
        record(args.out or HERE / "data" / "edge_minute.jsonl.gz", 8)
    elif args.profile:
        record(args.out or HERE / "data" / "edge_profile.jsonl.gz", 1, 60,
               ("--programs", "profile", "--param", "profile.SAMPLE_HZ=99"))
    else:
        record(args.out or HERE / "data" / "edge_batch.jsonl.gz", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
