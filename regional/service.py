"""The regional's core: merge admitted batches and flush windows to the sinks' queues.

Transport-free: the ingest process (ingest.py) admits batches through its Gate
(gate.py) and hands them over; ``accept_admitted`` merges them and ``count`` counts
every outcome; a periodic task (``flush_forever``) calls ``flush``. The owner
(app.RunningRegional) starts and stops the delivery queues.
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

from stratoscope.regional.auth import REFUSALS
from stratoscope.regional.batchcols import BatchCols
from stratoscope.regional.config import DEFAULT_MAX_HELD_BYTES, DEFAULT_MAX_HELD_POINTS
from stratoscope.regional.delivery import DeliveryQueue
from stratoscope.regional.forkframe import FRAME_CHILD_NICE, ChildFailed, stream_in_fork
from stratoscope.regional.frame import Block, Frame
from stratoscope.regional.handover import unpack
from stratoscope.regional.handshakes import REASONS as HANDSHAKE_REASONS
from stratoscope.regional.instances import InstanceLog
from stratoscope.regional.merge import SATURATION_STAGES, Aggregator, MergeSettings, release_windows
from stratoscope.regional.ratelimit import LIMITS
from stratoscope.regional.validate import REASONS, Limits
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
            "failed": CounterMetricFamily(f"{ns}_failed_blocks", "Blocks a permanent error naming no block kept from the sink: left in the write-ahead log.", labels=["sink"]),
            "dropped": CounterMetricFamily(f"{ns}_dropped_blocks", "Blocks dropped by the queue (always 0: a full queue makes the regional wait and edges RETRY).", labels=["sink"]),
            "dead_lettered": CounterMetricFamily(f"{ns}_dead_letter_blocks", "Blocks the sink can never store, written to its dead-letter directory.", labels=["sink"]),
            "left_for_log": CounterMetricFamily(f"{ns}_left_for_log_blocks", "Blocks not delivered by the stop deadline: stored after the next start, from the write-ahead log.", labels=["sink"]),
            "backpressure_waits": CounterMetricFamily(f"{ns}_backpressure_waits", "Times the regional waited for room in the sink's queue.", labels=["sink"]),
        }
        forgotten = CounterMetricFamily(f"{ns}_store_tokens_forgotten", "Insert tokens an embedded ClickHouse recorded without storing their rows (killed mid-insert), forgotten at start so the replay from the write-ahead log stores the rows.", labels=["sink"])
        blocked = GaugeMetricFamily(f"{ns}_blocked", "1 while deliveries fail for this reason (auth, readonly, missing, too_many_parts and disk_full need a person; unavailable is transient): retried, never dropped.", labels=["sink", "reason"])
        since = GaugeMetricFamily(f"{ns}_seconds_since_delivery", "Seconds blocks have waited since the sink last stored some (0 when none waits).", labels=["sink"])
        queued = GaugeMetricFamily(f"{ns}_queued_blocks", "Blocks waiting or in delivery.", labels=["sink"])
        latency = GaugeMetricFamily(f"{ns}_last_delivery_seconds", "Duration of the last delivery (insert latency).", labels=["sink"])
        for q in self._queues():
            for attr, fam in fams.items():
                fam.add_metric([q.sink.name], getattr(q, attr))
            queued.add_metric([q.sink.name], q.queued)
            latency.add_metric([q.sink.name], q.last_delivery_latency_s or 0.0)
            for reason, v in q.blocked.items():
                blocked.add_metric([q.sink.name, reason], v)
            since.add_metric([q.sink.name], q.seconds_since_delivery)
            forgotten.add_metric([q.sink.name], getattr(q.sink, "tokens_forgotten", 0))
        yield from fams.values()
        yield forgotten
        yield queued
        yield latency
        yield blocked
        yield since


class LogStats(Collector):
    """The write-ahead log on /metrics: depth, age of the oldest data not yet stored,
    what the ingest process wrote, what a start replayed, what was found corrupt."""

    def __init__(self, instances: InstanceLog, writer: Callable[[], Any], max_bytes: int,
                 clock: Callable[[], int]) -> None:
        self._instances = instances
        self._writer = writer
        self._max_bytes = max_bytes
        self._clock = clock

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        ns = "stratoscope_regional_wal"
        inst = self._instances
        segments, nbytes, batches = inst.depth()
        yield GaugeMetricFamily(f"{ns}_segments", "Batch segments the write-ahead log holds.", value=segments)
        yield GaugeMetricFamily(f"{ns}_bytes", "Bytes of the batch segments the write-ahead log holds.", value=nbytes)
        yield GaugeMetricFamily(f"{ns}_bytes_limit", "Log bytes from 90 % of which edges are answered RETRY (--wal-max-bytes).",
                                value=self._max_bytes)
        yield GaugeMetricFamily(f"{ns}_batches", "Batches in the log not yet stored by every sink.", value=batches)
        oldest = inst.oldest_live_start_ns()
        yield GaugeMetricFamily(
            f"{ns}_oldest_unstored_seconds",
            "Age of the start of the oldest closed window not yet stored by every sink (0: none).",
            value=max(0.0, (self._clock() - oldest) / 1e9) if oldest is not None else 0.0)
        w = self._writer()
        yield CounterMetricFamily(f"{ns}_written_batches", "Batches the ingest process logged.", value=w.records if w else 0)
        yield CounterMetricFamily(f"{ns}_written_bytes", "Bytes the ingest process logged.", value=w.bytes if w else 0)
        yield CounterMetricFamily(f"{ns}_fsyncs", "fsync calls of the ingest process's log writer.", value=w.syncs if w else 0)
        yield GaugeMetricFamily(f"{ns}_failed", "1 if the log could not be written, or a write or fsync of it "
                                "stayed in progress for wal_fsync_timeout (the regional then stops).",
                                value=1 if w and w.failed else 0)
        yield GaugeMetricFamily(f"{ns}_fsync_in_progress_seconds",
                                "How long the log's write or fsync in progress has taken (0: none); the "
                                "batches waiting on it are not acknowledged meanwhile. At wal_fsync_timeout "
                                "the regional stops.", value=w.fsync_in_progress_s if w else 0.0)
        yield GaugeMetricFamily(f"{ns}_fsync_longest_seconds",
                                "The longest write or fsync of the log in the last one to two minutes, the one "
                                "in progress included.", value=w.fsync_longest_s if w else 0.0)
        yield CounterMetricFamily(f"{ns}_deleted_segments", "Batch segments deleted once every sink had their batches.",
                                  value=inst.deleted_segments)
        yield CounterMetricFamily(f"{ns}_done_instances", "Window instances every sink confirmed.", value=inst.done_instances)
        r = inst.replay_stats
        replayed = CounterMetricFamily(f"{ns}_replayed_batches", "Batches read back from the log at start, by outcome.",
                                       labels=["outcome"])
        replayed.add_metric(["merged"], r.batches - r.skipped - r.restored - r.invalid)
        replayed.add_metric(["restored"], r.restored)
        replayed.add_metric(["already_stored"], r.skipped)
        replayed.add_metric(["invalid"], r.invalid)
        yield replayed
        yield CounterMetricFamily(f"{ns}_corrupt_records", "Torn or corrupt records found at start (the rest of their file skipped).",
                                  value=r.corruption.records)
        yield CounterMetricFamily(f"{ns}_corrupt_bytes", "Bytes skipped after torn or corrupt records at start.",
                                  value=r.corruption.bytes)


class GateCollector(Collector):
    """The ingest gate's state on /metrics (ingest.GateStats, sent every second)."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        ns = "stratoscope_regional_dedup"
        g = self._stats()
        yield GaugeMetricFamily(f"{ns}_boots", "Boots (node, boot_id) whose batch sequence numbers the "
                                "de-duplication remembers.", value=g.boots if g else 0)
        evicted = CounterMetricFamily(f"{ns}_evicted_boots", "Boots forgotten, by why: own_node (past 64 "
                                      "boots of one node), table (past the table's bound).", labels=["by"])
        evicted.add_metric(["own_node"], g.evicted_by_own_node if g else 0)
        evicted.add_metric(["table"], g.evicted_oldest if g else 0)
        yield evicted
        yield CounterMetricFamily(f"{ns}_floor_jumps", "Times a boot had more than 4,096 sequence numbers "
                                  "seen above its floor and its floor moved up (a gap that old is given up).",
                                  value=g.floor_jumps if g else 0)
        yield GaugeMetricFamily("stratoscope_regional_rate_limited_nodes", "Nodes whose rate-limit buckets "
                                "are kept.", value=g.rate_nodes if g else 0)


class SaturationLog:
    """Logs merged sums clamped at 2^64-1 at most once per ``every_s``, the frames held
    back counted into the next line.

    A node can make the merge clamp every window (counters just under 2^64 pass
    validation), so a line per frame would be a log flood at its command. The line says
    only numbers the regional computed -- the window's start, the counts -- nothing the
    client chose (a family or node name)."""

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log) -> None:
        self.every_s = every_s
        self.clock = clock
        self.logger = logger
        self._last: float | None = None
        self._held_frames = 0
        self._held = dict.fromkeys(SATURATION_STAGES, 0)

    def saturated(self, start_ns: int, resolution_s: int, counts: dict[str, int]) -> None:
        for stage, n in counts.items():
            self._held[stage] = self._held.get(stage, 0) + n
        now = self.clock()
        if self._last is not None and now - self._last < self.every_s:
            self._held_frames += 1
            return
        earlier = f" and {self._held_frames} earlier frame(s)" if self._held_frames else ""
        self.logger.warning(
            "merged sums clamped at 2^64-1 instead of wrapping (%s) in the frame of the %d s window "
            "starting %s%s: some node sends counters near 2^64 "
            "(stratoscope_regional_counter_saturated_total)",
            ", ".join(f"{stage}: {n}" for stage, n in self._held.items()), resolution_s,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start_ns // 1_000_000_000)), earlier)
        self._last = now
        self._held_frames = 0
        self._held = dict.fromkeys(SATURATION_STAGES, 0)


class RegionalMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        ns = "stratoscope_regional"
        self.batches = Counter(f"{ns}_batches", "Batches received, by outcome.", ["status"], registry=registry)
        self.points = Counter(f"{ns}_points", "Points (series) received in accepted batches.", registry=registry)
        self.bytes_in = Counter(f"{ns}_bytes_in", "Serialized bytes of accepted batches.", registry=registry)
        self.bytes_out = Counter(f"{ns}_bytes_out", "Bytes of the merged columns emitted (numpy, uncompressed).", registry=registry)
        self.late = Counter(f"{ns}_late_batches", "Batches for windows already closed.", registry=registry)
        self.rejected = Counter(f"{ns}_rejected_batches", "Invalid batches, by reason (a fixed set: validate.REASONS).", ["reason"], registry=registry)
        for reason in REASONS:  # every series there from the start, at 0
            self.rejected.labels(reason)
        self.refused = Counter(f"{ns}_refused", "Streams and batches refused for who sent them, by reason (a fixed set: auth.REFUSALS): no credentials, an unknown token, a node_id the client did not authenticate as.", ["reason"], registry=registry)
        for reason in REFUSALS:
            self.refused.labels(reason)
        self.handshakes_refused = Counter(f"{ns}_tls_handshakes_refused", "TLS handshakes the ingest port refused before any request (gRPC's TLS layer; counted from the line gRPC writes for each), by reason (a fixed set: handshakes.REASONS): no client certificate, one not issued by the client CA, an expired one, not TLS at all, any other.", ["reason"], registry=registry)
        for reason in HANDSHAKE_REASONS:
            self.handshakes_refused.labels(reason)
        self.handshakes_counted = Gauge(f"{ns}_tls_handshakes_counted", "1 when refused TLS handshakes are counted: TLS is on, and at start the ingest process saw gRPC's line about a plaintext connection of its own to its port (regional/handshakes.py).", registry=registry)
        self.handshake_lines_held_back = Counter(f"{ns}_tls_handshake_log_lines_held_back", "gRPC's lines about refused TLS handshakes not passed on to stderr (one per reason per 10 s is), all counted in tls_handshakes_refused_total.", registry=registry)
        self.ingest_stderr_dropped = Counter(f"{ns}_ingest_stderr_dropped_bytes", "Bytes the ingest process wrote to stderr that were dropped because stderr did not take them (1 MiB may wait).", registry=registry)
        self.insecure = Gauge(f"{ns}_insecure", "1 when the ingest port takes batches without authenticating edges (insecure: true).", registry=registry)
        self.throttled = Counter(f"{ns}_throttled_batches", "Batches answered RETRY because their node was over its rate limit, by limit (batches or bytes per second).", ["limit"], registry=registry)
        for limit in LIMITS:
            self.throttled.labels(limit)
        self.window_lag = Gauge(f"{ns}_window_lag_seconds", "Age of the oldest open window's end.", registry=registry)
        self.blocks = Counter(f"{ns}_blocks", "Merged blocks emitted to sinks.", registry=registry)
        self.flush_seconds = Histogram(f"{ns}_flush_seconds", "Time to close windows into blocks.", registry=registry)
        self.held_points = Gauge(f"{ns}_held_points", "Points and event rows held in windows not yet queued for the sinks (open, late, being reduced).", registry=registry)
        self.held_points_limit = Gauge(f"{ns}_held_points_limit", "Held points at which edges are told to RETRY (--max-held-points).", registry=registry)
        self.held_bytes = Gauge(f"{ns}_held_bytes", "Bytes held in windows not yet queued for the sinks (open, late, being reduced), as the merge accounts them.", registry=registry)
        self.held_bytes_limit = Gauge(f"{ns}_held_bytes_limit", "Held bytes at which edges are told to RETRY (--max-held-bytes).", registry=registry)
        self.held_series = Gauge(f"{ns}_held_series", "Rows held in open and late windows: aggregated series, rows not yet folded, event rows.", registry=registry)
        self.held_bytes_per_series = Gauge(f"{ns}_held_bytes_per_series", "Held bytes per held row in open and late windows (0 when none).", registry=registry)
        self.saturated = Counter(
            f"{ns}_counter_saturated", "Merged sums (a counter, a histogram's count, sum, zero "
            "count or bucket, a profile's samples) clamped at 2^64-1 instead of wrapping, by "
            "stage (a fixed set): window (a node's batches of one window), rollup (the nodes "
            "of a frame added into node \"\"). Counted when the window's frames are emitted.",
            ["stage"], registry=registry)
        for stage in SATURATION_STAGES:
            self.saturated.labels(stage)
        self.frame_fallbacks = Counter(f"{ns}_frame_fallbacks", "Windows reduced in-process because the forked frame child failed.", registry=registry)
        self.loop_stalls = Histogram(
            f"{ns}_event_loop_stall_seconds", "How late an event loop woke from a 10 ms timer, per stall over 1 ms, by process (ingest: acks wait that long; merge).",
            ["process"], buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry)
        self.loop_longest_stall = Gauge(
            f"{ns}_event_loop_longest_stall_seconds", "The longest event-loop stall since start, by process.",
            ["process"], registry=registry)
        self._longest: dict[str, float] = {}

    def count_handshakes(self, refused: dict[str, int], held_back: int, dropped_bytes: int) -> None:
        """What the ingest process's stderr tap saw since its last report
        (regional/handshakes.py)."""
        for reason, n in refused.items():
            self.handshakes_refused.labels(reason).inc(n)
        if held_back:
            self.handshake_lines_held_back.inc(held_back)
        if dropped_bytes:
            self.ingest_stderr_dropped.inc(dropped_bytes)

    def observe_lag(self, process: str, longest_s: float, stalls: list[float]) -> None:
        """Record one period's stalls of ``process``'s event loop (regional/looplag.py)."""
        h = self.loop_stalls.labels(process)
        for s in stalls:
            h.observe(s)
        if longest_s > self._longest.get(process, 0.0):
            self._longest[process] = longest_s
            self.loop_longest_stall.labels(process).set(longest_s)


_STATUS: dict[int, str] = {ingest_pb2.Ack.ACCEPTED: "accepted", ingest_pb2.Ack.REJECTED: "rejected",
           ingest_pb2.Ack.DUPLICATE: "duplicate", ingest_pb2.Ack.RETRY: "retry"}


class Regional:
    def __init__(
        self,
        settings: MergeSettings,
        sinks: list[DeliveryQueue],
        limits: Limits | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], int] = time.time_ns,
        regional_id: str = "regional",
        frames_in_child: bool = False,
        max_held_points: int = DEFAULT_MAX_HELD_POINTS,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
        instances: InstanceLog | None = None,
    ) -> None:
        self.aggregator = Aggregator(settings, regional_id)
        #: The write-ahead log's window instances (regional/instances.py), if logging.
        self.instances = instances
        #: Reduce closed windows in a forked child (regional/forkframe.py), not a thread.
        self.frames_in_child = frames_in_child
        #: Bound on the points held in windows, open or being reduced: past it edges are
        #: answered RETRY (they keep their batches and back off) until windows close.
        #: (Validated where users set it: RegionalConfig.)
        self.max_held_points = max_held_points
        #: Bound on the bytes windows hold (as the merge accounts them), the same way.
        self.max_held_bytes = max_held_bytes
        self._emitting_points = 0
        self._emitting_bytes = 0
        #: Batch limits the ingest process's Gate validates against.
        self.limits = limits or Limits()
        self.sinks = sinks
        self.clock = clock
        self.registry = registry or CollectorRegistry()
        self.metrics = RegionalMetrics(self.registry)
        self.registry.register(_SinkStats(lambda: self.sinks))
        self.metrics.held_points.set_function(lambda: self.held_points)
        self.metrics.held_points_limit.set(max_held_points)
        self.metrics.held_bytes.set_function(lambda: self.held_bytes)
        self.metrics.held_bytes_limit.set(max_held_bytes)
        self.metrics.held_series.set_function(lambda: self.aggregator.held()[1])
        self.metrics.held_bytes_per_series.set_function(self._bytes_per_series)
        self._flush_lock = asyncio.Lock()
        self.saturation_log = SaturationLog()

    @property
    def backlog(self) -> int:
        """The largest sink backlog, in blocks (what RETRY is decided on)."""
        return max((q.queued for q in self.sinks), default=0)

    @property
    def held_points(self) -> int:
        """Points in windows not yet handed to the sinks: open, late, and being reduced."""
        return self.aggregator.held_points() + self._emitting_points

    @property
    def held_bytes(self) -> int:
        """Bytes in windows not yet handed to the sinks: open, late, and being reduced."""
        return self.aggregator.held()[0] + self._emitting_bytes

    def _bytes_per_series(self) -> float:
        nbytes, rows = self.aggregator.held()
        return nbytes / rows if rows else 0.0

    @property
    def held_full(self) -> bool:
        """Whether the merge holds as many bytes or points as it may (edges get RETRY)."""
        return self.held_bytes >= self.max_held_bytes or self.held_points >= self.max_held_points

    def accept_admitted(self, packed: bytes | bytearray | memoryview, size: int | None,
                        pos: int = 0) -> None:
        """Merge a batch the ingest process's Gate accepted, handed over as its decoded
        columns (regional/handover.py), with its write-ahead log position (0: none)."""
        self.count(ingest_pb2.Ack.ACCEPTED, "", unpack(memoryview(packed)), size, pos)

    def count(self, status: int, label: str, cols: BatchCols | None, size: int | None,
              pos: int = 0) -> None:
        """Record an admitted batch into the merge, and count every outcome."""
        self.metrics.batches.labels(_STATUS[status]).inc()
        if status == ingest_pb2.Ack.REJECTED:
            self.metrics.rejected.labels(label).inc()
        elif status == ingest_pb2.Ack.RETRY and label:
            self.metrics.throttled.labels(label).inc()
        if cols is None:
            return
        if pos and self.instances is not None:
            # counted before the batch is in a window: a flush that takes the window (and
            # confirms it) then always finds its segment's count
            self.instances.recorded(pos)
        if self.aggregator.record(cols, pos):
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
            emitting_bytes = sum(w.nbytes for w in due)
            self._emitting_points += emitting  # still in memory until reduced and queued
            self._emitting_bytes += emitting_bytes
            try:
                if due and self.instances is not None:
                    # sealed (and synced) before any of their blocks reaches a sink
                    await asyncio.to_thread(self.instances.seal, due)
                out = await self._reduce_and_queue(due) if due else []
                if due and self.instances is not None:
                    self.instances.emission_complete(due)
            finally:
                self._emitting_points -= emitting
                self._emitting_bytes -= emitting_bytes
                # Off the event loop and piecewise: freeing a window at once holds the
                # GIL for seconds (merge.release_windows).
                await asyncio.to_thread(release_windows, due)
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
            for f in frames.values():
                self._count_saturated(f)
            if self.instances is not None:
                self.instances.emitted(blocks)
            for q in self.sinks:
                # waits while the queue is full: the window stays held (its bytes count
                # against max_held_bytes) and the backlog at its RETRY bound, so edges keep
                # their batches instead
                await q.put(blocks)
        await worker  # re-raises a failure of the in-process reduction
        return out

    def _count_saturated(self, frame: Frame) -> None:
        """Count (and log, rate-limited) the sums a frame's merge clamped at 2^64-1: here,
        as the frame arrives, since it may have been reduced in a forked child."""
        counts = {stage: n for stage, n in frame.saturated.items() if n}
        if not counts:
            return
        for stage, n in counts.items():
            self.metrics.saturated.labels(stage).inc(n)
        self.saturation_log.saturated(frame.start_ns, frame.resolution_s, counts)

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

    async def drain(self) -> None:
        """Flush every window (open or not) and wait until the sinks have it.

        Batches merged while this runs may stay in memory: an owner that admits batches
        concurrently closes admission around it (RunningRegional.drain)."""
        await self.flush(force=True)
        for q in self.sinks:
            await q.flush()


async def flush_forever(regional: Regional, every_s: float = 1.0) -> None:
    """Close due windows every ``every_s`` until cancelled."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await regional.flush()
        except Exception:  # a bug in one flush must not stop the next
            log.exception("flush failed")
