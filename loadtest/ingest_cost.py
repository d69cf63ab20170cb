#!/usr/bin/env python3
"""CPU per batch of the regional's ingest path, isolated from storage and from windows.

Why: in regional_throughput.py's sustained runs every process shares two cores with the
niced ClickHouse sink, which takes whatever CPU is left; its per-process figures swing
+-25 % from run to run, more than most single changes are worth. This script runs only
the parts on the ingest path, at a fixed paced rate, and prints CPU per accepted batch:

* ``regional`` (default): the real ingest process (regional/ingest.py: gRPC, identity,
  inflate, validate, pack) and, in this process, the real merge side of the hand-over
  (``Regional.accept_admitted``: receive, unpack, record into windows; no sinks, windows
  are never closed, so run it for a minute at most);
* ``ack-only``: a bare grpc.aio server on uvloop that acks every message without reading
  it (the gRPC floor), with the regional's own server options (``--flow-control regional``)
  or gRPC's defaults (``--flow-control default``: BDP probing on).

The load generator is regional_throughput.py's (sealed zstd batches of the same realistic
templates, one batch in flight per stream); its CPU per batch is printed too.

    .venv/bin/python loadtest/ingest_cost.py --repeat 3
    .venv/bin/python loadtest/ingest_cost.py --server ack-only --flow-control default
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import pickle
import statistics
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import regional_throughput as rt  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(stat_path: str) -> float:
    """User + system CPU seconds of a process or thread (/proc/.../stat)."""
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def ack_only_main(port: int, options: list[tuple[str, Any]], ready: Any) -> None:
    """A gRPC server that acks every message unread (runs in a spawned process)."""
    import grpc
    import uvloop

    from stratoscope.v1 import ingest_pb2

    ack = ingest_pb2.Ack(status=ingest_pb2.Ack.ACCEPTED).SerializeToString()

    async def stream(requests: Any, _context: Any) -> Any:
        async for _ in requests:
            yield ack

    async def main() -> None:
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "stratoscope.v1.Ingest", {"Stream": grpc.stream_stream_rpc_method_handler(stream)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.put(True)
        await server.wait_for_termination()

    uvloop.run(main())


from stratoscope.regional import pipes as _pipes  # noqa: E402

_ORIGINAL_RECV = _pipes.read  # wrapped once per run below, always around the original

#: Thread CPU seconds of the merge reader's steps (``_time_reader_steps``), and batches.
STEPS = {"receive": 0.0, "unpack": 0.0, "accept": 0.0, "n": 0.0}


def _time_reader_steps(regional: Any) -> None:
    """Count the merge reader's thread CPU per step: receiving a hand-over message
    (regional/pipes.py), unpacking it (regional/handover.py) and the whole
    ``accept_admitted`` (unpack + record + counters). Wrappers around the real calls, for
    this measurement only (~1 us each)."""
    from stratoscope.regional import handover, ingest, service

    STEPS.update(receive=0.0, unpack=0.0, accept=0.0, n=0.0)
    recv, unpack, accept = _ORIGINAL_RECV, handover.unpack, regional.accept_admitted

    def timed_recv(fd: int) -> Any:
        t = time.thread_time()
        try:
            return recv(fd)
        finally:
            STEPS["receive"] += time.thread_time() - t

    def timed_unpack(buf: Any) -> Any:
        t = time.thread_time()
        cols = unpack(buf)
        STEPS["unpack"] += time.thread_time() - t
        return cols

    def timed_accept(packed: Any, size: int | None, pos: int = 0) -> None:
        t = time.thread_time()
        accept(packed, size, pos)
        STEPS["accept"] += time.thread_time() - t
        STEPS["n"] += 1

    ingest.pipes.read = timed_recv  # type: ignore[attr-defined]
    service.unpack = timed_unpack  # type: ignore[attr-defined]
    regional.accept_admitted = timed_accept


async def one_run(args: argparse.Namespace, templates_path: str, wal_dir: str | None = None) -> dict[str, float]:
    """One paced run; CPU per accepted batch of each part, measured after a 3 s warm-up
    (``wal_dir``: the ingest process logs every batch there before acking it)."""
    ctx = mp.get_context("spawn")
    ingest = regional = server = None
    if args.server == "regional":
        from stratoscope.regional.ingest import IngestProcess, WalSettings
        from stratoscope.regional.merge import MergeSettings
        from stratoscope.regional.server import ServerAuth
        from stratoscope.regional.service import Regional
        from stratoscope.regional.validate import Limits

        regional = Regional(MergeSettings(resolution_s=60, lateness_s=5), [])
        _time_reader_steps(regional)
        wal = None
        if wal_dir is not None:
            wal = WalSettings(Path(wal_dir), fsync=args.wal_fsync)
        ingest = IngestProcess("127.0.0.1:0", ServerAuth(), Limits(), 50_000, on_outcome=regional.count,
                               on_accepted=regional.accept_admitted, wal_settings=wal)
        await ingest.start()
        port = ingest.port
        reader = next(t for t in threading.enumerate() if t.name == "ingest-reader")
        server_stat = f"/proc/{ingest._proc.pid}/stat"  # type: ignore[union-attr]
        reader_stat: str | None = f"/proc/self/task/{reader.native_id}/stat"
    else:
        from stratoscope.regional.server import FLOW_CONTROL, MAX_MESSAGE

        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", MAX_MESSAGE)]
        if args.flow_control == "regional":
            options += FLOW_CONTROL
        port = rt.free_port()
        ready = ctx.Queue()
        server = ctx.Process(target=ack_only_main, args=(port, options, ready), daemon=True)
        server.start()
        await asyncio.to_thread(ready.get)
        server_stat, reader_stat = f"/proc/{server.pid}/stat", None

    parent, child = ctx.Pipe()
    gen = ctx.Process(target=rt.worker_main, args=(0, args.streams, f"127.0.0.1:{port}", templates_path,
                                                   "zstd", child), daemon=True)
    gen.start()
    msg = await asyncio.to_thread(parent.recv)
    if "ready" not in msg:
        raise RuntimeError(f"load generator failed: {msg}")
    total = round(args.rate * rt.EDGE_S)  # simulated nodes, one batch per 10 s each
    ks = [total // args.streams + (1 if g < total % args.streams else 0) for g in range(args.streams)]
    t_start = time.time() + 1.0
    parent.send({"t_start": t_start, "t_stop": t_start + args.seconds, "ks": ks})
    await asyncio.sleep(1.0 + 3.0)
    gen_stat = f"/proc/{gen.pid}/stat"
    s0, g0 = cpu_s(server_stat), cpu_s(gen_stat)
    r0 = cpu_s(reader_stat) if reader_stat else 0.0
    n0 = regional.metrics.batches.labels("accepted")._value.get() if regional else 0.0
    steps0 = dict(STEPS)
    w0 = time.time()
    await asyncio.sleep(args.seconds - 5.0)
    s1, g1 = cpu_s(server_stat), cpu_s(gen_stat)
    r1 = cpu_s(reader_stat) if reader_stat else 0.0
    n1 = regional.metrics.batches.labels("accepted")._value.get() if regional else 0.0
    steps1 = dict(STEPS)
    wall = time.time() - w0
    result = await asyncio.to_thread(parent.recv)
    if "error" in result:
        raise RuntimeError(result["error"])
    if result["status"]["accepted"] == 0 or result["status"]["errors"]:
        raise RuntimeError(f"load generator saw {result['status']}")
    if regional is None:  # the ack-only server counts nothing: the acks inside the span
        acks = array("d", result["ack_t"])
        lo, hi = w0 - t_start, w0 + wall - t_start
        n = float(sum(1 for t in acks if lo <= t < hi))
    else:
        n = n1 - n0
    if not n:
        raise RuntimeError("no batch was accepted in the measured span")
    if ingest is not None:
        await ingest.stop()
    if server is not None:
        server.kill()
    lat = sorted(array("f", result["ack_lat"]))
    out = {"batches": n, "wall_s": wall, "server_ms": 1e3 * (s1 - s0) / n, "generator_ms": 1e3 * (g1 - g0) / n,
           "server_pct": 100 * (s1 - s0) / wall,
           "ack_p50_ms": 1e3 * lat[len(lat) // 2], "ack_p99_ms": 1e3 * lat[int(len(lat) * 0.99)]}
    if reader_stat:  # the same span and batches as every other figure
        d = {k: steps1[k] - steps0[k] for k in STEPS}
        out["reader_ms"] = 1e3 * (r1 - r0) / n
        out["receive_ms"] = 1e3 * d["receive"] / n
        out["unpack_ms"] = 1e3 * d["unpack"] / n
        out["record_ms"] = 1e3 * (d["accept"] - d["unpack"]) / n
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", choices=("regional", "ack-only"), default="regional")
    ap.add_argument("--flow-control", choices=("regional", "default"), default="regional",
                    help="ack-only: the regional's HTTP/2 options (server.FLOW_CONTROL) or gRPC's defaults")
    ap.add_argument("--rate", type=float, default=150.0, help="batches per second offered")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--streams", type=int, default=125, help="gRPC connections, one stream each")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--wal", action="store_true",
                    help="regional: alternate runs without and with the write-ahead log (regional/walwriter.py)")
    ap.add_argument("--wal-fsync", choices=("ack", "interval"), default="ack")
    ap.add_argument("--wal-dir", default=None, help="where the log goes (default: a temporary directory "
                    "under /var/tmp, on disk)")
    args = ap.parse_args()
    if args.seconds < 10:
        ap.error("--seconds must be at least 10 (3 s warm-up, 2 s tail)")

    templates = rt.build_templates(rt.load_real(rt.DATA), 24, 2000, 1 / 3, 1000, 100, 1,
                                   rt.churn_model(rt.MINUTE))
    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as f:
        pickle.dump(templates, f)
    label = args.server + (f" ({args.flow_control} flow control)" if args.server == "ack-only" else "")
    modes: list[str | None] = [None]
    if args.wal:
        if args.server != "regional":
            ap.error("--wal needs --server regional")
        modes = [None, "wal"]
    runs: dict[str | None, list[dict[str, float]]] = {m: [] for m in modes}
    try:
        for k in range(args.repeat):
            for mode in modes if k % 2 == 0 else modes[::-1]:  # alternated: drift hits both
                with tempfile.TemporaryDirectory(dir=args.wal_dir or "/var/tmp") as wal_dir:
                    r = asyncio.run(one_run(args, f.name, wal_dir if mode else None))
                runs[mode].append(r)
                reader = (f", merge reader {r['reader_ms']:.3f} ms (receive {r['receive_ms']:.3f}, unpack "
                          f"{r['unpack_ms']:.3f}, record {r['record_ms']:.3f})" if "reader_ms" in r else "")
                print(f"run {k + 1}{' with the log' if mode else ''}: {r['batches']:.0f} batches in "
                      f"{r['wall_s']:.0f} s at {args.rate:g}/s; "
                      f"{'ingest process' if args.server == 'regional' else 'server'} {r['server_ms']:.3f} ms "
                      f"per batch ({r['server_pct']:.1f} % of a core){reader}, load generator "
                      f"{r['generator_ms']:.3f} ms; ack p50 {r['ack_p50_ms']:.2f} ms, p99 "
                      f"{r['ack_p99_ms']:.2f} ms", flush=True)
    finally:
        os.unlink(f.name)
    meds = {}
    for mode, rs in runs.items():
        med = meds[mode] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        reader = (f", merge reader {med['reader_ms']:.3f} (receive {med['receive_ms']:.3f}, unpack "
                  f"{med['unpack_ms']:.3f}, record {med['record_ms']:.3f})" if "reader_ms" in med else "")
        print(f"{label}{' with the write-ahead log (fsync ' + args.wal_fsync + ')' if mode else ''}, median of "
              f"{len(rs)}: CPU ms per batch: server {med['server_ms']:.3f}{reader}, load generator "
              f"{med['generator_ms']:.3f}; ack p50 {med['ack_p50_ms']:.2f} ms, p99 {med['ack_p99_ms']:.2f} ms")
    if args.wal:
        a, b = meds[None], meds["wal"]
        print(f"write-ahead log / none: ingest CPU per batch {b['server_ms'] / a['server_ms']:.2f}x, "
              f"ack p50 {b['ack_p50_ms'] / a['ack_p50_ms']:.2f}x, ack p99 {b['ack_p99_ms'] / a['ack_p99_ms']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
