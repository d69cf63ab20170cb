"""What one write-ahead-log acknowledgement waits for: appending vs a preallocated segment.

The regional acknowledges a batch once an fdatasync covers it (regional/walwriter.py).
This script times that wait with the real ``WalWriter``, one batch at a time (each its
own write and fdatasync), in two configurations interleaved in paired rounds:

- ``append``: a segment that grows with every write (each fdatasync also commits the
  new file size: a journal commit);
- ``prepared``: a segment zero-filled and synced beforehand (regional/wal.py
  ``prepare_spare``), overwritten in place.

Beside it, a background writer dirties the same file system the way ClickHouse's inserts
and merges do (1 MiB writes, an fsync every ``--bg-sync-mib``), so a journal commit has
other files' data to wait for. Prints p50, p99 and max per configuration and the ratio
prepared/append of each, measured in the same run.

    .venv/bin/python loadtest/wal_fsync.py [--rounds 5] [--appends 300] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from stratoscope.regional import wal
from stratoscope.regional.dedup import Deduplicator
from stratoscope.regional.walwriter import WalWriter


def background_writer(directory: str, sync_mib: int, stop: multiprocessing.synchronize.Event) -> None:
    path = os.path.join(directory, "background.bin")
    chunk = os.urandom(1 << 20)
    while not stop.is_set():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for i in range(1, 257):
                os.write(fd, chunk)
                if i % sync_mib == 0:
                    os.fsync(fd)
                if stop.is_set():
                    break
        finally:
            os.close(fd)


def one_round(base: Path, prepared: bool, appends: int, record: bytes) -> list[float]:
    directory = Path(tempfile.mkdtemp(prefix="wal-", dir=base))
    try:
        seg_bytes = 64 << 20
        if prepared:
            assert wal.prepare_spare(directory, seg_bytes)
        writer = WalWriter(directory, Deduplicator(), segment_bytes=seg_bytes)
        writer.start()
        assert writer.prepared == prepared
        waits: list[float] = []
        done = threading.Event()
        try:
            for i in range(appends):
                done.clear()
                t0 = time.perf_counter()
                writer.append(record, ("node", "boot", i), lambda pos: done.set())
                if not done.wait(60):
                    raise RuntimeError("an append was not answered in 60 s")
                waits.append(time.perf_counter() - t0)
        finally:
            writer.close()
        return waits
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--appends", type=int, default=300, help="appends per configuration and round")
    ap.add_argument("--record-kib", type=int, default=16, help="bytes per batch record (KiB)")
    ap.add_argument("--bg-sync-mib", type=int, default=32, help="background writer: fsync every N MiB (0: no background writer)")
    ap.add_argument("--dir", default="/var/tmp", help="where the logs go (the file system under test)")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="wal-fsync-", dir=args.dir))
    stop = multiprocessing.Event()
    bg = None
    if args.bg_sync_mib:
        bg = multiprocessing.Process(target=background_writer, args=(str(base), args.bg_sync_mib, stop), daemon=True)
        bg.start()
        time.sleep(1.0)  # let it dirty some pages first
    record = wal.batch_record(time.time_ns(), os.urandom(args.record_kib * 1024))
    results: dict[str, list[float]] = {"append": [], "prepared": []}
    try:
        for r in range(args.rounds):
            order = ["append", "prepared"] if r % 2 == 0 else ["prepared", "append"]
            for name in order:
                waits = one_round(base, name == "prepared", args.appends, record)
                results[name] += waits
                waits.sort()
                print(f"round {r} {name:9s} p50 {statistics.median(waits) * 1e3:7.2f} ms   "
                      f"p99 {waits[int(len(waits) * 0.99)] * 1e3:8.2f} ms   max {waits[-1] * 1e3:8.2f} ms", flush=True)
    finally:
        stop.set()
        if bg is not None:
            bg.join(10)
        shutil.rmtree(base, ignore_errors=True)

    def q(v: list[float], f: float) -> float:
        s = sorted(v)
        return s[min(len(s) - 1, int(len(s) * f))] * 1e3

    print(f"\n{'':10s} {'p50 ms':>9s} {'p99 ms':>9s} {'max ms':>9s}   ({args.rounds} rounds x {args.appends} appends of "
          f"{args.record_kib} KiB, background fsync every {args.bg_sync_mib} MiB)")
    for name, v in results.items():
        print(f"{name:10s} {q(v, 0.5):9.2f} {q(v, 0.99):9.2f} {max(v) * 1e3:9.2f}")
    a, p = results["append"], results["prepared"]
    print(f"{'ratio':10s} {q(p, 0.5) / q(a, 0.5):8.2f}x {q(p, 0.99) / q(a, 0.99):8.2f}x {max(p) / max(a):8.2f}x   (prepared / append)")


if __name__ == "__main__":
    main()
