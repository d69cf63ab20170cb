"""gRPC ingest in a process of its own, so acks never wait behind a window close.

Why: closing a window costs seconds (group-by of millions of points, then the
frames for the sinks) and the sinks' encoding is heavy; in one process they share
one GIL with the gRPC server, and acks queued behind them (p99 of seconds at 300k
points/s on 2 cores). Here the ingest process runs the gRPC server and the first
half of the ``Gate``: identity, de-duplication and backpressure, decided from the
batch's identity alone. A batch that passes crosses as its wire bytes (compressed,
if it came sealed) to the regional process, which opens, validates and merges it
(decoded once, where it is used) and answers with the verdict; the ingest process
acks with that verdict. An ACCEPTED ack therefore means: merged into its window
(in memory, not yet durable).

Pipe protocol (one duplex pipe):

- ingest -> regional: ``("port", n)`` once the server listens; ``("batch", id, wire
  bytes, size)`` per screened batch; ``("stat", status, reason)`` per batch answered
  by the screen (for the regional's /metrics); ``("barrier", n)`` echoes a barrier
  once every batch screened before it has been sent; ``("stopped",)`` last.
- regional -> ingest: ``("verdict", id, status, reason)`` per batch; ``("backlog",
  blocks)`` (the largest sink backlog: RETRY past the limit), ``("barrier", n)``,
  ``("stop", grace_s)``.

Batches in flight to the regional are bounded (``HANDOVER_QUEUE``: past it, RETRY).
The ingest process ignores SIGINT/SIGTERM (the regional stops it in order: server
first, then every batch in flight gets its verdict, then windows are flushed) and
exits when the pipe closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import queue
import signal
import threading
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

from regional.runtime import tune_gc
from regional.server import ServerTls, serve
from regional.service import Gate
from regional.validate import Limits
from stratoscope.v1 import ingest_pb2

log = logging.getLogger("stratoscope.regional")

#: Batches in flight to the regional process (~25 KiB each, sealed): past it, RETRY.
HANDOVER_QUEUE = 2000


class _Admission:
    """What the gRPC service calls: the gate's screen, then the hand-over.

    The queue itself is unbounded (outcome messages must never block the event
    loop); batches in flight are bounded by ``HANDOVER_QUEUE``. Runs on the event
    loop only, except ``sent``, written by the sender thread alone.
    """

    def __init__(self, gate: Gate, out: queue.SimpleQueue[tuple[Any, ...]]) -> None:
        self.gate = gate
        self.out = out
        self.sent = 0
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.Future[tuple[int, str]], tuple[str, str, int]]] = {}
        gate.saturated = lambda: len(self._waiting) >= HANDOVER_QUEUE

    def accept(self, batch: Any, peer_node: str | None = None, size: int | None = None,
               raw: bytes | None = None) -> ingest_pb2.Ack | Awaitable[ingest_pb2.Ack]:
        ack, label = self.gate.screen(batch, peer_node)
        if ack is not None:
            self.out.put(("stat", ack.status, label))
            return ack
        key = (batch.node_id, batch.boot_id, batch.seq)
        self.gate.pending.add(key)
        n = next(self._ids)
        fut: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        self._waiting[n] = (fut, key)
        # The wire bytes, not decoded columns: they cross in a third of the size and
        # are decoded once, by the merge.
        self.out.put(("batch", n, raw if raw is not None else batch.SerializeToString(), size))
        return self._ack(fut, batch.boot_id, batch.seq)

    @staticmethod
    async def _ack(fut: asyncio.Future[tuple[int, str]], boot_id: str, seq: int) -> ingest_pb2.Ack:
        # shielded: a stream cancelled meanwhile must not cancel the verdict's future
        status, reason = await asyncio.shield(fut)
        return ingest_pb2.Ack(boot_id=boot_id, seq=seq, status=status, reason=reason)  # type: ignore[arg-type]

    def verdict(self, n: int, status: int, reason: str) -> None:
        fut, key = self._waiting.pop(n)
        self.gate.pending.discard(key)
        if status == ingest_pb2.Ack.ACCEPTED:
            self.gate.dedup.add(*key)
        if not fut.done():
            fut.set_result((status, reason))

    def fail_all(self, why: str) -> None:
        """The regional is gone: no verdict will come (the streams end with an error)."""
        for fut, _ in self._waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError(why))
        self._waiting.clear()


def _ingest_main(conn: Connection, listen: str, tls: ServerTls | None, limits: Limits,
                 max_queued_blocks: int, log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [ingest %(process)d] %(name)s: %(message)s")
    import uvloop

    tune_gc()
    uvloop.run(_ingest_loop(conn, listen, tls, limits, max_queued_blocks))


async def _ingest_loop(conn: Connection, listen: str, tls: ServerTls | None, limits: Limits,
                       max_queued_blocks: int) -> None:
    loop = asyncio.get_running_loop()
    out: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
    gate = Gate(limits, max_queued_blocks=max_queued_blocks)
    admission = _Admission(gate, out)
    server = await serve(admission, listen, tls)  # type: ignore[arg-type]

    def sender() -> None:  # pickles and writes: off the event loop
        while True:
            msg = out.get()
            try:
                conn.send(msg)
            except (OSError, ValueError):
                return
            if msg[0] == "batch":
                admission.sent += 1
            if msg[0] == "stopped":
                return

    send_thread = threading.Thread(target=sender, name="ingest-handover", daemon=True)
    send_thread.start()
    out.put(("port", server.bound_port))  # type: ignore[attr-defined]
    while True:
        try:
            msg = await loop.run_in_executor(None, conn.recv)
        except (EOFError, OSError):  # the regional is gone
            admission.fail_all("the regional process is gone")
            await server.stop(0)
            return
        if msg[0] == "verdict":
            admission.verdict(msg[1], msg[2], msg[3])
        elif msg[0] == "backlog":
            gate.backlog = msg[1]
        elif msg[0] == "barrier":
            out.put(msg)
        elif msg[0] == "stop":
            await server.stop(msg[1])
            out.put(("stopped",))
            await loop.run_in_executor(None, send_thread.join)
            return


class IngestProcess:
    """The regional's handle on its ingest process."""

    def __init__(self, listen: str, tls: ServerTls | None, limits: Limits, max_queued_blocks: int,
                 on_batch: Callable[[int, str, Any, int | None], None],
                 on_wire: Callable[[bytes, int | None], tuple[int, str]]) -> None:
        """Both run in a reader thread: ``on_batch(status, label, None, size)`` counts a
        batch the ingest process answered itself; ``on_wire(wire bytes, size)`` checks
        and merges a screened batch and returns its verdict (status, reason)."""
        self.listen = listen
        self.tls = tls
        self.limits = limits
        self.max_queued_blocks = max_queued_blocks
        self.on_batch = on_batch
        self.on_wire = on_wire
        self.port = 0
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._barriers = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._port_ready = threading.Event()
        self._stopped = threading.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Called (in the event loop) if the ingest process dies on its own.
        self.on_exit: Callable[[int | None], None] | None = None

    async def start(self, timeout_s: float = 60.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(
            target=_ingest_main, name="stratoscope-ingest", daemon=True,
            args=(child, self.listen, self.tls, self.limits, self.max_queued_blocks,
                  logging.getLogger().level),
        )
        self._proc.start()
        child.close()
        self._conn = parent
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, name="ingest-reader", daemon=True).start()
        ok = await asyncio.to_thread(self._port_ready.wait, timeout_s)
        if not ok or not self.port:
            code = self._proc.exitcode
            raise OSError(f"ingest process did not start listening on {self.listen} (exit code {code})")

    def _read(self) -> None:
        assert self._conn is not None
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                self._port_ready.set()
                self._stopped.set()
                for n in list(self._waiting):
                    self._release(n)
                if not self._stopping and self.on_exit is not None and self._loop is not None:
                    proc = self._proc
                    code = proc.exitcode if proc is not None else None
                    log.error("the ingest process exited unexpectedly (code %s)", code)
                    self._loop.call_soon_threadsafe(self.on_exit, code)
                return
            kind = msg[0]
            try:
                if kind == "batch":
                    try:
                        status, reason = self.on_wire(msg[2], msg[3])
                    except Exception as exc:  # a bug here must still answer the edge
                        log.exception("merging a batch failed")
                        status, reason = ingest_pb2.Ack.REJECTED, f"internal error: {exc}"
                    self._send(("verdict", msg[1], status, reason))
                elif kind == "stat":
                    self.on_batch(msg[1], msg[2], None, None)
                elif kind == "port":
                    self.port = msg[1]
                    self._port_ready.set()
                elif kind == "barrier":
                    self._release(msg[1])
                elif kind == "stopped":
                    self._stopped.set()
                    return
            except Exception:  # a bug in the merge must not stop ingest
                log.exception("handling %s from the ingest process failed", kind)

    def _release(self, n: int) -> None:
        fut = self._waiting.pop(n, None)
        if fut is None or self._loop is None:
            return

        def done() -> None:
            if not fut.done():
                fut.set_result(None)

        self._loop.call_soon_threadsafe(done)

    def _send(self, msg: tuple[Any, ...]) -> None:
        if self._conn is None:
            return
        with self._send_lock, contextlib.suppress(OSError, ValueError):
            self._conn.send(msg)

    def set_backlog(self, blocks: int) -> None:
        self._send(("backlog", blocks))

    async def barrier(self) -> None:
        """Returns once every batch acked so far has been handed to ``on_batch``."""
        if self._proc is None or not self._proc.is_alive():
            return
        n = next(self._barriers)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[n] = fut
        self._send(("barrier", n))
        await fut

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting (the server gets ``grace_s``), then hand over what was acked."""
        if self._proc is None:
            return
        self._stopping = True
        if self._proc.is_alive():
            self._send(("stop", grace_s))
            await asyncio.to_thread(self._stopped.wait, grace_s + 60)
        await asyncio.to_thread(self._proc.join, 10)
        if self._proc.is_alive():
            self._proc.terminate()
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None
