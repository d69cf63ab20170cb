"""Runs a sink in a child process, so its CPU work leaves the regional's GIL.

Why: the regional's event loop acks batches; the merge builds window frames in a
worker thread; the sinks turn frames into Arrow tables, protobuf messages and
inserts. In one process all of that shares one GIL and tops out near one core,
and the event loop waits for the GIL behind sink work (ack p99 of seconds at
300k points/s on 2 cores). In a child process a sink has its own interpreter
and core; the embedded chdb store lives there too.

``ProcessSink`` implements the Sink protocol (plus ``query`` for SQL readers)
for the sink its settings describe (regional/sinks/config.py, validated in the
parent): each call is a ``SinkRequest`` over a ``pipes.Channel`` to the child,
which builds the real sink from the settings, runs it on its own asyncio loop
and answers with a ``SinkReply``: the result, or the error class and message
(``RetriableError`` / ``PermanentError`` cross the boundary as such).
A delivery ships only the rows of the blocks being delivered: for blocks that
are parts of one merged frame, a sub-frame holding just those parts (the frame
itself when all of them are). Frames cross with their arrays out of band
(regional/pipes.py): no copy into or out of a pickle on either side.

The child ignores SIGINT and SIGTERM: the regional drains its windows into the
sinks on shutdown and then stops the child; a child whose parent is gone sees
the pipe close and exits.

Liveness (regional/liveness.py): the parent pings the child every second or so, and
the child answers from its event loop at once, also while a request runs. A child
silent for ``child_timeout_s`` (stopped, its loop stuck) once it has first answered is
hung: logged, counted (``hangs``) and killed. The calls waiting on it fail as
retriable, so the delivery queue retries them, and the retried delivery starts a new
child (as after a crash). That is safe because a delivery is idempotent: a frame sent
again to a new child carries the same insert token and block ids (docs/GUARANTEES.md,
section 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from stratoscope.regional import pipes
from stratoscope.regional.frame import Block, Frame, blocks_of
from stratoscope.regional.liveness import DEFAULT_TIMEOUT_S, Watchdog
from stratoscope.regional.runtime import name_process, tune_gc
from stratoscope.regional.sinks.base import (
    BlockedError,
    PermanentError,
    RetriableError,
    Sink,
    SinkError,
)
from stratoscope.regional.sinks.config import SinkSettings

log = logging.getLogger(__name__)

#: Seconds to wait for the child to exit after "stop".
STOP_TIMEOUT_S = 60.0


# -- messages ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FrameItem:
    """Blocks that are parts of one merged frame: a sub-frame of just those parts."""

    frame: Frame


DeliveryItem = FrameItem


@dataclass(frozen=True, slots=True)
class Start:
    pass


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class HealthCheck:
    pass


@dataclass(frozen=True, slots=True)
class Deliver:
    items: list[DeliveryItem]


@dataclass(frozen=True, slots=True)
class Query:
    sql: str
    parameters: dict[str, Any] | None
    settings: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Ping:
    """Answered at once by the child's event loop, also while a request runs: the
    parent's proof that the child is not hung (regional/liveness.py)."""


SinkCall = Start | Stop | HealthCheck | Deliver | Query | Ping
#: The request id of pings: no caller waits for their answer (real ids start at 1).
PING_ID = 0


@dataclass(frozen=True, slots=True)
class SinkRequest:
    req_id: int
    call: SinkCall


@dataclass(frozen=True, slots=True)
class SinkReply:
    req_id: int
    result: Any = None
    #: None on success; else "RetriableError", "BlockedError", "PermanentError" or
    #: "error" (a bug).
    error_class: str | None = None
    error: str = ""
    #: A BlockedError's reason.
    reason: str = ""


def pack_blocks(blocks: Sequence[Block]) -> list[DeliveryItem]:
    """What crosses the pipe for a delivery: sub-frames of the blocks' parts."""
    by_frame: dict[int, tuple[Frame, list[int]]] = {}
    for b in blocks:
        by_frame.setdefault(id(b.frame), (b.frame, []))[1].append(b.part)
    return [FrameItem(frame.subset(sorted(set(parts)))) for frame, parts in by_frame.values()]


def unpack_blocks(items: list[DeliveryItem]) -> list[Block]:
    return [b for item in items for b in blocks_of(item.frame)]


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


def _child_main(conn: Connection, settings: SinkSettings, log_level: int) -> None:
    refused = None
    name_process("strato-sink-" + {"clickhouse": "ch", "kafka": "kfk"}.get(settings.kind, settings.kind))
    try:
        os.nice(SINK_NICE)  # first: threads started later inherit it
    except OSError as exc:  # a sandbox that refuses setpriority(): run at normal priority
        refused = exc
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [sink %(process)d] %(name)s: %(message)s")
    if refused is not None:
        log.warning("sink %s cannot lower its priority (%s): acks may stall while windows are stored",
                    settings.kind, refused)
    tune_gc()
    if settings.kind == "clickhouse":
        threading.Thread(target=_demote_merges_forever, name="demote-merges", daemon=True).start()
    chan: pipes.Channel[SinkReply, SinkRequest] = pipes.Channel.over(conn)
    import uvloop

    uvloop.run(_child_loop(chan, settings))


def _read_requests(chan: pipes.Channel[SinkReply, SinkRequest], loop: asyncio.AbstractEventLoop,
                   requests: asyncio.Queue[SinkRequest | None],
                   pongs: queue.SimpleQueue[int]) -> None:
    """The child's reader thread: requests go to the loop in order; a ping is answered
    once the loop has run a callback for it (so a stuck loop answers none), by a thread
    of its own (so a busy executor or a long reply cannot hold it up). None: the pipe
    closed."""
    while True:
        try:
            req = chan.recv()
        except (EOFError, OSError):  # the regional is gone
            loop.call_soon_threadsafe(requests.put_nowait, None)
            return
        if isinstance(req.call, Ping):
            loop.call_soon_threadsafe(pongs.put, req.req_id)
            continue
        loop.call_soon_threadsafe(requests.put_nowait, req)
        if isinstance(req.call, Stop):
            return  # nothing follows a Stop: the child exits after answering it


def _send_pongs(chan: pipes.Channel[SinkReply, SinkRequest], pongs: queue.SimpleQueue[int]) -> None:
    while True:
        req_id = pongs.get()
        try:
            chan.send(SinkReply(req_id))
        except (OSError, ValueError):
            return


async def _child_loop(chan: pipes.Channel[SinkReply, SinkRequest], settings: SinkSettings) -> None:
    """Serve the parent's requests one at a time, in order (pings at once, see
    ``_read_requests``)."""
    loop = asyncio.get_running_loop()
    requests: asyncio.Queue[SinkRequest | None] = asyncio.Queue()
    pongs: queue.SimpleQueue[int] = queue.SimpleQueue()
    threading.Thread(target=_read_requests, args=(chan, loop, requests, pongs),
                     name="sink-requests", daemon=True).start()
    threading.Thread(target=_send_pongs, args=(chan, pongs), name="sink-pongs", daemon=True).start()
    sink: Sink | None = None
    while True:
        req = await requests.get()
        if req is None:  # the regional is gone
            if sink is not None:
                await sink.stop()
            return
        call = req.call
        try:
            result: Any = None
            if sink is None:  # built here: what the settings could not check fails a request
                try:
                    sink = settings.build()
                except (OSError, ValueError) as exc:
                    raise PermanentError(f"cannot set up sink {settings.kind}: {exc}") from exc
            if isinstance(call, Start):
                await sink.start()
                result = getattr(sink, "tokens_forgotten", 0)
            elif isinstance(call, Stop):
                await sink.stop()
            elif isinstance(call, HealthCheck):
                await sink.health_check()
                result = list(getattr(sink, "check_notes", ()))
            elif isinstance(call, Deliver):
                result = list(await sink.deliver(unpack_blocks(call.items)) or ())
            elif isinstance(call, Query):
                result = await sink.query(call.sql, call.parameters, call.settings)  # type: ignore[attr-defined]
            else:
                raise ValueError(f"unknown request {call!r}")
            reply = SinkReply(req.req_id, result)
        except BlockedError as exc:
            reply = SinkReply(req.req_id, error_class="BlockedError", error=str(exc), reason=exc.reason)
        except SinkError as exc:
            cls = "RetriableError" if isinstance(exc, RetriableError) else "PermanentError"
            reply = SinkReply(req.req_id, error_class=cls, error=str(exc))
        except Exception as exc:  # a bug in the sink: report it, keep serving
            log.exception("sink %s: %s failed", settings.kind, type(call).__name__)
            reply = SinkReply(req.req_id, error_class="error", error=f"{type(exc).__name__}: {exc}")
        await loop.run_in_executor(None, chan.send, reply)
        if isinstance(call, Stop):
            return


class ProcessSink:
    """A Sink run in a child process (see the module docstring)."""

    def __init__(self, settings: SinkSettings, child_timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """``child_timeout_s``: how long the child may leave a ping unanswered before it
        is taken for hung and killed (see the module docstring)."""
        self.settings = settings
        self.kind = settings.kind
        self.name = settings.kind
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._chan: pipes.Channel[SinkRequest, SinkReply] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._start_lock = asyncio.Lock()
        #: How long stop() waits for the child before terminating it (the owner may
        #: lower it to what is left of its own stop deadline).
        self._join_lock = threading.Lock()
        self.stop_timeout_s = STOP_TIMEOUT_S
        self._loop: asyncio.AbstractEventLoop | None = None
        self.child_timeout_s = child_timeout_s
        #: Child processes found hung and killed (``stratoscope_regional_child_hangs_total``).
        self.hangs = 0
        #: Insert tokens the sink's children forgot at start (ClickHouseSink.tokens_forgotten).
        self.tokens_forgotten = 0
        self._watchdog: Watchdog | None = None

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
                           args=(child, self.settings, logging.getLogger().level),
                           daemon=True)
        proc.start()
        child.close()
        chan: pipes.Channel[SinkRequest, SinkReply] = pipes.Channel.over(parent)
        # each child's calls apart: a dead child's reader fails only the calls sent to it
        pending: dict[int, asyncio.Future[Any]] = {}
        self._proc, self._chan, self._pending = proc, chan, pending
        self._loop = asyncio.get_running_loop()
        if self._watchdog is not None:
            self._watchdog.stop()
        watchdog = Watchdog(f"sink-{self.kind}", self.child_timeout_s,
                            ping=lambda: chan.send(SinkRequest(PING_ID, Ping())),
                            on_hung=lambda silent_s: self._hung(proc, silent_s))
        self._watchdog = watchdog
        threading.Thread(target=self._read, args=(chan, proc, watchdog, pending),
                         name=f"sink-{self.kind}-reader", daemon=True).start()
        # Watched from its first answer (the reader starts the watchdog): a child still
        # importing its libraries has no loop to answer from. This ping is answered as
        # soon as it has one.
        with contextlib.suppress(OSError, ValueError):
            chan.send(SinkRequest(PING_ID, Ping()))

    def _hung(self, proc: multiprocessing.process.BaseProcess, silent_s: float) -> None:
        """The watchdog's verdict (its thread): kill the child. Its reader then fails
        the waiting calls as retriable, and the next call starts a new child."""
        self.hangs += 1
        log.error("sink process %s (pid %s) has not answered for %.0f s (child_timeout %g s): "
                  "killing it; its deliveries are retried in a new one", self.kind, proc.pid,
                  silent_s, self.child_timeout_s)
        proc.kill()  # SIGKILL: a stopped process ends too

    def _read(self, chan: pipes.Channel[SinkRequest, SinkReply],
              proc: multiprocessing.process.BaseProcess, watchdog: Watchdog,
              pending: dict[int, asyncio.Future[Any]]) -> None:
        """Reader thread: hands every reply to the future waiting for it (in ``pending``,
        the calls sent to this child)."""
        while True:
            try:
                reply = chan.recv()
            except (EOFError, OSError):
                watchdog.stop()
                self._wait(proc, 1.0)
                gone = RetriableError(f"sink process {self.kind} exited (code {proc.exitcode})")
                for waiting in list(pending.values()):
                    self._resolve(waiting, None, gone)
                pending.clear()
                return
            watchdog.start()  # from the first answer on (idempotent)
            watchdog.heard()
            fut = pending.pop(reply.req_id, None)
            if fut is None:
                continue  # a ping's answer, or its caller timed out and left
            if reply.error_class is None:
                self._resolve(fut, reply.result, None)
            else:
                err: Exception
                if reply.error_class == "BlockedError":
                    err = BlockedError(reply.error, reply.reason)
                elif reply.error_class == "RetriableError":
                    err = RetriableError(reply.error)
                elif reply.error_class == "PermanentError":
                    err = PermanentError(reply.error)
                else:
                    err = RuntimeError(reply.error)
                self._resolve(fut, None, err)

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

    async def _call(self, call: SinkCall) -> Any:
        chan, pending = self._chan, self._pending
        if not self.alive or chan is None:
            raise RetriableError(f"sink process {self.kind} is not running")
        req_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        pending[req_id] = fut
        try:
            await asyncio.to_thread(chan.send, SinkRequest(req_id, call))
        except (OSError, ValueError) as exc:
            pending.pop(req_id, None)
            raise RetriableError(f"sink process {self.kind}: {exc}") from exc
        return await fut

    # -- Sink protocol -------------------------------------------------------------
    async def start(self) -> None:
        async with self._start_lock:
            if not self.alive:
                self._spawn()
            self.tokens_forgotten += await self._call(Start()) or 0

    async def stop(self) -> None:
        """Ask the child to stop (its sink flushes and disconnects), for at most
        ``stop_timeout_s``; a child that has not exited by then is terminated, then killed.
        (A sink whose server is down can hang in its own stop: a Kafka producer flushing
        to a broker that is gone. What it held is still in the regional's log.)"""
        async with self._start_lock:
            if self._watchdog is not None:  # from here stop() has its own deadline
                self._watchdog.stop()
            if not self.alive:
                return
            deadline = time.monotonic() + self.stop_timeout_s
            try:
                await asyncio.wait_for(self._call(Stop()), max(0.1, self.stop_timeout_s))
            except SinkError as exc:
                log.warning("sink process %s: stop failed: %s", self.kind, exc)
            except TimeoutError:
                log.warning("sink process %s: its sink did not stop within %gs", self.kind, self.stop_timeout_s)
            proc = self._proc
            assert proc is not None
            if not await asyncio.to_thread(self._wait, proc, max(0.1, deadline - time.monotonic())):
                log.warning("sink process %s did not exit; terminating it", self.kind)
                proc.terminate()
                if not await asyncio.to_thread(self._wait, proc, 5):
                    proc.kill()
                    await asyncio.to_thread(self._wait, proc, 5)
            if self._chan is not None:
                self._chan.close()
            self._proc = self._chan = None

    def _wait(self, proc: multiprocessing.process.BaseProcess, timeout_s: float) -> bool:
        """Join ``proc`` for up to ``timeout_s``; whether it has exited. One join at a time
        (the reader thread joins a child whose pipe closed, stop() joins it too): two
        concurrent joins race in waitpid, and the loser took a child that had exited for
        one still running."""
        with self._join_lock:
            proc.join(timeout_s)
            return proc.exitcode is not None

    async def health_check(self) -> None:
        await self._call(HealthCheck())

    async def check(self) -> list[str]:
        """Run the health check; return what the sink noted at start that an operator
        should act on (e.g. a retention that differs from the settings), one line each."""
        return list(await self._call(HealthCheck()) or ())

    async def deliver(self, blocks: list[Block]) -> list[str]:
        """Deliver in the child; returns the ids it wrote to its dead-letter directory."""
        if not blocks:
            return []
        if not self.alive:  # crashed: a new child, then the retried delivery goes there
            await self.start()
        items = await asyncio.to_thread(pack_blocks, blocks)
        return list(await self._call(Deliver(items)) or ())

    async def query(self, sql: str, parameters: dict[str, Any] | None = None,
                    settings: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """SELECT through the child's sink (the owner of an embedded store)."""
        return await self._call(Query(sql, parameters, settings))  # type: ignore[no-any-return]
