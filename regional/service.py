"""The regional's core: accept a batch (validate, de-duplicate, merge) and flush windows to sinks.

Transport-free: the gRPC server (server.py) calls ``accept``; a periodic task
calls ``flush``. Tests drive it directly.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from stratoscope.regional.batchcols import BatchCols
from stratoscope.regional.dedup import Deduplicator
from stratoscope.regional.delivery import DeliveryQueue
from stratoscope.regional.forkframe import FRAME_CHILD_NICE, ChildFailed, stream_in_fork
from stratoscope.regional.handover import unpack
from stratoscope.regional.merge import Aggregator, MergeSettings
from stratoscope.regional.sinks.base import Block
from stratoscope.regional.validate import BatchRejected, Limits, open_batch, validate
from stratoscope.v1 import batch_pb2 as pb
from stratoscope.v1 import ingest_pb2

log = logging.getLogger("stratoscope.regional")


class _SinkStats(Collector):
    def __init__(self, queues: Callable[[], Iterable[DeliveryQueue]]) -> None:
        self._queues = queues

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        ns = "stratoscope_regional_sink"
        fams = {
            "delivered": CounterMetricFamily(f"{ns}_delivered_blocks", "Blocks delivered.", labels=["sink"]),
            "retried": CounterMetricFamily(f"{ns}_retried", "Delivery attempts retried.", labels=["sink"]),
            "failed": CounterMetricFamily(f"{ns}_failed_blocks", "Blocks dropped on a permanent error.", labels=["sink"]),
            "dropped": CounterMetricFamily(f"{ns}_dropped_blocks", "Blocks dropped because the queue was full.", labels=["sink"]),
        }
        queued = GaugeMetricFamily(f"{ns}_queued_blocks", "Blocks waiting or in delivery.", labels=["sink"])
        latency = GaugeMetricFamily(f"{ns}_last_delivery_seconds", "Duration of the last delivery (insert latency).", labels=["sink"])
        for q in self._queues():
            for attr, fam in fams.items():
                fam.add_metric([q.sink.name], getattr(q, attr))
            queued.add_metric([q.sink.name], q.queued)
            latency.add_metric([q.sink.name], q.last_delivery_latency_s or 0.0)
        yield from fams.values()
        yield queued
        yield latency


class RegionalMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        ns = "stratoscope_regional"
        self.batches = Counter(f"{ns}_batches", "Batches received, by outcome.", ["status"], registry=registry)
        self.points = Counter(f"{ns}_points", "Points (series) received in accepted batches.", registry=registry)
        self.bytes_in = Counter(f"{ns}_bytes_in", "Serialized bytes of accepted batches.", registry=registry)
        self.bytes_out = Counter(f"{ns}_bytes_out", "Bytes of the merged columns emitted (numpy, uncompressed).", registry=registry)
        self.late = Counter(f"{ns}_late_batches", "Batches for windows already closed.", registry=registry)
        self.rejected = Counter(f"{ns}_rejected_batches", "Invalid batches, by reason.", ["reason"], registry=registry)
        self.window_lag = Gauge(f"{ns}_window_lag_seconds", "Age of the oldest open window's end.", registry=registry)
        self.blocks = Counter(f"{ns}_blocks", "Merged blocks emitted to sinks.", registry=registry)
        self.flush_seconds = Histogram(f"{ns}_flush_seconds", "Time to close windows into blocks.", registry=registry)
        self.held_points = Gauge(f"{ns}_held_points", "Points and event rows held in windows not yet queued for the sinks (open, late, being reduced).", registry=registry)
        self.held_points_limit = Gauge(f"{ns}_held_points_limit", "Held points at which edges are told to RETRY (--max-held-points).", registry=registry)
        self.frame_fallbacks = Counter(f"{ns}_frame_fallbacks", "Windows reduced in-process because the forked frame child failed.", registry=registry)


class Gate:
    """Admission of one batch: identity, de-duplication, backpressure, validation.

    Pure (no metrics, no merge) so that it can run where the gRPC server runs: in
    the regional process, or in its ingest process (regional/ingest.py).
    ``backlog`` is the largest sink backlog in blocks, kept current by the owner.
    """

    def __init__(self, limits: Limits | None = None, clock: Callable[[], int] = time.time_ns,
                 max_queued_blocks: int = 50_000) -> None:
        self.limits = limits or Limits()
        self.clock = clock
        self.dedup = Deduplicator()
        self.max_queued_blocks = max_queued_blocks
        self.backlog = 0
        #: Extra reason to answer RETRY (e.g. the hand-over queue to the merge is full).
        self.saturated: Callable[[], bool] = lambda: False
        #: The merge holds as many points in memory as it may (Regional.max_held_points),
        #: kept current by the owner like ``backlog``.
        self.held_full = False
        #: The owner drains windows and takes no new batch until it is done (RETRY).
        self.closed = False

    def admit(self, batch: pb.Batch, peer_node: str | None, size: int | None
              ) -> tuple[ingest_pb2.Ack, BatchCols | None, str]:
        """(ack, columns if ACCEPTED, reason label for metrics)."""
        ack = ingest_pb2.Ack(boot_id=batch.boot_id, seq=batch.seq)
        if peer_node is not None and peer_node != batch.node_id:
            ack.status = ingest_pb2.Ack.REJECTED
            ack.reason = f"node_id {batch.node_id!r} does not match the client certificate ({peer_node!r})"
            return ack, None, "identity"
        # Cheap answers first: a duplicate or a RETRY needs no inflating or validation
        # (an edge told to retry resends the same batch; validating it every time would
        # make an overloaded regional spend its CPU on batches it refuses).
        if self.dedup.seen(batch.node_id, batch.boot_id, batch.seq):
            ack.status = ingest_pb2.Ack.DUPLICATE
            return ack, None, ""
        if self.backlog >= self.max_queued_blocks or self.saturated():
            ack.status = ingest_pb2.Ack.RETRY
            ack.reason = "regional overloaded: sinks are behind"
            return ack, None, ""
        if self.closed:
            ack.status = ingest_pb2.Ack.RETRY
            ack.reason = "regional is draining its windows"
            return ack, None, ""
        if self.held_full:
            ack.status = ingest_pb2.Ack.RETRY
            ack.reason = "regional overloaded: windows in memory are at their limit (max held points)"
            return ack, None, ""
        try:
            whole, inflated = open_batch(batch, self.limits)
            cols = validate(whole, self.limits, self.clock(), inflated if inflated >= 0 else size)
        except BatchRejected as exc:
            log.warning("rejected batch %s/%s/%d: %s", batch.node_id, batch.boot_id, batch.seq, exc)
            ack.status = ingest_pb2.Ack.REJECTED
            ack.reason = str(exc)
            return ack, None, str(exc).split(":")[0][:40]
        self.dedup.add(batch.node_id, batch.boot_id, batch.seq)
        ack.status = ingest_pb2.Ack.ACCEPTED
        return ack, cols, ""


_STATUS: dict[int, str] = {ingest_pb2.Ack.ACCEPTED: "accepted", ingest_pb2.Ack.REJECTED: "rejected",
           ingest_pb2.Ack.DUPLICATE: "duplicate", ingest_pb2.Ack.RETRY: "retry"}


#: Default bound on points held in windows (Regional.max_held_points). A window is held
#: from its first batch until its last frame is queued for the sinks: at 500 k points/s,
#: 60 s windows, 15 s lateness and ~15-25 s to reduce and queue a closed window, that
#: peaks near 50 M. 64 M leaves room for that; in the benchmark a held point costs
#: ~200-300 bytes of the regional's RSS (docs/BENCHMARKS.md, session 9), so ~13-19 GB.
DEFAULT_MAX_HELD_POINTS = 64_000_000


class Regional:
    def __init__(
        self,
        settings: MergeSettings,
        sinks: list[DeliveryQueue],
        limits: Limits | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], int] = time.time_ns,
        regional_id: str = "regional",
        max_queued_blocks: int = 50_000,
        frames_in_child: bool = False,
        max_held_points: int = DEFAULT_MAX_HELD_POINTS,
    ) -> None:
        self.aggregator = Aggregator(settings, regional_id)
        #: Reduce closed windows in a forked child (regional/forkframe.py), not a thread.
        self.frames_in_child = frames_in_child
        #: Bound on the points held in windows, open or being reduced: past it edges are
        #: answered RETRY (they keep their batches and back off) until windows close.
        #: (Validated where users set it: RegionalOptions.)
        self.max_held_points = max_held_points
        self._emitting_points = 0
        self.gate = Gate(limits, clock, max_queued_blocks)
        self.sinks = sinks
        self.clock = clock
        self.registry = registry or CollectorRegistry()
        self.metrics = RegionalMetrics(self.registry)
        self.registry.register(_SinkStats(lambda: self.sinks))
        self.metrics.held_points.set_function(lambda: self.held_points)
        self.metrics.held_points_limit.set(max_held_points)
        self._flush_lock = asyncio.Lock()

    @property
    def backlog(self) -> int:
        """The largest sink backlog, in blocks (what RETRY is decided on)."""
        return max((q.queued for q in self.sinks), default=0)

    @property
    def held_points(self) -> int:
        """Points in windows not yet handed to the sinks: open, late, and being reduced."""
        return self.aggregator.held_points() + self._emitting_points

    @property
    def held_full(self) -> bool:
        """Whether the merge holds as many points as it may (edges get RETRY)."""
        return self.held_points >= self.max_held_points

    def accept(self, batch: pb.Batch, peer_node: str | None = None, size: int | None = None) -> ingest_pb2.Ack:
        """Validate, de-duplicate and merge one batch; the Ack says what happened."""
        self.gate.backlog = self.backlog
        self.gate.held_full = self.held_full
        ack, cols, label = self.gate.admit(batch, peer_node, size)
        self.count(ack.status, label, cols, size)
        return ack

    def accept_admitted(self, packed: bytes | memoryview, size: int | None) -> None:
        """Merge a batch another Gate accepted (an ingest process's), handed over as its
        decoded columns (regional/handover.py)."""
        self.count(ingest_pb2.Ack.ACCEPTED, "", unpack(packed), size)

    def count(self, status: int, label: str, cols: BatchCols | None, size: int | None) -> None:
        """Record an admitted batch into the merge, and count every outcome."""
        self.metrics.batches.labels(_STATUS[status]).inc()
        if status == ingest_pb2.Ack.REJECTED:
            self.metrics.rejected.labels(label).inc()
        if cols is None:
            return
        if self.aggregator.record(cols):
            self.metrics.late.inc()
        self.metrics.points.inc(cols.points)
        if size:
            self.metrics.bytes_in.inc(size)

    async def flush(self, force: bool = False) -> list[Block]:
        """Close due windows and hand their blocks to every sink's queue, a frame (of up
        to MergeSettings.frame_nodes nodes) at a time: sinks write the first frames of a
        window while the next ones are reduced."""
        async with self._flush_lock:
            now = self.clock()
            t0 = time.perf_counter()
            due = self.aggregator.take_due(now, force=force)
            emitting = sum(w.points for w in due)
            self._emitting_points += emitting  # still in memory until reduced and queued
            try:
                out = await self._reduce_and_queue(due) if due else []
            finally:
                self._emitting_points -= emitting
            self.metrics.flush_seconds.observe(time.perf_counter() - t0)
            open_ws = self.aggregator.open_windows()
            res_ns = self.aggregator.settings.resolution_s * 1_000_000_000
            self.metrics.window_lag.set(max(0.0, (now - (open_ws[0] + res_ns)) / 1e9) if open_ws else 0.0)
            return out

    async def _reduce_and_queue(self, due: list[Any]) -> list[Block]:
        """Reduce detached windows and put their blocks on every sink's queue, frame by frame."""
        out: list[Block] = []
        # Reducing takes ~10 ms per node-window: in a thread (and, in a running
        # regional, a forked child), so batches keep being merged and acked.
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[list[Block] | None] = asyncio.Queue()

        def hand_over(blocks: list[Block]) -> None:  # in the worker thread
            loop.call_soon_threadsafe(chunks.put_nowait, blocks)

        worker = asyncio.ensure_future(asyncio.to_thread(self._emit, due, hand_over))
        # scheduled after every chunk the worker handed over (call_soon is FIFO)
        worker.add_done_callback(lambda _: chunks.put_nowait(None))
        while (blocks := await chunks.get()) is not None:
            out.extend(blocks)
            self.metrics.blocks.inc(len(blocks))
            frames = {id(b.frame): b.frame for b in blocks if b.frame is not None}
            self.metrics.bytes_out.inc(sum(f.nbytes for f in frames.values()))
            for q in self.sinks:
                await q.put(blocks)
        await worker  # re-raises a failure of the in-process reduction
        return out

    def _emit(self, due: list[Any], hand_over: Callable[[list[Block]], None]) -> None:
        """Reduce ``due`` chunk by chunk (in a forked child if configured; here for what
        a failed child did not deliver) and hand each chunk's blocks over."""
        delivered = 0
        if self.frames_in_child:
            try:
                for blocks in stream_in_fork(self.aggregator.emit_chunks, due, nice=FRAME_CHILD_NICE):
                    hand_over(blocks)
                    delivered += 1
                return
            except (ChildFailed, OSError, EOFError, pickle.UnpicklingError) as exc:
                log.warning("reducing %d windows in a child failed after %d frames (%s); "
                            "reducing the rest here", len(due), delivered, exc)
                self.metrics.frame_fallbacks.inc()
        for blocks in self.aggregator.emit_chunks(due, skip=delivered):
            hand_over(blocks)

    async def start(self) -> None:
        for q in self.sinks:
            await q.start()

    async def drain(self) -> None:
        """Flush every window (open or not) and wait until the sinks have it.

        Batches merged while this runs may stay in memory: an owner that admits batches
        concurrently closes admission around it (RunningRegional.drain)."""
        await self.flush(force=True)
        for q in self.sinks:
            await q.flush()

    async def stop(self) -> None:
        """Drain, then stop the delivery queues (and their sinks). Idempotent."""
        await self.drain()
        for q in self.sinks:
            await q.stop()
