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

Channel (regional/pipes.py: one duplex pipe, typed messages, the packed columns out
of band, no pickle copy):

- ingest -> regional (``IngestEvent``): ``Listening(port, counts_handshakes)`` once the
  server listens (and its stderr tap has checked that it sees gRPC's lines);
  ``Accepted(columns, size)`` per accepted batch (validated: the regional only maps
  them); ``Outcome(status, label)`` per other outcome (for the regional's /metrics);
  ``Refusal(reason)`` per stream or batch refused for who sent it (regional/auth.py);
  ``Handshakes(refused, held_back, dropped_bytes)`` when TLS handshakes were refused, or
  its stderr tap held lines back or dropped output (regional/handshakes.py);
  ``Barrier(n)`` echoed once every batch acked before it has been sent; ``Stopped()``
  last.
  ``LoopLag(longest_s, stalls)`` every second: how long the ingest event loop was
  kept from running (every ack waits that long); ``GateStats`` every second: the
  de-duplication state and the rate limits' node table.
- regional -> ingest (``IngestCommand``): ``Pressure(blocks, held_full, closed)`` (the
  largest sink backlog: RETRY past the limit; whether the merge's windows hold their
  maximum of points: RETRY; whether the regional is draining: RETRY), ``Barrier(n)``,
  ``Stop(grace_s)``. Messages are handled in order, so a barrier answered after a
  pressure message means the gate applies it.
- ``Ping()``, both ways: the regional pings about every second and the ingest event
  loop echoes it (regional/liveness.py). An ingest process silent for ``child_timeout_s``
  (stopped, its loop stuck) is hung: it acknowledges nothing, and edges fail over after
  their own deadline. The regional then logs and counts it, kills it and treats it as
  dead (``on_exit``): it stops and exits non-zero, a supervisor restarts it, and the
  restart replays the write-ahead log (what was acknowledged is there).
- ``MergePing()``, both ways, the other way round: the ingest process pings the merge
  process about every second (after the batches it handed over before: a ping waits
  behind them in the pipe) and the merge's event loop echoes it. A merge process silent
  for ``child_timeout_s`` (stopped, its loop or its reader stuck) takes acknowledged
  batches no further: nothing is stored, and once the hand-over is full every edge is
  answered RETRY, which keeps edges from failing over. So the ingest process logs it,
  records it (``liveness.record_merge_hang``: the count the next start shows), kills
  the merge process (SIGKILL: a stopped process ends too), stops its server and exits.
  Its supervisor restarts the regional, which replays the log.

With a write-ahead log (``wal``), an accepted batch is acked once it is in the log
on disk (regional/walwriter.py: group commit), and it crosses to the merge with its
log position, in log order; without one, once it is in the bounded hand-over queue
(in memory: lost if the regional dies). A full hand-over queue answers RETRY. The ingest process ignores
SIGINT/SIGTERM (the regional stops it in order: server first, then the queue is
drained, then windows are flushed) and exits when the pipe closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from stratoscope.regional import handshakes, ingestboot, looplag, pipes, wal
from stratoscope.regional.dedup import Deduplicator
from stratoscope.regional.gate import Gate
from stratoscope.regional.handover import pack
from stratoscope.regional.handshakes import Handshakes
from stratoscope.regional.liveness import DEFAULT_TIMEOUT_S, Watchdog, record_merge_hang
from stratoscope.regional.ratelimit import RateSettings
from stratoscope.regional.runtime import name_process, tune_gc
from stratoscope.regional.server import ServerAuth, serve
from stratoscope.regional.validate import Limits
from stratoscope.regional.walwriter import DEFAULT_FSYNC_TIMEOUT_S, IN_DOUBT, FsyncPolicy, WalWriter
from stratoscope.v1 import batch_pb2 as pb
from stratoscope.v1 import ingest_pb2

log = logging.getLogger("stratoscope.regional")

#: Bytes of accepted batches waiting to cross to the regional process, past which the
#: gate answers RETRY. Batches cross as decoded columns (~145 KiB for 2,000 series; about
#: the inflated size, up to the validation limit of 16 MiB), so the bound is in bytes:
#: 256 MiB is ~1,800 ordinary batches, ~9 s at 200 batches/s.
HANDOVER_BYTES = 256 << 20


# -- messages ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Listening:
    port: int
    #: why the server could not listen (then ``port`` is 0)
    error: str = ""
    #: whether refused TLS handshakes are counted (the tap saw its probe's line)
    counts_handshakes: bool = False


@dataclass(frozen=True, slots=True)
class Accepted:
    #: The batch's decoded columns, packed (regional/handover.py); a PickleBuffer when
    #: sent (out of band), a read-only view of the received buffer when received.
    columns: pickle.PickleBuffer | memoryview
    size: int | None
    #: Its position in the write-ahead log (regional/wal.py; 0 without a log).
    pos: int = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    label: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """A stream or batch refused for who sent it (one of auth.REFUSALS)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Barrier:
    n: int


@dataclass(frozen=True, slots=True)
class Stopped:
    pass


@dataclass(frozen=True, slots=True)
class Ping:
    """Sent by the regional, echoed by the ingest event loop (liveness)."""


@dataclass(frozen=True, slots=True)
class MergePing:
    """Sent by the ingest process, echoed by the merge process's event loop (liveness)."""


@dataclass(frozen=True, slots=True)
class LoopLag:
    """The ingest event loop's stalls over the last second (regional/looplag.py)."""

    longest_s: float
    stalls: list[float]


@dataclass(frozen=True, slots=True)
class Pressure:
    blocks: int
    held_full: bool
    closed: bool
    #: the write-ahead log is near its size bound
    log_full: bool = False


@dataclass(frozen=True, slots=True)
class Stop:
    grace_s: float


@dataclass(frozen=True, slots=True)
class WalStats:
    """The ingest side of the write-ahead log, every second: records and bytes written,
    fsyncs, the segment being written, the error that stopped it ("" if none), how long
    the write or fsync in progress has taken (0: none) and the longest of the last
    minute or two (walwriter.StallWatch)."""

    records: int
    bytes: int
    syncs: int
    segment: int
    failed: str
    fsync_in_progress_s: float = 0.0
    fsync_longest_s: float = 0.0


@dataclass(frozen=True, slots=True)
class GateStats:
    """The gate's state, every second: de-duplication (boots remembered, boots evicted
    by their own node's newer ones or by the table's bound, floor jumps) and the
    per-node rate limits (nodes tracked)."""

    boots: int
    evicted_by_own_node: int
    evicted_oldest: int
    floor_jumps: int
    rate_nodes: int


@dataclass(frozen=True)
class WalSettings:
    """Where and how the ingest process logs accepted batches (regional/walwriter.py)."""

    directory: Path
    fsync: FsyncPolicy = "ack"
    fsync_interval_s: float = 1.0
    segment_bytes: int = 64 << 20
    #: A write or fsync in progress this long: the log is given up and the regional stops.
    fsync_timeout_s: float = DEFAULT_FSYNC_TIMEOUT_S


IngestEvent = (Listening | Accepted | Outcome | Refusal | Handshakes | Barrier | Stopped | LoopLag
               | WalStats | GateStats | Ping | MergePing)
IngestCommand = Pressure | Barrier | Stop | Ping | MergePing


# -- the ingest process ---------------------------------------------------------------

class Admission:
    """What the gRPC service calls (server.Admission): the gate, the log, then the
    hand-over queue.

    The queue itself is unbounded (outcome messages must never block the event
    loop); accepted batches are bounded by ``HANDOVER_BYTES``: past it, RETRY.
    ``queued_bytes``/``sent_bytes`` are each written by one thread only (loop / sender).
    With a ``writer``, an accepted batch is acked (and handed over) once logged. A resend
    of it meanwhile (on another stream of the same edge: its ack deadline ended the first
    one) is answered when the writer answers, not before: DUPLICATE once it is durable,
    RETRY if the log could not take it (then the de-duplication forgets it, and a resend
    is taken anew). Not RETRY at once: a RETRY frees the batch for another regional, and
    the write in progress may still put it in this log: it would be stored twice.
    """

    def __init__(self, limits: Limits, max_queued_blocks: int,
                 out: queue.SimpleQueue[IngestEvent], writer: WalWriter | None = None,
                 clock: Callable[[], int] = time.time_ns, rates: RateSettings | None = None) -> None:
        self.gate = Gate(limits, max_queued_blocks=max_queued_blocks, saturated=self.saturated,
                         clock=clock, rates=rates)
        self.out = out
        self.writer = writer
        self.clock = clock
        self.queued_bytes = 0
        self.sent_bytes = 0
        #: Batches being logged (accepted, not yet durable): the writer's answer, a log
        #: position or None (the log could not take it).
        self.logging: dict[tuple[str, str, int], asyncio.Future[int | None]] = {}

    def saturated(self) -> bool:
        return self.queued_bytes - self.sent_bytes >= HANDOVER_BYTES

    def refused(self, reason: str) -> None:
        self.out.put(Refusal(reason))

    def undecodable(self, size: int) -> ingest_pb2.Ack:
        message = f"not a stratoscope.v1.Batch message ({size} bytes)"
        self.gate.rejections.rejected("encoding", "", 0, message)
        self.out.put(Outcome(ingest_pb2.Ack.REJECTED, "encoding"))
        return ingest_pb2.Ack(status=ingest_pb2.Ack.REJECTED, reason=message)

    async def accept(self, batch: pb.Batch, peer: frozenset[str] | None, wire: bytes) -> ingest_pb2.Ack:
        ident = (batch.node_id, batch.boot_id, batch.seq)
        pending = self.logging.get(ident)
        if pending is not None:  # a resend of a batch being logged: the writer's answer
            if await asyncio.shield(pending) is None:
                return ingest_pb2.Ack(boot_id=batch.boot_id, seq=batch.seq, status=ingest_pb2.Ack.RETRY,
                                      reason="the regional cannot write its log")
            self.out.put(Outcome(ingest_pb2.Ack.DUPLICATE, ""))
            return ingest_pb2.Ack(boot_id=batch.boot_id, seq=batch.seq, status=ingest_pb2.Ack.DUPLICATE)
        now = self.clock()
        ack, cols, label = self.gate.admit(batch, peer, len(wire))
        if cols is None:
            self.out.put(Outcome(ack.status, label))
            return ack
        # The decoded columns, packed (regional/handover.py): the merge maps them
        # without parsing or decoding the batch again.
        packed = pack(cols)
        if self.writer is None:
            self.queued_bytes += len(packed)
            self.out.put(Accepted(pickle.PickleBuffer(packed), len(wire)))
            return ack
        loop = asyncio.get_running_loop()
        logged: asyncio.Future[int | None] = loop.create_future()
        size = len(wire)
        self.logging[ident] = logged

        def done(pos: int | None) -> None:  # in the writer thread, in log order
            if pos is not None and pos != IN_DOUBT:
                # handed over here, not in the loop: the merge must see log order
                self.queued_bytes += len(packed)
                self.out.put(Accepted(pickle.PickleBuffer(packed), size, pos))
            loop.call_soon_threadsafe(self._logged, ident, logged, pos)

        self.writer.append(wal.batch_record(now, wire), ident, done)
        # shielded: this call may be cancelled (its stream ended), the answer stays for a resend
        pos = await asyncio.shield(logged)
        if pos is None:
            ack.status = ingest_pb2.Ack.RETRY
            ack.reason = "the regional cannot write its log"
        return ack

    def _logged(self, ident: tuple[str, str, int], fut: asyncio.Future[int | None],
                pos: int | None) -> None:
        """The writer's answer for one batch (in the loop), whether or not the call that
        took it still waits: from here a resend is DUPLICATE if it was logged, and is
        taken anew if it was not (None). IN_DOUBT (its write failed part-way) is never
        answered: the call and any resend wait until the process ends, and the edge keeps
        the batch for this regional (walwriter.IN_DOUBT)."""
        if pos == IN_DOUBT:
            return
        self.logging.pop(ident, None)
        if pos is None:
            self.gate.dedup.forget(*ident)
        if not fut.done():
            fut.set_result(pos)


@dataclass(frozen=True)
class MergeWatch:
    """Which process the ingest process watches (the merge process: its parent) and
    how long it may leave a ``MergePing`` unanswered."""

    pid: int
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class IngestArgs:
    """What the ingest process runs with; crosses as a pickle that regional/ingestboot.py
    loads once gRPC's verbosity is set (its types' modules import gRPC)."""

    listen: str
    auth: ServerAuth
    limits: Limits
    max_queued_blocks: int
    log_level: int
    wal_settings: WalSettings | None
    rates: RateSettings
    merge: MergeWatch


def _ingest_main(conn: Connection, args: IngestArgs, out: queue.SimpleQueue[IngestEvent],
                 stderr_tap: handshakes.Tap | None) -> None:
    """Called by regional/ingestboot.py, which has started ``stderr_tap`` (None: no TLS, no
    tap) reporting to ``out``."""
    chan: pipes.Channel[IngestEvent, IngestCommand] = pipes.Channel.over(conn)
    name_process("strato-ingest")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s [ingest %(process)d] %(name)s: %(message)s")
    import uvloop

    tune_gc()
    uvloop.run(_ingest_loop(chan, out, args.listen, args.auth, args.limits, args.max_queued_blocks,
                            args.wal_settings, args.rates, args.merge, stderr_tap))


class _MergeHung:
    """The loop's cue (from the watchdog's thread) to stop: the merge process was killed."""


def _read_commands(chan: pipes.Channel[IngestEvent, IngestCommand], loop: asyncio.AbstractEventLoop,
                   commands: asyncio.Queue[IngestCommand | _MergeHung | None],
                   heard: Callable[[], None]) -> None:
    """The ingest process's reader thread: the merge's echo of a ``MergePing`` is heard
    here (a busy ingest event loop must not make the merge look silent); every other
    command goes to the loop, in order. None: the pipe closed."""
    while True:
        try:
            cmd = chan.recv()
        except (EOFError, OSError):  # the regional is gone
            with contextlib.suppress(RuntimeError):  # the loop closed: the process is leaving
                loop.call_soon_threadsafe(commands.put_nowait, None)
            return
        if isinstance(cmd, MergePing):
            heard()
            continue
        loop.call_soon_threadsafe(commands.put_nowait, cmd)
        if isinstance(cmd, Stop):
            return  # nothing follows a Stop


def _own_address(listen: str) -> str:
    """Where this host reaches a server listening on ``listen`` (host:port): a wildcard
    address by ``localhost`` (IPv6 or IPv4, whichever connects)."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    return "localhost" if host in ("", "0.0.0.0", "::") else host


async def _ingest_loop(chan: pipes.Channel[IngestEvent, IngestCommand],
                       out: queue.SimpleQueue[IngestEvent], listen: str,
                       auth: ServerAuth, limits: Limits, max_queued_blocks: int,
                       wal_settings: WalSettings | None, rates: RateSettings,
                       merge: MergeWatch, stderr_tap: handshakes.Tap | None = None) -> None:
    loop = asyncio.get_running_loop()
    writer = None
    if wal_settings is not None:
        # what was taken before a restart is answered DUPLICATE: the log's record of it
        seen = wal.seen_batches(wal_settings.directory)
        durable = Deduplicator()
        durable.load(seen.state())
        writer = WalWriter(wal_settings.directory, durable, segment_bytes=wal_settings.segment_bytes,
                           fsync=wal_settings.fsync, fsync_interval_s=wal_settings.fsync_interval_s,
                           fsync_timeout_s=wal_settings.fsync_timeout_s)
        writer.start()
    admission = Admission(limits, max_queued_blocks, out, writer, rates=rates)
    gate = admission.gate
    if wal_settings is not None:
        gate.dedup = seen
    try:
        server, port = await serve(admission, listen, auth)
    except (OSError, ValueError) as exc:  # the parent says it in one line (IngestProcess.start)
        if writer is not None:
            await loop.run_in_executor(None, writer.close)
        chan.send(Listening(0, str(exc)))
        return

    def sender() -> None:  # pickles and writes: off the event loop
        while True:
            msg = out.get()
            try:
                chan.send(msg)  # an Accepted's columns go out of band, as they are
            except (OSError, ValueError):
                return
            if isinstance(msg, Accepted):
                admission.sent_bytes += memoryview(msg.columns).nbytes
            if isinstance(msg, Stopped):
                return

    counted = False
    if stderr_tap is not None:
        problem = await loop.run_in_executor(None, stderr_tap.probe, _own_address(listen), port)
        counted = problem is None
        if problem is not None:
            log.error("refused TLS handshakes are not counted (stratoscope_regional_"
                      "tls_handshakes_counted 0): a plaintext connection to the TLS port, to "
                      "check, was refused but %s (grpcio's log format or GRPC_VERBOSITY "
                      "different?)", problem)
    send_thread = threading.Thread(target=sender, name="ingest-handover", daemon=True)
    send_thread.start()
    out.put(Listening(port, counts_handshakes=counted))

    commands: asyncio.Queue[IngestCommand | _MergeHung | None] = asyncio.Queue()

    def merge_hung(silent_s: float) -> None:  # the watchdog's thread
        disk = writer.stall.age() if writer is not None else 0.0
        log.critical("the merge process (pid %d) has not answered for %.0f s (child_timeout %g s)%s: "
                     "killing it; the regional exits and its supervisor restarts it, which replays "
                     "the write-ahead log", merge.pid, silent_s, merge.timeout_s,
                     f"; a write or fsync of the log has been in progress for {disk:.0f} s: its disk "
                     "may be stuck" if disk >= 1.0 else "")
        if os.getppid() == merge.pid:  # not a process that took its pid after it exited
            with contextlib.suppress(ProcessLookupError):
                os.kill(merge.pid, signal.SIGKILL)  # a stopped process ends too
        with contextlib.suppress(RuntimeError):  # the loop closed: the process is leaving anyway
            loop.call_soon_threadsafe(commands.put_nowait, _MergeHung())
        if wal_settings is not None:  # last: on a stuck disk this blocks
            try:
                record_merge_hang(wal_settings.directory)
            except OSError as exc:
                log.error("could not record the merge process's hang in %s: %s", wal_settings.directory, exc)

    stopping: list[asyncio.Task[None]] = []  # (a reference: a task nobody holds may be collected)
    watchdog = Watchdog("merge", merge.timeout_s, ping=lambda: out.put(MergePing()), on_hung=merge_hung)
    threading.Thread(target=_read_commands, args=(chan, loop, commands, watchdog.heard),
                     name="ingest-commands", daemon=True).start()
    watchdog.start()

    def report_lag(longest_s: float, stalls: list[float]) -> None:
        if longest_s:
            out.put(LoopLag(longest_s, stalls))
        if writer is not None:
            if writer.check():  # stuck: stop taking batches now, so edges go elsewhere at once
                stopping.append(loop.create_task(server.stop(0)))
            out.put(WalStats(writer.records, writer.bytes, writer.syncs, writer.segment,
                             str(writer.failed or ""), writer.stall.age(), writer.stall.longest()))
        d = gate.dedup
        out.put(GateStats(d.boots, d.evicted_by_own_node, d.evicted_oldest, d.floor_jumps,
                          len(gate.rates)))

    lag_monitor = asyncio.create_task(looplag.monitor(report_lag))
    while True:
        cmd = await commands.get()
        if cmd is None or isinstance(cmd, _MergeHung):  # the regional is gone, or was killed
            watchdog.stop()
            lag_monitor.cancel()
            await server.stop(0)
            if writer is not None:
                await loop.run_in_executor(None, writer.close)
            return
        if isinstance(cmd, Pressure):
            gate.backlog, gate.held_full, gate.closed = cmd.blocks, cmd.held_full, cmd.closed
            gate.log_full = cmd.log_full
        elif isinstance(cmd, Barrier | Ping):
            out.put(cmd)
        elif isinstance(cmd, Stop):
            watchdog.stop()  # the merge stops: its silence from here on is its own business
            lag_monitor.cancel()
            await server.stop(cmd.grace_s)
            if writer is not None:
                await loop.run_in_executor(None, writer.close)
            out.put(Stopped())
            await loop.run_in_executor(None, send_thread.join)
            return


class IngestProcess:
    """The regional's handle on its ingest process."""

    def __init__(self, listen: str, auth: ServerAuth, limits: Limits, max_queued_blocks: int,
                 on_outcome: Callable[[int, str, None, None], None],
                 on_accepted: Callable[[memoryview, int | None, int], None],
                 on_exit: Callable[[int | None], None] | None = None,
                 on_lag: Callable[[str, float, list[float]], None] | None = None,
                 wal_settings: WalSettings | None = None,
                 on_wal: Callable[[WalStats], None] | None = None,
                 rates: RateSettings | None = None,
                 on_refused: Callable[[str], None] | None = None,
                 on_gate: Callable[[GateStats], None] | None = None,
                 child_timeout_s: float = DEFAULT_TIMEOUT_S,
                 on_handshakes: Callable[[dict[str, int], int, int], None] | None = None) -> None:
        """``on_outcome(status, label, None, None)`` counts a batch the ingest process did
        not accept; ``on_accepted(packed columns, size, log position)`` merges an accepted
        one (both in a reader thread); ``on_exit(code)`` is called in the event loop if the
        ingest process dies on its own, or hangs (silent for ``child_timeout_s``: it is
        then killed). The ingest process watches this one in turn, with the same
        deadline: it pings, and the event loop that runs ``start()`` echoes (see the
        module docstring). ``on_lag("ingest", longest_s, stalls)`` reports its event loop's
        stalls and ``on_wal(stats)`` its log writer's figures (reader thread);
        ``on_refused(reason)`` counts a stream or batch refused for who sent it (reader
        thread); ``on_handshakes(refused, held_back, dropped_bytes)`` counts TLS handshakes
        refused (per reason), and the ingest stderr's lines held back and bytes dropped,
        as they change (regional/handshakes.py; reader thread, and a thread that reads
        what a dead ingest process left in its stderr pipe)."""
        self.listen = listen
        self.auth = auth
        self.rates = rates or RateSettings()
        self.on_refused = on_refused
        self.on_gate = on_gate
        self.on_handshakes = on_handshakes
        #: Whether refused TLS handshakes are counted (TLS on, and the ingest process's
        #: stderr tap saw gRPC's line about its probe: regional/handshakes.py).
        self.counts_handshakes = False
        self._leftovers: threading.Thread | None = None
        self.limits = limits
        self.max_queued_blocks = max_queued_blocks
        self.on_outcome = on_outcome
        self.on_accepted = on_accepted
        self.on_exit = on_exit
        self.on_lag = on_lag
        self.wal_settings = wal_settings
        self.on_wal = on_wal
        self.port = 0
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._chan: pipes.Channel[IngestCommand, IngestEvent] | None = None
        self._barriers = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._port_ready = threading.Event()
        self.start_error = ""
        self._stopped = threading.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.child_timeout_s = child_timeout_s
        #: Times the ingest process was found hung and killed (0 or 1: the regional stops).
        self.hangs = 0
        self._watchdog: Watchdog | None = None
        #: Whether the reader thread is waiting on the ingest process (not busy with a
        #: message: a slow merge is the regional's delay, not the child's silence).
        self._reading = False
        #: Echoes of the ingest process's MergePing, sent by a thread of their own (the
        #: event loop must not block on the pipe); None ends the thread.
        self._echoes: queue.SimpleQueue[MergePing | None] = queue.SimpleQueue()

    def _handshakes(self, refused: dict[str, int], held_back: int, dropped_bytes: int) -> None:
        if self.on_handshakes is not None:
            self.on_handshakes(refused, held_back, dropped_bytes)

    async def start(self, timeout_s: float = 60.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        # with TLS, its stderr is a pipe, read by a tap that counts refused handshakes
        # (regional/handshakes.py); the regional keeps the read end too
        tap = os.pipe() if self.auth.tls is not None else None
        verbosity = os.environ.get("GRPC_VERBOSITY")
        # spawned by regional/ingestboot.py, which imports gRPC only once it has set the
        # verbosity: the arguments of _ingest_main cross as a pickle it loads after that
        args = pickle.dumps(IngestArgs(self.listen, self.auth, self.limits, self.max_queued_blocks,
                                       logging.getLogger().level, self.wal_settings, self.rates,
                                       MergeWatch(os.getpid(), self.child_timeout_s)))
        self._proc = ctx.Process(
            target=ingestboot.main, name="stratoscope-ingest", daemon=True,
            args=(child, (pipes.InheritedFd(tap[0]), pipes.InheritedFd(tap[1])) if tap else None,
                  verbosity, args),
        )
        try:
            self._proc.start()
        except BaseException:
            if tap is not None:
                os.close(tap[0])
            raise
        finally:
            if tap is not None:
                os.close(tap[1])  # the child's copy is the pipe's only write end
        child.close()
        if tap is not None:
            # The child's tap dies with it: what it wrote last (a crash's last lines) may
            # still be in the pipe. Read it once the child is gone.
            proc, read_fd = self._proc, tap[0]

            def leftovers() -> None:
                multiprocessing.connection.wait([proc.sentinel])
                handshakes.drain(read_fd, self._handshakes, show=handshakes.lowest_shown(verbosity))

            self._leftovers = threading.Thread(target=leftovers, name="ingest-stderr", daemon=True)
            self._leftovers.start()
        chan: pipes.Channel[IngestCommand, IngestEvent] = pipes.Channel.over(parent)
        self._chan = chan
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(chan,), name="ingest-reader", daemon=True).start()
        threading.Thread(target=self._send_echoes, name="ingest-echoes", daemon=True).start()
        ok = await asyncio.to_thread(self._port_ready.wait, timeout_s)
        if self.start_error:
            raise OSError(self.start_error)
        if not ok or not self.port:
            code = self._proc.exitcode
            raise OSError(f"ingest process did not start listening on {self.listen} (exit code {code})")
        # watched once it listens: before, it reads its log (no loop to answer yet)
        proc = self._proc
        self._watchdog = Watchdog("ingest", self.child_timeout_s, ping=lambda: chan.send(Ping()),
                                  on_hung=lambda silent_s: self._hung(proc, silent_s),
                                  listening=lambda: self._reading)
        self._watchdog.start()

    def _hung(self, proc: multiprocessing.process.BaseProcess, silent_s: float) -> None:
        """The watchdog's verdict (its thread): kill the ingest process; the reader then
        sees it gone and calls ``on_exit`` (unless the regional is stopping anyway)."""
        self.hangs += 1
        log.critical("the ingest process (pid %s) has not answered for %.0f s (child_timeout %g s): "
                     "killing it; the regional stops, and a restart replays its write-ahead log",
                     proc.pid, silent_s, self.child_timeout_s)
        proc.kill()  # SIGKILL: a stopped process ends too

    def _read(self, chan: pipes.Channel[IngestCommand, IngestEvent]) -> None:
        while True:
            try:
                self._reading = True
                msg = chan.recv()
            except (EOFError, OSError):
                if self._watchdog is not None:
                    self._watchdog.stop()
                self._port_ready.set()
                self._stopped.set()
                for n in list(self._waiting):
                    self._release(n)
                if (not self._stopping and not self.start_error and self.on_exit is not None
                        and self._loop is not None):
                    proc = self._proc
                    code = proc.exitcode if proc is not None else None
                    if not self.hangs:
                        log.error("the ingest process exited unexpectedly (code %s)", code)
                    self._loop.call_soon_threadsafe(self.on_exit, code)
                return
            finally:
                self._reading = False
            if self._watchdog is not None:
                self._watchdog.heard()
            try:
                if isinstance(msg, Accepted):
                    self.on_accepted(memoryview(msg.columns), msg.size, msg.pos)
                elif isinstance(msg, Outcome):
                    self.on_outcome(msg.status, msg.label, None, None)
                elif isinstance(msg, GateStats):
                    if self.on_gate is not None:
                        self.on_gate(msg)
                elif isinstance(msg, Refusal):
                    if self.on_refused is not None:
                        self.on_refused(msg.reason)
                elif isinstance(msg, Handshakes):
                    self._handshakes(msg.refused, msg.held_back, msg.dropped_bytes)
                elif isinstance(msg, WalStats):
                    if self.on_wal is not None:
                        self.on_wal(msg)
                elif isinstance(msg, LoopLag):
                    if self.on_lag is not None:
                        self.on_lag("ingest", msg.longest_s, msg.stalls)
                elif isinstance(msg, Listening):
                    self.port, self.start_error = msg.port, msg.error
                    self.counts_handshakes = msg.counts_handshakes
                    self._port_ready.set()
                elif isinstance(msg, Barrier):
                    self._release(msg.n)
                elif isinstance(msg, MergePing):
                    # echoed once this process's event loop has run a callback for it (and
                    # the reader got here: it takes messages in order), so a loop or a
                    # reader that is stuck answers none
                    if self._loop is not None:
                        self._loop.call_soon_threadsafe(self._echoes.put, msg)
                elif isinstance(msg, Stopped):
                    self._stopped.set()
                    if self._watchdog is not None:
                        self._watchdog.stop()
                    return
            except Exception:  # a bug in the merge must not stop ingest
                log.exception("handling %s from the ingest process failed", type(msg).__name__)

    def _send_echoes(self) -> None:
        while (msg := self._echoes.get()) is not None:
            self._send(msg)

    def _release(self, n: int) -> None:
        fut = self._waiting.pop(n, None)
        if fut is None or self._loop is None:
            return

        def done() -> None:
            if not fut.done():
                fut.set_result(None)

        self._loop.call_soon_threadsafe(done)

    def _send(self, msg: IngestCommand) -> None:
        if self._chan is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._chan.send(msg)

    def set_pressure(self, blocks: int, held_full: bool, closed: bool, log_full: bool = False) -> None:
        """Tell the gate the sink backlog, whether the merge's windows are at their
        memory bound, whether admission is closed and whether the log is near its bound:
        it answers RETRY on any of them. (Applied once a ``barrier()`` sent after it
        returns.)"""
        self._send(Pressure(blocks, held_full, closed, log_full))

    async def barrier(self) -> None:
        """Returns once every batch acked so far has been handed to ``on_accepted``."""
        if self._proc is None or not self._proc.is_alive():
            return
        n = next(self._barriers)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[n] = fut
        self._send(Barrier(n))
        await fut

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting (the server gets ``grace_s``), then hand over what was acked.
        Idempotent; safe without start()."""
        if self._proc is None:
            return
        self._stopping = True
        if self._watchdog is not None:  # stopping takes the server's grace, unanswered: the
            self._watchdog.stop()       # deadlines below bound it instead
        if self._proc.is_alive():
            self._send(Stop(grace_s))
            await asyncio.to_thread(self._stopped.wait, grace_s + 60)
        await asyncio.to_thread(self._proc.join, 10)
        if self._proc.is_alive():
            self._proc.kill()  # it ignores SIGTERM (and a stopped process gets none)
            await asyncio.to_thread(self._proc.join, 10)
        if self._leftovers is not None:  # its last stderr lines before ours
            await asyncio.to_thread(self._leftovers.join, 10)
        self._echoes.put(None)
        if self._chan is not None:
            self._chan.close()
        self._proc = self._chan = None
