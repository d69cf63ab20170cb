"""Runs a regional: sinks + delivery queues + merge + gRPC ingest + /metrics, on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import start_http_server

from stratoscope.regional.delivery import DeliveryQueue
from stratoscope.regional.ingest import IngestProcess
from stratoscope.regional.merge import DEFAULT_ROLLUPS, MergeSettings, Rollup
from stratoscope.regional.runtime import tune_gc
from stratoscope.regional.server import ServerTls, flush_forever, serve
from stratoscope.regional.service import DEFAULT_MAX_HELD_POINTS, Regional
from stratoscope.regional.sinks.base import Sink, SinkError

log = logging.getLogger("stratoscope.regional")

DEFAULT_CLICKHOUSE = "chdb:///var/lib/stratoscope/clickhouse"
#: Sink backlog (blocks) at which edges are told to RETRY, and the queue's hard bound.
QUEUE_RETRY = 3000
QUEUE_MAX = 6000


@dataclass
class RegionalOptions:
    listen: str = "0.0.0.0:7400"
    metrics_port: int = 9432
    clickhouse: str | None = DEFAULT_CLICKHOUSE
    clickhouse_database: str | None = None
    migrate: bool | None = None  # None: yes for an embedded store, no for a server
    kafka: str | None = None
    kafka_topic_prefix: str = "stratoscope"
    resolution_s: int = 60
    lateness_s: float = 15.0
    rollups: tuple[Rollup, ...] = DEFAULT_ROLLUPS
    tls: ServerTls | None = None
    regional_id: str = field(default_factory=socket.gethostname)
    #: Run each sink in a child process (own GIL and core; the embedded store lives
    #: there). Off only for embedding a regional where that is not wanted.
    sink_processes: bool = True
    #: Run the gRPC ingest in a child process (acks never wait for the merge's GIL).
    ingest_process: bool = True
    #: Reduce closed windows in a forked child (its own GIL and core), not a thread.
    frames_in_child: bool = True
    #: Nodes per frame of a closed window (MergeSettings.frame_nodes); the ClickHouse
    #: sink inserts a delivery's frames together, and a delivery takes up to two frames.
    frame_nodes: int = 250
    #: Points the merge may hold in windows not yet handed to the sinks; past it edges
    #: are answered RETRY until windows close (memory is bounded, nothing is dropped).
    max_held_points: int = DEFAULT_MAX_HELD_POINTS

    def __post_init__(self) -> None:
        # A frame is a delivery's worth of blocks (one per node): past a third of the
        # RETRY backlog, two frames in the queue would turn edges away.
        if not 1 <= self.frame_nodes <= QUEUE_RETRY // 3:
            raise ValueError(f"frame_nodes must be 1..{QUEUE_RETRY // 3}, got {self.frame_nodes}")
        if self.max_held_points < 1:
            raise ValueError(f"max_held_points must be >= 1, got {self.max_held_points}")


def build_sinks(opts: RegionalOptions) -> list[Sink]:
    specs: list[tuple[str, dict[str, object]]] = []
    if opts.clickhouse:
        migrate = opts.migrate if opts.migrate is not None else opts.clickhouse.startswith("chdb:")
        specs.append(("clickhouse", {"dsn": opts.clickhouse, "database": opts.clickhouse_database,
                                     "migrate": migrate}))
    if opts.kafka:
        specs.append(("kafka", {"bootstrap": opts.kafka, "topic_prefix": opts.kafka_topic_prefix}))
    if opts.sink_processes:
        from stratoscope.regional.sinks.process import ProcessSink

        return [ProcessSink(kind, kind, **kwargs) for kind, kwargs in specs]
    from stratoscope.regional.sinks.process import make_sink

    return [make_sink(kind, kwargs) for kind, kwargs in specs]


async def check(opts: RegionalOptions) -> int:
    """Start each sink and run its health check; print one line per sink."""
    rc = 0
    for sink in build_sinks(opts):
        try:
            await sink.start()
            await sink.health_check()
            print(f"{sink.name}: ok")
        except SinkError as exc:
            print(f"{sink.name}: FAILED: {exc}")
            rc = 1
        finally:
            await sink.stop()
    return rc


class RunningRegional:
    """A started regional; ``stop()`` drains windows into the sinks and shuts down."""

    def __init__(self, opts: RegionalOptions) -> None:
        self.opts = opts
        self.sinks = build_sinks(opts)
        # Backpressure before memory: edges get RETRY once a sink is QUEUE_RETRY blocks
        # behind (they keep their batches and back off); the queue itself drops oldest
        # only past QUEUE_MAX. In a saturation benchmark a 50k-block allowance let the
        # regional grow to 14.7 GB while ClickHouse fell behind.
        self.queues = [
            DeliveryQueue(s, batch_max_blocks=max(500, 2 * opts.frame_nodes + 2), batch_max_wait_s=0.5,
                          max_queue_blocks=QUEUE_MAX)
            for s in self.sinks
        ]
        settings = MergeSettings(resolution_s=opts.resolution_s, lateness_s=opts.lateness_s,
                                 rollups=opts.rollups, frame_nodes=opts.frame_nodes)
        self.regional = Regional(settings, self.queues, regional_id=opts.regional_id,
                                 max_queued_blocks=QUEUE_RETRY, frames_in_child=opts.frames_in_child,
                                 max_held_points=opts.max_held_points)
        self._server = None
        self._ingest: IngestProcess | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._backlog_task: asyncio.Task[None] | None = None
        #: Holders of admission_closed(); while any, every batch is answered RETRY.
        self._closers = 0
        self._pressure_lock = asyncio.Lock()
        self._pressure_sent: tuple[int, bool, bool] | None = None
        self.port = 0
        #: Set when a part of the regional failed on its own (the ingest process died):
        #: the regional then stops, flushing what it holds, and exits non-zero.
        self.failed = asyncio.Event()

    def sink(self, name: str) -> Sink:
        return next(s for s in self.sinks if s.name == name)

    async def start(self) -> None:
        for s in self.sinks:
            await s.start()
            await s.health_check()
        await self.regional.start()
        if self.opts.ingest_process:
            self._ingest = IngestProcess(self.opts.listen, self.opts.tls, self.regional.gate.limits,
                                         QUEUE_RETRY, on_batch=self.regional.count,
                                         on_wire=self.regional.accept_admitted)
            self._ingest.on_exit = lambda code: self.failed.set()
            await self._ingest.start()
            self.port = self._ingest.port
            self._backlog_task = asyncio.create_task(self._push_backlog())
        else:
            self._server = await serve(self.regional, self.opts.listen, self.opts.tls)
            self.port = self._server.bound_port  # type: ignore[attr-defined]
        self._flusher = asyncio.create_task(flush_forever(self.regional))
        if self.opts.metrics_port:
            start_http_server(self.opts.metrics_port, registry=self.regional.registry)

    def _pressure(self) -> tuple[int, bool, bool]:
        """What the gate answers RETRY on: sink backlog, held points at their bound,
        admission closed."""
        return (self.regional.backlog, self.regional.held_full, self._closers > 0)

    async def push_pressure(self, confirm: bool = True) -> None:
        """Hand the gate the current pressure. With ``confirm``, every batch the gate
        accepted so far is merged first (so the pressure counts it), and on return the
        gate answers by it."""
        async with self._pressure_lock:  # sent in the order computed
            if confirm and self._ingest is not None:
                await self._ingest.barrier()
            state = self._pressure()
            if self._ingest is None:
                self.regional.gate.closed = state[2]  # in-process: accept() reads the rest
                return
            if state != self._pressure_sent:
                was_full = self._pressure_sent is not None and self._pressure_sent[1]
                if state[1] and not was_full:
                    log.warning("windows hold %d points (limit %d): edges are told to RETRY until "
                                "windows close", self.regional.held_points, self.regional.max_held_points)
                await asyncio.to_thread(self._ingest.set_pressure, *state)
                self._pressure_sent = state
            if confirm:
                await self._ingest.barrier()

    async def _push_backlog(self, every_s: float = 0.2) -> None:
        """Keep the ingest process's view of the pressure current."""
        while True:
            await self.push_pressure(confirm=False)
            await asyncio.sleep(every_s)

    @contextlib.asynccontextmanager
    async def admission_closed(self) -> AsyncIterator[None]:
        """Inside, every batch is answered RETRY (edges keep it and resend later), and
        every batch accepted before is merged: what the merge holds changes only by
        what the caller does."""
        self._closers += 1
        try:
            await self.push_pressure()
            yield
        finally:
            self._closers -= 1
            await self.push_pressure(confirm=False)

    async def drain(self) -> None:
        """Store every window (open or not) and wait until the sinks have it: on return,
        every batch acknowledged before the call is in the sinks."""
        async with self.admission_closed():
            await self.regional.drain()

    async def stop(self, grace_s: float = 5.0) -> None:
        await _cancel(self._backlog_task)
        self._backlog_task = None
        if self._ingest is not None:
            await self._ingest.stop(grace_s)  # every acked batch is merged after this
            self._ingest = None
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        await _cancel(self._flusher)
        self._flusher = None
        await self.regional.stop()
        for s in self.sinks:
            await s.stop()


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


#: The GIL hand-over interval of the regional process. Window merges and sink
#: encoding run in worker threads; with CPython's default 5 ms, every time the
#: event loop comes back from I/O it can wait 5 ms for the GIL, several times per
#: batch, and acks queue up behind a window close. 1 ms bounds that wait.
SWITCH_INTERVAL_S = 0.001


async def run(opts: RegionalOptions) -> int:
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    tune_gc()
    running = RunningRegional(opts)
    await running.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("regional up: ingest on %s, resolution %ss, sinks: %s", opts.listen, opts.resolution_s,
             ", ".join(s.name for s in running.sinks) or "none")
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(running.failed.wait())
    await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
    for t in (stopped, failed):
        t.cancel()
    log.info("stopping: flushing every window")
    await running.stop()
    if running.failed.is_set():
        log.error("regional stopped because its ingest process died; a supervisor restarts it")
        return 1
    return 0


def tls_from_paths(cert: Path | None, key: Path | None, client_ca: Path | None) -> ServerTls | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    return ServerTls(cert, key, client_ca)
