#!/usr/bin/env python3
"""CPU to receive one hand-over message across a process boundary: regional/pipes.py
against multiprocessing's own ``send_bytes``/``recv_bytes_into``.

Why: every accepted batch crosses from the ingest process to the merge process (~145 KiB
of packed columns for 2,000 series), and every frame from the frame child to the merge
process and on to each sink (tens of MB). A plain Connection hop goes through
``Connection.recv_bytes_into``, which reads a large message into a BytesIO chunk by
chunk and copies it out again; pipes.py reads straight into the message's buffers.

Each mode forks a writer that sends ``--messages`` messages of ``--size`` bytes (one
out-of-band buffer, like a packed batch) over a duplex Connection; the reader's thread
CPU and wall time per message are printed, median of ``--repeat`` runs.

    .venv/bin/python loadtest/pipe_cost.py
    .venv/bin/python loadtest/pipe_cost.py --size 50000000 --messages 20   # frame-sized
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stratoscope.regional import pipes  # noqa: E402


def connection_send(conn: Connection, payload: bytes) -> None:
    """The plain Connection form: header and buffer as two Connection messages."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(("batch", pickle.PickleBuffer(payload), 1), protocol=5, buffer_callback=buffers.append)
    conn.send_bytes(pickle.dumps(([memoryview(b).nbytes for b in buffers], data), protocol=5))
    for b in buffers:
        conn.send_bytes(b.raw())


def connection_recv(conn: Connection) -> object:
    sizes, data = pickle.loads(conn.recv_bytes())
    bufs = []
    for n in sizes:
        buf = bytearray(n)
        conn.recv_bytes_into(buf)
        bufs.append(buf)
    return pickle.loads(data, buffers=bufs)


def writer(conn: Connection, mode: str, messages: int, size: int) -> None:
    payload = os.urandom(size)
    for _ in range(messages):
        if mode == "pipes":
            pipes.send(conn, ("batch", pickle.PickleBuffer(payload), 1))
        else:
            connection_send(conn, payload)
    conn.recv_bytes()  # hold the socket open until the reader is done


def one_run(mode: str, messages: int, size: int) -> tuple[float, float]:
    a, b = mp.Pipe(duplex=True)
    p = mp.get_context("fork").Process(target=writer, args=(a, mode, messages, size))
    p.start()
    c0, t0 = time.thread_time(), time.perf_counter()
    for _ in range(messages):
        msg = pipes.recv(b) if mode == "pipes" else connection_recv(b)
        assert len(msg[1]) == size  # type: ignore[index]
    c1, t1 = time.thread_time(), time.perf_counter()
    b.send_bytes(b"done")
    p.join()
    a.close()
    b.close()
    return 1e6 * (c1 - c0) / messages, 1e6 * (t1 - t0) / messages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=148_000, help="bytes per message (a packed batch: ~148 kB)")
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    for mode in ("connection", "pipes"):
        runs = [one_run(mode, args.messages, args.size) for _ in range(args.repeat)]
        cpu = statistics.median(r[0] for r in runs)
        wall = statistics.median(r[1] for r in runs)
        print(f"{mode:10s} {args.size:,} B x {args.messages}: receive CPU {cpu:,.1f} us per message, "
              f"wall {wall:,.1f} us (median of {args.repeat})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
