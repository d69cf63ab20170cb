"""gRPC ingest in a process of its own, so acks never wait for the merge.

Why: acking a batch costs ~1 ms of Python (identity, de-duplication, inflating and
validating it); closing a window and handing its frames to the sinks costs seconds
of the merge process's GIL. When the ack waited for the merge (one try: the merge
validated and returned the verdict, saving the ingest process ~1 ms a batch), acks
queued behind those seconds: p99 4.5 s at 190k points/s. So the ingest process runs
the gRPC server and the whole ``Gate`` (identity, de-duplication, backpressure,
validation) and answers every batch itself; accepted batches travel as their
decoded columns (regional/handover.py: no second parse or decode) to the regional
process, which merges them and feeds the sinks.

Pipe protocol (one duplex pipe):

- ingest -> regional (regional/pipes.py: the packed columns out of band, no pickle
  copy): ``("port", n)`` once the server listens; ``("batch", packed columns, size)``
  per accepted batch (validated: the regional only maps them);
  ``("stat", status, reason)`` per other outcome (for the regional's /metrics);
  ``("barrier", n)`` echoes a barrier once every batch acked before it has been
  sent; ``("stopped",)`` last.
- regional -> ingest (plain ``Connection.send``): ``("pressure", blocks, held_full, closed)``
  (the largest sink backlog: RETRY past the limit; whether the merge's windows hold
  their maximum of points: RETRY; whether the regional is draining: RETRY),
  ``("barrier", n)``, ``("stop", grace_s)``. Messages are handled in order, so a
  barrier answered after a pressure message means the gate applies it.

An accepted batch is acked when it is in the bounded hand-over queue (in memory,
not yet durable); a full queue answers RETRY. The ingest process ignores
SIGINT/SIGTERM (the regional stops it in order: server first, then the queue is
drained, then windows are flushed) and exits when the pipe closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from stratoscope.regional import pipes
from stratoscope.regional.handover import pack
from stratoscope.regional.runtime import tune_gc
from stratoscope.regional.server import ServerTls, serve
from stratoscope.regional.service import Gate
from stratoscope.regional.validate import Limits
from stratoscope.v1 import ingest_pb2

log = logging.getLogger("stratoscope.regional")

#: Bytes of accepted batches waiting to cross to the regional process, past which the
#: gate answers RETRY. Batches cross as decoded columns (~145 KiB for 2,000 series; about
#: the inflated size, up to the validation limit of 16 MiB), so the bound is in bytes:
#: 256 MiB is ~1,800 ordinary batches, ~9 s at 200 batches/s.
HANDOVER_BYTES = 256 << 20


class _Admission:
    """What the gRPC service calls: the gate, then the hand-over queue.

    The queue itself is unbounded (outcome messages must never block the event
    loop); accepted batches are bounded by ``HANDOVER_BYTES``: past it, RETRY.
    ``queued_bytes``/``sent_bytes`` are each written by one thread only (loop / sender).
    """

    def __init__(self, gate: Gate, out: queue.SimpleQueue[tuple[Any, ...]]) -> None:
        self.gate = gate
        self.out = out
        self.queued_bytes = 0
        self.sent_bytes = 0
        gate.saturated = lambda: self.queued_bytes - self.sent_bytes >= HANDOVER_BYTES

    def accept(self, batch: Any, peer_node: str | None = None, size: int | None = None) -> ingest_pb2.Ack:
        ack, cols, label = self.gate.admit(batch, peer_node, size)
        if cols is not None:
            # The decoded columns, packed (regional/handover.py): the merge maps them
            # without parsing or decoding the batch again.
            wire = pack(cols)
            self.queued_bytes += len(wire)
            self.out.put(("batch", wire, size))
        else:
            self.out.put(("stat", ack.status, label))
        return ack


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
                if msg[0] == "batch":  # the columns out of band: written as they are
                    pipes.send(conn, ("batch", pickle.PickleBuffer(msg[1]), msg[2]))
                else:
                    pipes.send(conn, msg)
            except (OSError, ValueError):
                return
            if msg[0] == "batch":
                admission.sent_bytes += len(msg[1])
            if msg[0] == "stopped":
                return

    send_thread = threading.Thread(target=sender, name="ingest-handover", daemon=True)
    send_thread.start()
    out.put(("port", server.bound_port))  # type: ignore[attr-defined]
    while True:
        try:
            msg = await loop.run_in_executor(None, conn.recv)
        except (EOFError, OSError):  # the regional is gone
            await server.stop(0)
            return
        if msg[0] == "pressure":
            gate.backlog, gate.held_full, gate.closed = msg[1], msg[2], msg[3]
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
                 on_wire: Callable[[memoryview, int | None], None]) -> None:
        """Both run in a reader thread: ``on_batch(status, label, None, size)`` counts a
        batch the ingest process did not accept; ``on_wire(packed columns, size)``
        merges an accepted one."""
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
                msg = pipes.recv(self._conn)
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
                    self.on_wire(msg[1], msg[2])
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

    def set_pressure(self, blocks: int, held_full: bool, closed: bool) -> None:
        """Tell the gate the sink backlog, whether the merge's windows are at their
        memory bound and whether admission is closed: it answers RETRY on any of them.
        (Applied once a ``barrier()`` sent after it returns.)"""
        self._send(("pressure", blocks, held_full, closed))

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
