"""Runs a regional: sinks + delivery queues + merge + gRPC ingest + /metrics, on uvloop.

``RunningRegional`` is the one owner of a regional's lifecycle: it starts the delivery
queues (each queue starts its sink, which runs in a child process, and checks its
health), then the ingest process, then the flusher and /metrics; ``stop()`` undoes that
in reverse, is idempotent, and is safe without (or after a failed) ``start()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from stratoscope.redact import install_log_filter, redact, remember
from stratoscope.regional import looplag
from stratoscope.regional.config import QUEUE_MAX, QUEUE_RETRY, RegionalConfig
from stratoscope.regional.delivery import DeliveryQueue
from stratoscope.regional.ingest import GateStats, IngestProcess, WalSettings, WalStats
from stratoscope.regional.instances import InstanceLog
from stratoscope.regional.liveness import recorded_merge_hangs
from stratoscope.regional.merge import MergeSettings
from stratoscope.regional.queryapi import QueryApi
from stratoscope.regional.rollups import declared_rollups
from stratoscope.regional.runtime import tune_gc
from stratoscope.regional.server import ServerAuth, ServerTls
from stratoscope.regional.service import GateCollector, LogStats, Regional, flush_forever
from stratoscope.regional.sinks.base import SinkError
from stratoscope.regional.sinks.process import ProcessSink

log = logging.getLogger("stratoscope.regional")


def server_auth(config: RegionalConfig) -> ServerAuth:
    """What the ingest server needs of the TLS and token settings (validated)."""
    tls = config.tls
    server_tls = None
    if tls is not None:
        assert tls.cert is not None and tls.key is not None
        server_tls = ServerTls(tls.cert, tls.key, tls.client_ca)
    return ServerAuth(server_tls, config.auth_tokens)


def insecurity(config: RegionalConfig) -> str:
    """What ``insecure`` leaves open, in words, for the start-up warning."""
    tls, tokens = config.tls, config.auth_tokens is not None
    if tls is None and not tokens:
        return "the ingest port takes batches in plaintext from anyone, as any node"
    if tls is None:
        return "edge tokens travel in plaintext"
    if tls.client_ca is None and not tokens:
        return "edges are not authenticated: any client may send as any node"
    return "edges are authenticated"


def merge_settings(config: RegionalConfig) -> MergeSettings:
    rollups = config.rollups
    if rollups is None:
        rollups = declared_rollups(config.programs_dir)
    return MergeSettings(resolution_s=config.resolution_s, lateness_s=config.lateness,
                         frame_nodes=config.frame_nodes, rollups=rollups)


def guard_secrets(config: RegionalConfig) -> None:
    """Mask the passwords the settings hold in this process's log lines (the sinks'
    processes mask what they read themselves: docs/SECURITY.md, "Secrets")."""
    remember(*config.held_secrets())
    install_log_filter()


class ChildHangs(Collector):
    """``stratoscope_regional_child_hangs_total{process}``: processes found hung (silent
    past ``child_timeout``, regional/liveness.py) and killed, read from their owners at
    scrape time. ``process`` is "merge", "ingest" or "sink-<sink>": a fixed set. A hung
    merge process is this one, killed by the ingest process: its count is the one
    recorded in the log directory, shown from the next start on."""

    def __init__(self, counts: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[CounterMetricFamily]:
        fam = CounterMetricFamily(
            "stratoscope_regional_child_hangs",
            "Processes that stopped answering for child_timeout and were killed: a sink process is "
            "replaced (its deliveries retried); a hung ingest process stops the regional; a hung merge "
            "process is killed by the ingest process (counted in the log directory, from the next start).",
            labels=["process"])
        for process, n in self._counts():
            fam.add_metric([process], n)
        yield fam


async def check(config: RegionalConfig) -> int:
    """Start each sink and run its health check; print one line per sink, preceded by
    one line per thing it noted (``clickhouse: retention differs: ...``: Ansible's
    clickhouse_schema role looks for these)."""
    guard_secrets(config)
    rc = 0
    for settings in config.sinks:
        sink = ProcessSink(settings)
        try:
            await sink.start()
            for note in await sink.check():
                print(redact(f"{sink.name}: {note}"))
            print(f"{sink.name}: ok")
        except SinkError as exc:
            print(redact(f"{sink.name}: FAILED: {exc}"))
            rc = 1
        finally:
            await sink.stop()
    return rc


class RunningRegional:
    """A regional, started by ``start()``; ``stop()`` drains windows into the sinks and
    shuts down (see the module docstring)."""

    def __init__(self, config: RegionalConfig) -> None:
        problem = config.ingest_auth_error()
        if problem is not None:
            raise ValueError(problem)
        self.config = config
        self.sinks = [ProcessSink(s, child_timeout_s=config.child_timeout) for s in config.sinks]
        #: The write-ahead log's window instances (None: no log).
        self.instances = (InstanceLog(config.wal_dir, len(self.sinks))
                          if config.wal_dir is not None else None)
        instances = self.instances
        self.queues = [
            DeliveryQueue(s, batch_max_blocks=max(500, 2 * config.frame_nodes + 2), batch_max_wait_s=0.5,
                          max_queue_blocks=QUEUE_MAX, health_check=True,
                          on_done=instances.confirmed if instances is not None else None)
            for s in self.sinks
        ]
        self.regional = Regional(merge_settings(config), self.queues, regional_id=config.regional_id,
                                 frames_in_child=config.fork_frames,
                                 max_held_points=config.max_held_points,
                                 max_held_bytes=config.max_held_bytes,
                                 instances=instances)
        self.wal_stats: WalStats | None = None
        self.gate_stats: GateStats | None = None
        self.regional.registry.register(GateCollector(lambda: self.gate_stats))
        if instances is not None:
            self.regional.registry.register(LogStats(instances, lambda: self.wal_stats,
                                                     config.wal_max_bytes, self.regional.clock))
        #: Set when a part of the regional failed on its own (the ingest process died or
        #: hung, the log could not be written): the regional then stops, flushing what it
        #: holds, and exits non-zero.
        self.failed = asyncio.Event()
        self.regional.metrics.insecure.set(1 if config.insecure else 0)
        self._ingest = IngestProcess(config.listen, server_auth(config), self.regional.limits,
                                     QUEUE_RETRY, on_outcome=self.regional.count,
                                     on_accepted=self.regional.accept_admitted,
                                     on_exit=lambda code: self.failed.set(),
                                     on_lag=self.regional.metrics.observe_lag,
                                     wal_settings=(WalSettings(config.wal_dir, config.wal_fsync,
                                                               segment_bytes=config.wal_segment_bytes,
                                                               fsync_timeout_s=config.wal_fsync_timeout)
                                                   if config.wal_dir is not None else None),
                                     on_wal=self._on_wal, rates=config.rate_settings,
                                     on_refused=lambda r: self.regional.metrics.refused.labels(r).inc(),
                                     on_gate=lambda g: setattr(self, "gate_stats", g),
                                     child_timeout_s=config.child_timeout,
                                     on_handshakes=self.regional.metrics.count_handshakes)
        #: Times the ingest process killed a hung merge process (this process, in earlier
        #: runs): recorded in the log directory (regional/liveness.py).
        self.merge_hangs = recorded_merge_hangs(config.wal_dir)
        self.regional.registry.register(ChildHangs(
            lambda: [("merge", self.merge_hangs), ("ingest", self._ingest.hangs)]
            + [(f"sink-{s.name}", s.hangs) for s in self.sinks]))
        self._flusher: asyncio.Task[None] | None = None
        self._lag_monitor: asyncio.Task[None] | None = None
        self._backlog_task: asyncio.Task[None] | None = None
        self._metrics_server: Any = None
        self._query_api: QueryApi | None = None
        #: The read endpoint's port (0: not running).
        self.query_port = 0
        #: Holders of admission_closed(); while any, every batch is answered RETRY.
        self._closers = 0
        self._pressure_lock = asyncio.Lock()
        self._pressure_sent: tuple[int, bool, bool, bool] | None = None
        self._started = False
        self._stop_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0

    def _on_wal(self, stats: WalStats) -> None:
        """The ingest process's log figures, every second (its reader thread)."""
        self.wal_stats = stats
        if self.instances is not None and stats.segment:
            self.instances.active_segment = max(self.instances.active_segment, stats.segment)
        if stats.failed and self._loop is not None and not self.failed.is_set():
            log.critical("the write-ahead log failed (%s): stopping; a supervisor restarts the "
                         "regional, which replays what was logged", stats.failed)
            self._loop.call_soon_threadsafe(self.failed.set)

    def sink(self, name: str) -> ProcessSink:
        return next(s for s in self.sinks if s.name == name)

    async def start(self) -> None:
        """Start every part, in order; if one fails, stop what started and raise."""
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        try:
            for q in self.queues:
                await q.start()
            if self.instances is not None:
                # windows as they were before a restart, before any new batch is taken
                await asyncio.to_thread(self.instances.open)
                await asyncio.to_thread(self.instances.replay, self.regional.aggregator,
                                        self.regional.limits)
            await self._ingest.start()
            self.port = self._ingest.port
            self.regional.metrics.handshakes_counted.set(1 if self._ingest.counts_handshakes else 0)
            self._backlog_task = asyncio.create_task(self._push_backlog())
            self._flusher = asyncio.create_task(flush_forever(self.regional))
            self._lag_monitor = asyncio.create_task(looplag.monitor(
                lambda longest_s, stalls: self.regional.metrics.observe_lag("merge", longest_s, stalls)))
            if self.config.metrics_port:
                self._metrics_server, _ = start_http_server(
                    self.config.metrics_port, addr=self.config.metrics_addr,
                    registry=self.regional.registry)
            if self.config.query_listen and self.config.clickhouse is not None:
                self._query_api = QueryApi(self.config.query_listen, self.sink("clickhouse").query,
                                           self.regional.registry,
                                           max_concurrent=self.config.query_max_concurrent)
                self.query_port = await self._query_api.start()
        except BaseException:
            await self.stop()
            raise

    def _pressure(self) -> tuple[int, bool, bool, bool]:
        """What the gate answers RETRY on: sink backlog, held points at their bound,
        admission closed, the log near its bound."""
        log_full = False
        if self.instances is not None:
            log_full = self.instances.depth()[1] >= 0.9 * self.config.wal_max_bytes
        return (self.regional.backlog, self.regional.held_full, self._closers > 0, log_full)

    async def push_pressure(self, confirm: bool = True) -> None:
        """Hand the gate the current pressure. With ``confirm``, every batch the gate
        accepted so far is merged first (so the pressure counts it), and on return the
        gate answers by it."""
        async with self._pressure_lock:  # sent in the order computed
            if confirm:
                await self._ingest.barrier()
            state = self._pressure()
            if state != self._pressure_sent:
                was_full = self._pressure_sent is not None and self._pressure_sent[1]
                if state[1] and not was_full:
                    log.warning("windows hold %d points (limit %d), %d bytes (limit %d): edges are told "
                                "to RETRY until windows close", self.regional.held_points,
                                self.regional.max_held_points, self.regional.held_bytes,
                                self.regional.max_held_bytes)
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
        """Stop ingest (every acked batch is merged after it), store every window, stop
        the queues (each stops its sink). Idempotent (a second or concurrent call waits
        for the first); safe without start().

        With a write-ahead log, storing is bounded by ``config.stop_timeout``: what is
        not stored by then stays in the log, and the next start stores it."""
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self._stop(grace_s))
        await asyncio.shield(self._stop_task)

    async def _stop(self, grace_s: float) -> None:
        deadline = time.monotonic() + self.config.stop_timeout
        if self._query_api is not None:
            await self._query_api.stop()
        await _cancel(self._lag_monitor)
        await _cancel(self._backlog_task)
        await self._ingest.stop(grace_s)
        await _cancel(self._flusher)
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.shutdown)
            self._metrics_server.server_close()
        try:
            if self.instances is None:
                await self.regional.drain()
            else:
                try:
                    await asyncio.wait_for(self.regional.drain(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    log.warning("stop: not everything was stored within %gs; the rest stays in the "
                                "write-ahead log and is stored after the next start",
                                self.config.stop_timeout)
        finally:
            for q in self.queues:
                if self.instances is not None:
                    left = max(0.0, deadline - time.monotonic())
                    q.stop_timeout_s = min(q.stop_timeout_s, left)
                    if isinstance(q.sink, ProcessSink):
                        q.sink.stop_timeout_s = min(q.sink.stop_timeout_s, left + 5.0)
                await q.stop()
            if self.instances is not None:
                self.instances.close()


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


async def run(config: RegionalConfig) -> int:
    """Run until SIGTERM/SIGINT (0) or until a part fails on its own (1). A part that
    cannot start (a sink unreachable, the port taken) is one line on stderr and 1."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    tune_gc()
    guard_secrets(config)
    running = RunningRegional(config)
    try:
        await running.start()
    except (SinkError, OSError) as exc:
        print(redact(f"stratoscope: error: cannot start the regional: {exc}"), file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("regional up: ingest on %s, resolution %ss, sinks: %s", config.listen, config.resolution_s,
             ", ".join(s.name for s in running.sinks) or "none")
    if config.insecure:
        log.warning("insecure: %s; use it on a trusted network only (docs/SECURITY.md)", insecurity(config))
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(running.failed.wait())
    await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
    for t in (stopped, failed):
        t.cancel()
    log.info("stopping: flushing every window")
    await running.stop()
    if running.failed.is_set():
        log.error("regional stopped because a part of it failed (see above); a supervisor restarts it")
        return 1
    return 0
