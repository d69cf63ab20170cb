"""Runs a sink in a child process, so its CPU work leaves the regional's GIL.

Why: the regional's event loop acks batches; the merge builds window frames in a
worker thread; the sinks turn frames into Arrow tables, protobuf messages and
inserts. In one process all of that shares one GIL and tops out near one core,
and the event loop waits for the GIL behind sink work (ack p99 of seconds at
300k points/s on 2 cores). In a child process a sink has its own interpreter
and core; the embedded chdb store lives there too.

``ProcessSink`` implements the Sink protocol (plus ``query`` for SQL readers):
each call is a request over a pipe to the child, which runs the real sink on
its own asyncio loop and answers with the result or the error class and
message (``RetriableError`` / ``PermanentError`` cross the boundary as such).
A delivery ships only the rows of the blocks being delivered: for blocks that
are parts of one merged frame, a sub-frame holding just those parts (the frame
itself when all of them are). Frames cross with their arrays out of band
(regional/pipes.py): no copy into or out of a pickle on either side.

The child ignores SIGINT and SIGTERM: the regional drains its windows into the
sinks on shutdown and then stops the child; a child whose parent is gone sees
the pipe close and exits.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from stratoscope.regional import pipes
from stratoscope.regional.frame import Frame, blocks_of
from stratoscope.regional.runtime import tune_gc
from stratoscope.regional.sinks.base import Block, PermanentError, RetriableError, Sink, SinkError

log = logging.getLogger(__name__)

#: Seconds to wait for the child to exit after "stop".
STOP_TIMEOUT_S = 60.0


def make_sink(kind: str, kwargs: dict[str, Any]) -> Sink:
    """The sinks a child can run, by name (the child imports only what it needs)."""
    if kind == "clickhouse":
        from stratoscope.regional.sinks.clickhouse import ClickHouseSink

        return ClickHouseSink(**kwargs)
    if kind == "kafka":
        from stratoscope.regional.sinks.kafka import KafkaSink

        return KafkaSink(**kwargs)
    raise ValueError(f"unknown sink kind {kind!r}")


def pack_blocks(blocks: Sequence[Block]) -> list[tuple[Any, ...]]:
    """What crosses the pipe for a delivery: sub-frames of the blocks' parts."""
    by_frame: dict[int, tuple[Frame, list[int]]] = {}
    for b in blocks:
        by_frame.setdefault(id(b.frame), (b.frame, []))[1].append(b.part)
    return [("frame", frame.subset(sorted(set(parts)))) for frame, parts in by_frame.values()]


def unpack_blocks(items: list[tuple[Any, ...]]) -> list[Block]:
    return [b for _, f in items for b in blocks_of(f)]


#: Niceness a sink process adds to its own (inherited by every thread it starts, e.g. chdb's
#: insert and background-merge threads). Storing a window is batch work with a minute
#: to finish; acks are not. At the same priority, chdb's merge threads outnumber the
#: ingest process's one busy thread while a window is stored, and acks stall for
#: seconds on 2 cores. Like the frame child (regional/forkframe.py), sinks yield.
SINK_NICE = 10

#: Niceness of the embedded ClickHouse's background merge threads (comm ``MergeMutate``),
#: below the rest of the sink: a window is stored once its inserts are done, not its
#: merges, so on a busy machine the insert should get the core first. Merges still run
#: (nice 19 has a share, unlike SCHED_IDLE), so parts cannot pile up unbounded.
MERGE_NICE = 19
MERGE_THREAD_PREFIX = "MergeMutate"


def demote_merge_threads(seen: set[int], nice: int = MERGE_NICE) -> int:
    """Set ``nice`` on this process's merge threads not in ``seen``; returns how many.

    Linux applies setpriority(PRIO_PROCESS, tid) to one thread. ClickHouse starts its
    background pool lazily, so the sink calls this every few seconds.
    """
    done = 0
    for tid_s in os.listdir("/proc/self/task"):
        tid = int(tid_s)
        if tid in seen:
            continue
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            if name.startswith(MERGE_THREAD_PREFIX):
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                seen.add(tid)
                done += 1
        except OSError:  # the thread ended, or setpriority is refused: do not retry
            seen.add(tid)
    return done


def _demote_merges_forever(every_s: float = 2.0) -> None:
    seen: set[int] = set()
    while True:
        demote_merge_threads(seen)
        time.sleep(every_s)


def _child_main(conn: Connection, kind: str, kwargs: dict[str, Any], log_level: int) -> None:
    refused = None
    try:
        os.nice(SINK_NICE)  # first: threads started later inherit it
    except OSError as exc:  # a sandbox that refuses setpriority(): run at normal priority
        refused = exc
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [sink %(process)d] %(name)s: %(message)s")
    if refused is not None:
        log.warning("sink %s cannot lower its priority (%s): acks may stall while windows are stored",
                    kind, refused)
    tune_gc()
    if kind == "clickhouse":
        threading.Thread(target=_demote_merges_forever, name="demote-merges", daemon=True).start()
    try:
        import uvloop

        uvloop.run(_child_loop(conn, make_sink(kind, kwargs)))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_child_loop(conn, make_sink(kind, kwargs)))


async def _child_loop(conn: Connection, sink: Sink) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            req_id, op, args = await loop.run_in_executor(None, pipes.recv, conn)
        except (EOFError, OSError):  # the regional is gone
            await sink.stop()
            return
        try:
            result: Any = None
            if op == "start":
                await sink.start()
            elif op == "stop":
                await sink.stop()
            elif op == "health":
                await sink.health_check()
            elif op == "deliver":
                await sink.deliver(unpack_blocks(args[0]))
            elif op == "query":
                result = await sink.query(*args)  # type: ignore[attr-defined]
            else:
                raise ValueError(f"unknown request {op!r}")
            reply: tuple[Any, ...] = (req_id, "ok", result)
        except SinkError as exc:
            reply = (req_id, type(exc).__name__, str(exc))
        except Exception as exc:  # a bug in the sink: report it, keep serving
            log.exception("sink %s: %s failed", sink.name, op)
            reply = (req_id, "error", f"{type(exc).__name__}: {exc}")
        await loop.run_in_executor(None, pipes.send, conn, reply)
        if op == "stop":
            return


class ProcessSink:
    """A Sink run in a child process (see the module docstring)."""

    def __init__(self, kind: str, name: str, **kwargs: Any) -> None:
        self.kind = kind
        self.name = name
        self._kwargs = kwargs
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._send_lock = threading.Lock()
        self._start_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc is not None else None
        return f"ProcessSink({self.kind!r}, pid={pid})"

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    # -- process ------------------------------------------------------------------
    def _spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_child_main, name=f"stratoscope-sink-{self.kind}",
                           args=(child, self.kind, self._kwargs, logging.getLogger().level),
                           daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(parent, proc), name=f"sink-{self.kind}-reader",
                         daemon=True).start()

    def _read(self, conn: Connection, proc: multiprocessing.process.BaseProcess) -> None:
        """Reader thread: hands every reply to the future waiting for it."""
        while True:
            try:
                req_id, status, payload = pipes.recv(conn)
            except (EOFError, OSError):
                proc.join(1.0)
                err = RetriableError(f"sink process {self.kind} exited (code {proc.exitcode})")
                for waiting in list(self._pending.values()):
                    self._resolve(waiting, None, err)
                self._pending.clear()
                return
            if req_id not in self._pending:
                continue  # its caller timed out and left
            fut = self._pending.pop(req_id)
            if status == "ok":
                self._resolve(fut, payload, None)
            else:
                cls = {"RetriableError": RetriableError, "PermanentError": PermanentError}.get(status)
                self._resolve(fut, None, cls(payload) if cls else RuntimeError(payload))

    def _resolve(self, fut: asyncio.Future[Any], value: Any, err: BaseException | None) -> None:
        def done() -> None:
            if fut.done():
                return
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(value)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(done)

    async def _call(self, op: str, *args: Any) -> Any:
        if not self.alive or self._conn is None:
            raise RetriableError(f"sink process {self.kind} is not running")
        req_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        conn = self._conn

        def send() -> None:
            with self._send_lock:
                pipes.send(conn, (req_id, op, args))

        try:
            await asyncio.to_thread(send)
        except (OSError, ValueError) as exc:
            self._pending.pop(req_id, None)
            raise RetriableError(f"sink process {self.kind}: {exc}") from exc
        return await fut

    # -- Sink protocol -------------------------------------------------------------
    async def start(self) -> None:
        async with self._start_lock:
            if not self.alive:
                self._spawn()
            await self._call("start")

    async def stop(self) -> None:
        async with self._start_lock:
            if not self.alive:
                return
            try:
                await self._call("stop")
            except SinkError as exc:
                log.warning("sink process %s: stop failed: %s", self.kind, exc)
            proc = self._proc
            assert proc is not None
            await asyncio.to_thread(proc.join, STOP_TIMEOUT_S)
            if proc.is_alive():
                log.warning("sink process %s did not exit; terminating it", self.kind)
                proc.terminate()
            if self._conn is not None:
                self._conn.close()
            self._proc = self._conn = None

    async def health_check(self) -> None:
        await self._call("health")

    async def deliver(self, blocks: list[Block]) -> None:
        if not blocks:
            return
        if not self.alive:  # crashed: a new child, then the retried delivery goes there
            await self.start()
        items = await asyncio.to_thread(pack_blocks, blocks)
        await self._call("deliver", items)

    async def query(self, sql: str, parameters: dict[str, Any] | None = None,
                    settings: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """SELECT through the child's sink (the owner of an embedded store)."""
        return await self._call("query", sql, parameters, settings)  # type: ignore[no-any-return]
