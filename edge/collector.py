"""The edge collector: load programs, drain them every interval, emit batches.

One thread does everything: between drains it polls the ring buffers; at each
interval it flips every program's maps, waits out in-flight BPF programs, reads
the idle copies, decodes, bounds and builds one Batch. Pure decode/bound/build
logic lives in other modules; this one only sequences it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from stratoscope import __version__
from stratoscope.edge.batch import BatchBuilder, EventRow
from stratoscope.edge.bound import OTHER, bound_series
from stratoscope.edge.config import EdgeConfig
from stratoscope.edge.decode import (
    DecodeContext,
    Histogram,
    ProfileRow,
    decode_counters,
    decode_event,
    decode_histogram,
    decode_profile,
    event_struct,
)
from stratoscope.edge.decoders.cgroups import CgroupResolver
from stratoscope.edge.errors import LoadError
from stratoscope.edge.memory import release_compiler_pages
from stratoscope.edge.metrics import BpfRunStats, EdgeMetrics
from stratoscope.edge.privileges import enable_bpf_stats
from stratoscope.edge.program import LoadedProgram
from stratoscope.edge.spec import (
    CountersMap,
    EventsMap,
    HistogramMap,
    ProfileMap,
    default_bpf_dir,
    discover,
    label_keys,
    load_spec,
    unbounded_labels,
)
from stratoscope.heap import release_free_memory
from stratoscope.v1 import batch_pb2 as pb

log = logging.getLogger("stratoscope.edge")
V = TypeVar("V")
Labels = tuple[str, ...]

#: After a flip, programs that read the old slot may still be running; they run
#: for microseconds, so this wait makes the idle copy quiescent before reading.
FLIP_GRACE_S = 0.02


def _sysctl(name: str) -> str:
    """kernel.<name>'s value, for a message ("?" when it cannot be read)."""
    try:
        return Path(f"/proc/sys/kernel/{name}").read_text().strip()
    except OSError:
        return "?"


def _monotonic_to_wall_ns() -> int:
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@dataclass
class _EventSource:
    program: str
    spec: EventsMap
    struct: Any


class Collector:
    def __init__(
        self,
        cfg: EdgeConfig,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], int] = time.time_ns,
        cgroups: CgroupResolver | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.registry = registry or CollectorRegistry()
        self.metrics = EdgeMetrics(self.registry)
        self.registry.register(BpfRunStats(self._run_stats))
        self.bpf_dir = cfg.bpf_dir or default_bpf_dir()
        self.ctx = DecodeContext(cgroups=cgroups or CgroupResolver())
        self.boot_id = str(uuid.uuid4())
        self.seq = 0
        self.programs: list[LoadedProgram] = []
        self.failed: dict[str, str] = {}
        self._events: list[EventRow] = []
        self._events_dropped = 0
        self._event_sources: dict[tuple[str, str], _EventSource] = {}
        self._window_start = 0
        self._ksyms: Any = None
        self._usyms: Any = None
        self._lock = threading.Lock()
        #: BPF_ENABLE_STATS's descriptor: run-time statistics stay on while it is open.
        self._bpf_stats_fd: int | None = None

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        """Load every configured program. Explicitly requested programs must attach."""
        if self.cfg.bpf_stats and self._bpf_stats_fd is None:
            self._bpf_stats_fd = enable_bpf_stats()
        specs = discover(self.bpf_dir)
        for name in self.cfg.programs:
            if name not in specs:
                raise LoadError(name, f"no description {name}.yaml in {self.bpf_dir}")
            spec = load_spec(specs[name])
            prog = LoadedProgram(spec, self.bpf_dir, self.cfg.params.get(name, {}))
            try:
                prog.load(on_event=self._event_callback(name))
            except LoadError as exc:
                self.metrics.attach_failures.labels(name).inc()
                self.metrics.programs_attached.labels(name).set(0)
                if self.cfg.programs_explicit:
                    self.stop()
                    raise
                log.warning("%s; continuing without it", exc)
                self.failed[name] = exc.reason
                continue
            for m in prog.maps:
                if isinstance(m, EventsMap):
                    self._event_sources[(name, m.name)] = _EventSource(name, m, event_struct(m))
            self.programs.append(prog)
            self.metrics.programs_attached.labels(name).set(1)
            self.metrics.program_fallback.labels(name).set(1 if prog.fallback_reason else 0)
        if not self.programs:
            raise LoadError(",".join(self.cfg.programs), "no program could be attached")
        if self._decodes("ksym_stack"):
            self._load_kernel_symbols()
        release_free_memory()  # LLVM's compile-time heap: ~70 MB of RSS otherwise
        release_compiler_pages()  # LLVM's and clang's code: ~80 MB of RSS otherwise
        self._window_start = self.clock()

    def stop(self) -> None:
        """Detach everything; safe twice and without start()."""
        programs, self.programs = self.programs, []
        for p in programs:
            p.close()
        fd, self._bpf_stats_fd = self._bpf_stats_fd, None
        if fd is not None:  # the kernel counts while any such descriptor is open
            os.close(fd)

    @property
    def symbolizes_user_stacks(self) -> bool:
        """Whether a loaded program's samples carry user stacks to name (which reads other
        processes' /proc/PID/maps: edge/privileges.py keeps CAP_SYS_PTRACE for it)."""
        return self._decodes("usym_stack")

    def _decodes(self, decoder: str) -> bool:
        return any(f.decoder == decoder for p in self.programs for m in p.maps
                   if isinstance(m, ProfileMap) for f in m.key)

    def _load_kernel_symbols(self) -> None:
        """Read /proc/kallsyms now, while the process has its start-up capabilities.

        The kernel decides when the file is opened whether to show addresses: to an opener
        with CAP_SYSLOG (or to anyone with kernel.kptr_restrict=0 and
        kernel.perf_event_paranoid<=1). The edge drops CAP_SYSLOG after start-up
        (edge/privileges.py), so a later first read would see only zeros. Loaded after the
        programs, so their own ``bpf_prog_*`` symbols are in it too.
        """
        from stratoscope.edge.decoders.ksyms import KernelSymbols

        self._ksyms = KernelSymbols()
        if not len(self._ksyms):
            log.warning(
                "profile: kernel stacks show as [unknown]: /proc/kallsyms hid its addresses "
                "(kernel.kptr_restrict=%s, kernel.perf_event_paranoid=%s); grant CAP_SYSLOG "
                "for start-up to name them",
                _sysctl("kptr_restrict"), _sysctl("perf_event_paranoid"))

    # -- events ----------------------------------------------------------------
    def _event_callback(self, program: str) -> Callable[[str, bytes], None]:
        def on_event(map_name: str, data: bytes) -> None:
            src = self._event_sources.get((program, map_name))
            if src is None:
                return
            if len(self._events) >= self.cfg.limits.events_per_batch:
                self._events_dropped += 1
                self.metrics.events_lost.labels(program, "user").inc()
                return
            try:
                d = decode_event(src.spec, src.struct, data, self.ctx)
            except Exception as exc:
                self.metrics.decoder_errors.labels(program).inc()
                log.debug("undecodable event from %s: %s", program, exc)
                return
            self._events.append(EventRow(
                # bpf_ktime_get_ns is CLOCK_MONOTONIC: move it onto the wall clock.
                time_ns=int(d.get("time_ns", 0)) + _monotonic_to_wall_ns(),
                kind=str(d.get("kind", "")),
                pid=int(d.get("pid", 0)), ppid=int(d.get("ppid", 0)),
                comm=str(d.get("comm", "")), cgroup=str(d.get("cgroup", "")),
                detail=str(d.get("detail", "")), code=int(d.get("code", 0)),
            ))

        return on_event

    def poll(self, timeout_s: float) -> None:
        """Wait up to timeout_s for ring-buffer events (sleeps when there are none)."""
        pollers = [p for p in self.programs if p.has_events]
        if not pollers:
            time.sleep(timeout_s)
            return
        share = max(int(timeout_s * 1000 / len(pollers)), 1)
        for p in pollers:
            p.poll_events(share)

    # -- draining ------------------------------------------------------------
    def drain(self) -> pb.Batch:
        """Close the current window and return its batch."""
        t0 = time.perf_counter()
        for p in self.programs:
            p.consume_events()
        end = self.clock()
        for p in self.programs:
            p.flip()
        time.sleep(FLIP_GRACE_S)
        self.seq += 1
        builder = BatchBuilder(
            node_id=self.cfg.node_id, boot_id=self.boot_id, seq=self.seq,
            start_ns=self._window_start, end_ns=end, node_labels=self.cfg.labels,
            producer=f"stratoscope-edge/{__version__}",
        )
        self._window_start = end
        for p in self.programs:
            self._drain_program(p, builder)
        lost = self._events_dropped
        for p in self.programs:
            kernel_lost = p.lost_events()
            if kernel_lost:
                self.metrics.events_lost.labels(p.name, "kernel").inc(kernel_lost)
            lost += kernel_lost
        builder.add_events(self._events, lost)
        self._events, self._events_dropped = [], 0
        batch = builder.build()
        release_free_memory()  # symbolization's transient parse objects
        self.metrics.batches.inc()
        self.metrics.batch_bytes.observe(batch.ByteSize())
        self.metrics.drain_seconds.observe(time.perf_counter() - t0)
        self.metrics.last_drain.set_to_current_time()
        return batch

    def _drain_program(self, p: LoadedProgram, b: BatchBuilder) -> None:
        errors_before = self.ctx.errors
        raw = p.read_idle()
        limit = self.cfg.limits.series_per_metric
        n_series = 0
        # Histograms first: a counter may also count a histogram's samples (taken
        # here, before the bound folds histograms into one another).
        hists: dict[str, dict[Labels, Histogram]] = {}
        samples: dict[str, dict[Labels, int]] = {}
        for rm in raw.maps:
            m = rm.spec
            if isinstance(m, HistogramMap):
                hist = decode_histogram(m, rm.rows, self.ctx)
                if rm.other_rows:
                    _merge_other(
                        hist, decode_histogram(m, rm.other_rows, self.ctx), label_keys(m.key),
                        unbounded_labels(m.key), _merge_hist,
                    )
                hists[m.name] = hist
                samples[m.name] = {labels: h.count for labels, h in hist.items() if h.count}
        for rm in raw.maps:
            m = rm.spec
            if isinstance(m, CountersMap | HistogramMap | ProfileMap) and m.overflow:
                self.metrics.map_overflow.labels(p.name, m.name).inc(rm.overflowed)
                self.metrics.map_overflow_lost.labels(p.name, m.name).inc(rm.overflow_lost)
            if isinstance(m, CountersMap):
                keys = label_keys(m.key)
                unb = unbounded_labels(m.key)
                decoded = decode_counters(m, rm.rows, self.ctx)
                if rm.other_rows:
                    other = decode_counters(m, rm.other_rows, self.ctx)
                    for metric, series in other.items():
                        _merge_other(decoded[metric], series, keys, unb, int.__add__)
                for v in m.values:
                    counted = decoded[v.metric]
                    for labels, n in samples.get(v.plus_samples_of or "", {}).items():
                        counted[labels] = counted.get(labels, 0) + n
                    series, folded = bound_series(
                        counted, keys, unb, limit, int, int.__add__
                    )
                    self._count_folded(p.name, v.metric, folded)
                    n_series += len(series)
                    kind = pb.GAUGE if v.kind == "gauge" else pb.COUNTER
                    b.add_counters(v.metric, v.unit, v.help, keys, series, kind)
            elif isinstance(m, HistogramMap):
                keys = label_keys(m.key)
                hist, folded = bound_series(
                    hists[m.name], keys, unbounded_labels(m.key), limit,
                    lambda h: h.count, _merge_hist,
                )
                self._count_folded(p.name, m.metric, folded)
                n_series += len(hist)
                b.add_histograms(m.metric, m.unit, m.help, keys, hist)
            elif isinstance(m, ProfileMap):
                rows = decode_profile(
                    m, rm.rows, raw.stacks.get(m.name, {}), self.ctx,
                    self._kernel_symbol, self._user_symbol,
                )
                if rm.other_rows:
                    other_rows = decode_profile(
                        m, rm.other_rows, raw.stacks.get(m.name, {}), self.ctx,
                        self._kernel_symbol, self._user_symbol,
                    )
                    for row, n in other_rows.items():  # the kernel keeps only the kernel stack
                        key = ProfileRow(0, OTHER, OTHER, row.kernel_stack, None)
                        rows[key] = rows.get(key, 0) + n
                rows = self._bound_profile(p.name, m.metric, rows)
                n_series += len(rows)
                freq = next(
                    (p.params[pe.frequency_param] for pe in p.spec.perf_events), 0
                )
                b.add_profile(m.metric, int(1e9 / freq) if freq else 0, rows)
        self.metrics.series.labels(p.name).set(n_series)
        if self.ctx.errors > errors_before:
            self.metrics.decoder_errors.labels(p.name).inc(self.ctx.errors - errors_before)

    def _count_folded(self, program: str, metric: str, folded: int) -> None:
        if folded:
            self.metrics.folded.labels(program, metric).inc(folded)

    def _bound_profile(
        self, program: str, metric: str, rows: dict[ProfileRow, int]
    ) -> dict[ProfileRow, int]:
        limit = self.cfg.limits.profile_rows
        if len(rows) <= limit:
            return rows
        ranked = sorted(rows.items(), key=lambda kv: -kv[1])
        out = dict(ranked[: limit - 1])
        other = ProfileRow(0, OTHER, OTHER, None, None)
        out[other] = sum(n for _, n in ranked[limit - 1 :])
        self._count_folded(program, metric, len(ranked) - (limit - 1))
        return out

    def _kernel_symbol(self, addr: int) -> str:
        if self._ksyms is None:
            from stratoscope.edge.decoders.ksyms import KernelSymbols

            self._ksyms = KernelSymbols()
        return str(self._ksyms.resolve(addr))

    def _user_symbol(self, pid: int, addr: int) -> str:
        if self._usyms is None:
            from stratoscope.edge.decoders.usyms import UserSymbols

            self._usyms = UserSymbols()
        return str(self._usyms.resolve(pid, addr))

    def _run_stats(self) -> Iterable[tuple[str, int, int]]:
        for p in list(self.programs):
            runs, ns = p.run_stats()
            yield p.name, runs, ns

    # -- the loop --------------------------------------------------------------
    def run(self, emit: Callable[[pb.Batch], None], stop: threading.Event) -> int:
        """Drain every interval until stop is set (or duration/once); final drain on exit."""
        started = time.monotonic()
        deadline = started + self.cfg.interval
        end_at = started + self.cfg.duration if self.cfg.duration else None
        while not stop.is_set():
            now = time.monotonic()
            if end_at is not None and now >= end_at:
                break
            if now >= deadline:
                emit(self.drain())
                if self.cfg.once:
                    return 0
                deadline += self.cfg.interval
                if deadline < now:  # fell behind: skip, do not burst
                    deadline = now + self.cfg.interval
                continue
            wake = min(deadline, end_at) if end_at is not None else deadline
            self.poll(min(wake - now, 0.25))
        emit(self.drain())
        return 0


def _merge_other(
    into: dict[Labels, V], other: dict[Labels, V], keys: list[str], unbounded: set[str],
    merge: Callable[[V, V], V],
) -> None:
    """Add the kernel's overflow series to the decoded ones, unbounded labels as "other".

    The kernel writes comm "other" and cgroup 0; relabelling every unbounded
    label to OTHER gives them the same labels as series the top-N bound folds,
    so both kinds of "other" add up in one series.
    """
    positions = [i for i, k in enumerate(keys) if k in unbounded]
    for labels, value in other.items():
        relabelled = list(labels)
        for i in positions:
            relabelled[i] = OTHER
        key = tuple(relabelled)
        into[key] = merge(into[key], value) if key in into else value


def _merge_hist(a: Histogram, b: Histogram) -> Histogram:
    a.merge(b)
    return a


