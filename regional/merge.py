"""The regional aggregator's merge: a pure state machine, record() and flush().

Edge batches (10 s deltas) are assigned to output windows (default 60 s) by
the time their data was read (end_ns - 1). Within a window, counters and
histograms are summed per (node, series) and gauges keep their maximum;
configured families are also rolled up across nodes (node "" in the output).
Work is columnar: record() only remaps a batch's string indices into the
window's string table (one Python step per *string*, not per point) and keeps
the columns; flush() concatenates and reduces them with numpy.

A window closes at its end + allowed lateness. A batch for a closed window is
not lost: it goes into a *late partial* for that window, emitted at the next
flush as separate blocks whose counts add to what was stored before (storage
sums rows; it never overwrites). Block ids are derived from the identities of
the edge batches they contain, so re-emitting the same content gives the same
id and downstream idempotency keys hold.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from regional.columns import group
from regional.sinks.base import Block
from stratoscope import __version__
from stratoscope.v1 import batch_pb2 as pb

NS = 1_000_000_000
_BUCKET_SHIFT = 64  # bucket indices (-1..63 at scale 0) shifted to stay unsigned


@dataclass(frozen=True)
class Rollup:
    """Sum a metric across nodes, keeping only the `by` labels."""

    metric: str
    by: tuple[str, ...] = ()


DEFAULT_ROLLUPS: tuple[Rollup, ...] = (
    Rollup("syscalls_total", ("syscall",)),
    Rollup("syscall_errors_total", ("syscall", "errno")),
    Rollup("syscall_latency", ("syscall",)),
    Rollup("sched_runqueue_latency", ()),
    Rollup("block_latency", ("op",)),
    Rollup("block_bytes_total", ("op",)),
    Rollup("tcp_opens_total", ("direction",)),
    Rollup("tcp_retransmits_total", ()),
    Rollup("process_events_total", ("event",)),
)


@dataclass(frozen=True)
class MergeSettings:
    resolution_s: int = 60
    lateness_s: float = 15.0
    rollups: tuple[Rollup, ...] = DEFAULT_ROLLUPS
    #: Closed windows remembered to route late batches (older ones still merge correctly).
    remember_closed: int = 10_000


class Strings:
    """A window's string table; index 0 is ""."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {"": 0}
        self.items: list[str] = [""]

    def intern_all(self, strings: Iterable[str]) -> npt.NDArray[np.uint32]:
        index, items = self.index, self.items
        out = []
        for s in strings:
            i = index.get(s)
            if i is None:
                i = index[s] = len(items)
                items.append(s)
            out.append(i)
        return np.asarray(out, dtype=np.uint32)

    def __call__(self, s: str) -> int:
        return int(self.intern_all([s])[0])


@dataclass
class _Counters:
    kind: int
    name: int
    unit: int
    help: int
    label_keys: tuple[int, ...]
    keys: list[npt.NDArray[np.uint32]] = field(default_factory=list)
    values: list[npt.NDArray[np.generic]] = field(default_factory=list)


@dataclass
class _Hists:
    name: int
    unit: int
    help: int
    label_keys: tuple[int, ...]
    rows: int = 0
    keys: list[npt.NDArray[np.uint32]] = field(default_factory=list)
    count: list[npt.NDArray[np.uint64]] = field(default_factory=list)
    sum: list[npt.NDArray[np.uint64]] = field(default_factory=list)
    zero: list[npt.NDArray[np.uint64]] = field(default_factory=list)
    b_row: list[npt.NDArray[np.int64]] = field(default_factory=list)
    b_idx: list[npt.NDArray[np.int64]] = field(default_factory=list)
    b_cnt: list[npt.NDArray[np.uint64]] = field(default_factory=list)


ProfileKey = tuple[int, int, int, int, tuple[int, ...] | None, tuple[int, ...] | None]


@dataclass
class _Window:
    start_ns: int
    end_ns: int
    late: bool
    strings: Strings = field(default_factory=Strings)
    counters: dict[tuple[int, int, tuple[int, ...]], _Counters] = field(default_factory=dict)
    hists: dict[tuple[int, tuple[int, ...]], _Hists] = field(default_factory=dict)
    profiles: dict[int, dict[tuple[int, int], dict[ProfileKey, int]]] = field(default_factory=dict)
    events: dict[int, list[tuple[int, ...]]] = field(default_factory=dict)
    events_lost: dict[int, int] = field(default_factory=dict)
    node_labels: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    sources: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    points: int = 0
    #: Scratch for _OutBlock: window string id -> block string index.
    remap: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _u32(values: Iterable[int]) -> npt.NDArray[np.uint32]:
    return np.asarray(values, dtype=np.uint32)


class Aggregator:
    """record() edge batches, flush() merged blocks. No I/O, no clock of its own."""

    def __init__(self, settings: MergeSettings | None = None, regional_id: str = "regional") -> None:
        self.settings = settings or MergeSettings()
        self.regional_id = regional_id
        self._res_ns = self.settings.resolution_s * NS
        self._open: dict[int, _Window] = {}
        self._late: dict[int, _Window] = {}
        self._closed: OrderedDict[int, None] = OrderedDict()
        self.late_batches = 0
        self.points_in = 0
        self._lock = threading.Lock()

    # -- input -------------------------------------------------------------------
    def window_of(self, batch: pb.Batch) -> int:
        return ((batch.end_ns - 1) // self._res_ns) * self._res_ns

    def record(self, batch: pb.Batch) -> bool:
        """Merge one validated batch; returns True if it landed in a late partial."""
        with self._lock:
            return self._record(batch)

    def _record(self, batch: pb.Batch) -> bool:
        ws = self.window_of(batch)
        late = ws in self._closed
        table = self._late if late else self._open
        w = table.get(ws)
        if w is None:
            w = table[ws] = _Window(ws, ws + self._res_ns, late)
        if late:
            self.late_batches += 1
        gmap = w.strings.intern_all(batch.strings)
        node = int(w.strings(batch.node_id))
        w.sources.setdefault(node, []).append((batch.boot_id, batch.seq))
        if batch.node_label_keys:
            w.node_labels[node] = tuple(
                zip(gmap[list(batch.node_label_keys)].tolist(),
                    gmap[list(batch.node_label_values)].tolist(), strict=True)
            )
        for m in batch.metrics:
            self._record_metric(w, gmap, node, m)
        for h in batch.histograms:
            self._record_hist(w, gmap, node, h)
        for p in batch.profiles:
            self._record_profile(w, gmap, node, p)
        if batch.HasField("events"):
            self._record_events(w, gmap, node, batch.events)
        return late

    def _label_matrix(
        self, gmap: npt.NDArray[np.uint32], node: int, keys: int, values: Iterable[int], n: int
    ) -> npt.NDArray[np.uint32]:
        out = np.empty((n, keys + 1), dtype=np.uint32)
        out[:, 0] = node
        if keys:
            out[:, 1:] = gmap[np.asarray(values, dtype=np.int64)].reshape(n, keys)
        return out

    def _record_metric(
        self, w: _Window, gmap: npt.NDArray[np.uint32], node: int, m: pb.MetricBlock
    ) -> None:
        label_keys = tuple(gmap[list(m.label_keys)].tolist()) if m.label_keys else ()
        name = int(gmap[m.name])
        fam = w.counters.get((m.kind, name, label_keys))
        if fam is None:
            fam = w.counters[(m.kind, name, label_keys)] = _Counters(
                m.kind, name, int(gmap[m.unit]), int(gmap[m.help]), label_keys
            )
        if m.kind == pb.GAUGE:
            vals: npt.NDArray[np.generic] = np.asarray(m.gauge_values, dtype=np.float64)
        else:
            vals = np.asarray(m.counter_values, dtype=np.uint64)
        n = len(vals)
        fam.keys.append(self._label_matrix(gmap, node, len(label_keys), m.label_values, n))
        fam.values.append(vals)
        w.points += n
        self.points_in += n

    def _record_hist(
        self, w: _Window, gmap: npt.NDArray[np.uint32], node: int, h: pb.HistogramBlock
    ) -> None:
        label_keys = tuple(gmap[list(h.label_keys)].tolist()) if h.label_keys else ()
        name = int(gmap[h.name])
        fam = w.hists.get((name, label_keys))
        if fam is None:
            fam = w.hists[(name, label_keys)] = _Hists(
                name, int(gmap[h.unit]), int(gmap[h.help]), label_keys
            )
        n = len(h.count)
        fam.keys.append(self._label_matrix(gmap, node, len(label_keys), h.label_values, n))
        fam.count.append(np.asarray(h.count, dtype=np.uint64))
        fam.sum.append(np.asarray(h.sum, dtype=np.uint64))
        fam.zero.append(np.asarray(h.zero_count, dtype=np.uint64))
        offsets = np.asarray(h.bucket_offsets, dtype=np.int64)
        per_series = np.diff(offsets)
        fam.b_row.append(np.repeat(np.arange(n, dtype=np.int64), per_series) + fam.rows)
        fam.b_idx.append(np.asarray(h.bucket_index, dtype=np.int64))
        fam.b_cnt.append(np.asarray(h.bucket_count, dtype=np.uint64))
        fam.rows += n
        w.points += n
        self.points_in += n

    def _record_profile(
        self, w: _Window, gmap: npt.NDArray[np.uint32], node: int, p: pb.ProfileBlock
    ) -> None:
        frames = gmap[np.asarray(p.stack_frames, dtype=np.int64)].tolist() if p.stack_frames else []
        offs = list(p.stack_offsets)
        stacks = [tuple(frames[offs[k] : offs[k + 1]]) for k in range(len(offs) - 1)]
        rows = w.profiles.setdefault(node, {}).setdefault((int(gmap[p.name]), p.period_ns), {})
        comm = gmap[np.asarray(p.comm, dtype=np.int64)].tolist()
        cgroup = gmap[np.asarray(p.cgroup, dtype=np.int64)].tolist()
        for i, n in enumerate(p.samples):
            ks, us = p.kernel_stack[i], p.user_stack[i]
            key = (
                p.pid[i], comm[i], cgroup[i], 0,
                stacks[ks] if ks >= 0 else None, stacks[us] if us >= 0 else None,
            )
            rows[key] = rows.get(key, 0) + n
        w.points += len(p.samples)

    def _record_events(
        self, w: _Window, gmap: npt.NDArray[np.uint32], node: int, e: pb.EventBlock
    ) -> None:
        out = w.events.setdefault(node, [])
        kind = gmap[np.asarray(e.kind, dtype=np.int64)].tolist()
        comm = gmap[np.asarray(e.comm, dtype=np.int64)].tolist()
        cgroup = gmap[np.asarray(e.cgroup, dtype=np.int64)].tolist()
        detail = gmap[np.asarray(e.detail, dtype=np.int64)].tolist()
        for i in range(len(e.time_ns)):
            out.append((e.time_ns[i], kind[i], e.pid[i], e.ppid[i], comm[i], cgroup[i],
                        detail[i], e.code[i]))
        if e.lost:
            w.events_lost[node] = w.events_lost.get(node, 0) + e.lost

    # -- output --------------------------------------------------------------------
    def open_windows(self) -> list[int]:
        with self._lock:
            return sorted(self._open)

    def flush(self, now_ns: int, force: bool = False) -> list[Block]:
        """Blocks for every window past end + lateness (all windows if force), and late partials."""
        return self.emit(self.take_due(now_ns, force))

    def take_due(self, now_ns: int, force: bool = False) -> list[_Window]:
        """Detach the windows to emit (cheap; under the lock record() also takes).

        Split from emit() so a server can build blocks in a worker thread while
        record() keeps accepting batches: a detached window is touched by no one else.
        """
        grace = int(self.settings.lateness_s * NS)
        due: list[_Window] = []
        with self._lock:
            for ws in sorted(self._open):
                w = self._open[ws]
                if force or w.end_ns + grace <= now_ns:
                    del self._open[ws]
                    self._closed[ws] = None
                    due.append(w)
            while len(self._closed) > self.settings.remember_closed:
                self._closed.popitem(last=False)
            due.extend(self._late.pop(ws) for ws in sorted(self._late))
        return due

    def emit(self, windows: list[_Window]) -> list[Block]:
        """Merged blocks of detached windows (the expensive, columnar part)."""
        blocks: list[Block] = []
        for w in windows:
            blocks.extend(self._emit(w))
        return blocks

    def _block_id(self, w: _Window, node: str, sources: Iterable[tuple[str, int]]) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.regional_id}|{self.settings.resolution_s}|{w.start_ns}|{node}|".encode())
        for boot, seq in sorted(sources):
            h.update(f"{boot}:{seq};".encode())
        return h.hexdigest()

    def _emit(self, w: _Window) -> list[Block]:
        counters = [self._reduce_counters(f) for f in w.counters.values()]
        hists = [self._reduce_hists(f) for f in w.hists.values()]
        rollup_counters, rollup_hists = self._rollups(w, counters, hists)
        nodes = sorted(set(w.sources) | set(w.profiles) | set(w.events))
        node_ids = np.asarray(nodes, dtype=np.uint32)
        # Rows are sorted by node first: each node's rows of a family are one slice,
        # found for every node at once.
        c_bounds = [(np.searchsorted(k[:, 0], node_ids, "left"),
                     np.searchsorted(k[:, 0], node_ids, "right")) for _, k, _ in counters]
        h_bounds = [(np.searchsorted(h[1][:, 0], node_ids, "left"),
                     np.searchsorted(h[1][:, 0], node_ids, "right")) for h in hists]
        w.remap = np.zeros(len(w.strings.items), dtype=np.int64)
        blocks = []
        for n, node in enumerate(nodes):
            b = _OutBlock(w, node)
            for (fam, keys, vals), (los, his) in zip(counters, c_bounds, strict=True):
                lo, hi = los[n], his[n]
                b.add_counters(fam, keys[lo:hi], vals[lo:hi])
            for (fam, keys, cnt, sm, zero, b_sid, b_idx, b_cnt), (los, his) in zip(
                hists, h_bounds, strict=True
            ):
                lo, hi = los[n], his[n]
                blo, bhi = np.searchsorted(b_sid, [lo, hi])
                b.add_hists(fam, keys[lo:hi], cnt[lo:hi], sm[lo:hi], zero[lo:hi],
                            b_sid[blo:bhi] - lo, b_idx[blo:bhi], b_cnt[blo:bhi])
            batch = b.build(self._node_meta(w, node))
            sources = w.sources.get(node, [])
            blocks.append(Block(self._block_id(w, w.strings.items[node], sources), batch,
                                self.settings.resolution_s))
        if rollup_counters or rollup_hists:
            b = _OutBlock(w, 0)
            for fam, keys, vals in rollup_counters:
                b.add_counters(fam, keys, vals)
            for fam, keys, cnt, sm, zero, b_sid, b_idx, b_cnt in rollup_hists:
                b.add_hists(fam, keys, cnt, sm, zero, b_sid, b_idx, b_cnt)
            all_sources = [s for node in w.sources for s in
                           ((w.strings.items[node] + "/" + boot, seq) for boot, seq in w.sources[node])]
            blocks.append(Block(self._block_id(w, "*", all_sources),
                                b.build(self._node_meta(w, 0)), self.settings.resolution_s))
        return blocks

    def _node_meta(self, w: _Window, node: int) -> dict[str, object]:
        return {
            "labels": w.node_labels.get(node, ()),
            "profiles": w.profiles.get(node, {}),
            "events": w.events.get(node, []),
            "events_lost": w.events_lost.get(node, 0),
            "late": w.late,
        }

    @staticmethod
    def _reduce_counters(f: _Counters) -> tuple[_Counters, npt.NDArray[np.uint32], npt.NDArray[np.generic]]:
        keys = np.concatenate(f.keys)
        vals = np.concatenate(f.values)
        g = group(keys)
        return f, g.keys, (g.max(vals) if f.kind == pb.GAUGE else g.sum(vals))

    @staticmethod
    def _reduce_hists(f: _Hists) -> tuple:  # type: ignore[type-arg]
        keys = np.concatenate(f.keys)
        g = group(keys)
        cnt = g.sum(np.concatenate(f.count))
        sm = g.sum(np.concatenate(f.sum))
        zero = g.sum(np.concatenate(f.zero))
        b_sid, b_idx, b_cnt = _reduce_buckets(
            g.inverse[np.concatenate(f.b_row)] if f.b_row else np.zeros(0, np.int64),
            np.concatenate(f.b_idx) if f.b_idx else np.zeros(0, np.int64),
            np.concatenate(f.b_cnt) if f.b_cnt else np.zeros(0, np.uint64),
        )
        return f, g.keys, cnt, sm, zero, b_sid, b_idx, b_cnt

    def _rollups(self, w: _Window, counters: list, hists: list) -> tuple[list, list]:  # type: ignore[type-arg]
        rules = {r.metric: r for r in self.settings.rollups}
        out_c, out_h = [], []
        for fam, keys, vals in counters:
            rule = rules.get(w.strings.items[fam.name])
            if rule is None or fam.kind == pb.GAUGE:
                continue
            proj, label_keys = _project(w, fam.label_keys, keys, rule.by)
            g = group(proj)
            rf = _Counters(fam.kind, fam.name, fam.unit, fam.help, label_keys)
            out_c.append((rf, g.keys, g.sum(vals)))
        for fam, keys, cnt, sm, zero, b_sid, b_idx, b_cnt in hists:
            rule = rules.get(w.strings.items[fam.name])
            if rule is None:
                continue
            proj, label_keys = _project(w, fam.label_keys, keys, rule.by)
            g = group(proj)
            rb_sid, rb_idx, rb_cnt = _reduce_buckets(g.inverse[b_sid], b_idx, b_cnt)
            rh = _Hists(fam.name, fam.unit, fam.help, label_keys)
            out_h.append((rh, g.keys, g.sum(cnt), g.sum(sm), g.sum(zero), rb_sid, rb_idx, rb_cnt))
        return out_c, out_h


def _reduce_buckets(
    series: npt.NDArray[np.int64], idx: npt.NDArray[np.int64], cnt: npt.NDArray[np.uint64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.uint64]]:
    if len(series) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint64)
    keys = np.column_stack([series, idx + _BUCKET_SHIFT]).astype(np.uint32)
    g = group(keys)
    return (g.keys[:, 0].astype(np.int64), g.keys[:, 1].astype(np.int64) - _BUCKET_SHIFT,
            g.sum(cnt).astype(np.uint64))


def _project(
    w: _Window, label_keys: tuple[int, ...], keys: npt.NDArray[np.uint32], by: tuple[str, ...]
) -> tuple[npt.NDArray[np.uint32], tuple[int, ...]]:
    names = [w.strings.items[k] for k in label_keys]
    cols = [1 + names.index(b) for b in by if b in names]
    proj = np.zeros((len(keys), 1 + len(cols)), dtype=np.uint32)
    if cols:
        proj[:, 1:] = keys[:, cols]
    return proj, tuple(label_keys[c - 1] for c in cols)


class _OutBlock:
    """Builds one output Batch for one node from window-global string ids."""

    def __init__(self, w: _Window, node: int) -> None:
        self.w = w
        self.node = node
        self._metrics: list = []  # type: ignore[type-arg]
        self._hists: list = []  # type: ignore[type-arg]

    def add_counters(self, fam: _Counters, keys: npt.NDArray[np.uint32], vals: npt.NDArray[np.generic]) -> None:
        if len(keys):
            self._metrics.append((fam, keys[:, 1:], vals))

    def add_hists(self, fam: _Hists, keys: npt.NDArray[np.uint32], cnt: npt.NDArray[np.uint64],
                  sm: npt.NDArray[np.uint64], zero: npt.NDArray[np.uint64],
                  b_sid: npt.NDArray[np.int64], b_idx: npt.NDArray[np.int64],
                  b_cnt: npt.NDArray[np.uint64]) -> None:
        if len(keys):
            self._hists.append((fam, keys[:, 1:], cnt, sm, zero, b_sid, b_idx, b_cnt))

    def build(self, meta: dict) -> pb.Batch:  # type: ignore[type-arg]
        w = self.w
        strings = w.strings.items
        used: list[npt.NDArray[np.uint32]] = [_u32([0, self.node])]
        for fam, labels, _ in self._metrics:
            used += [labels.ravel(), _u32([fam.name, fam.unit, fam.help, *fam.label_keys])]
        for fam, labels, *_ in self._hists:
            used += [labels.ravel(), _u32([fam.name, fam.unit, fam.help, *fam.label_keys])]
        for k, v in meta["labels"]:
            used.append(_u32([k, v]))
        extra: list[int] = []
        for (name, _), rows in meta["profiles"].items():
            extra.append(name)
            for _pid, comm, cgroup, _z, ks, us in rows:
                extra += [comm, cgroup, *(ks or ()), *(us or ())]
        for ev in meta["events"]:
            extra += [ev[1], ev[4], ev[5], ev[6]]
        used.append(_u32(extra))
        table = np.unique(np.concatenate(used))
        remap = w.remap  # window id -> index in this block's table (only `table` entries are read)
        remap[table] = np.arange(len(table))

        def local(g: npt.NDArray[np.uint32] | list[int]) -> npt.NDArray[np.int64]:
            return remap[np.asarray(g, dtype=np.int64)]

        out = pb.Batch(
            node_id=strings[self.node], start_ns=w.start_ns, end_ns=w.end_ns,
            producer=f"stratoscope-regional/{__version__}",
        )
        out.strings.extend(strings[i] for i in table.tolist())
        for k, v in meta["labels"]:
            out.node_label_keys.append(int(local([k])[0]))
            out.node_label_values.append(int(local([v])[0]))
        for fam, labels, vals in self._metrics:
            hdr = local([fam.name, fam.unit, fam.help]).tolist()
            m = out.metrics.add(name=hdr[0], kind=fam.kind, unit=hdr[1], help=hdr[2])
            m.label_keys.extend(local(list(fam.label_keys)).tolist())
            m.label_values.extend(local(labels.ravel()).tolist())
            if fam.kind == pb.GAUGE:
                m.gauge_values.extend(vals.tolist())
            else:
                m.counter_values.extend(vals.tolist())
        for fam, labels, cnt, sm, zero, b_sid, b_idx, b_cnt in self._hists:
            hdr = local([fam.name, fam.unit, fam.help]).tolist()
            h = out.histograms.add(name=hdr[0], unit=hdr[1], help=hdr[2], scale=0)
            h.label_keys.extend(local(list(fam.label_keys)).tolist())
            h.label_values.extend(local(labels.ravel()).tolist())
            h.count.extend(cnt.tolist())
            h.sum.extend(sm.tolist())
            h.zero_count.extend(zero.tolist())
            h.bucket_offsets.extend(np.searchsorted(b_sid, np.arange(len(cnt) + 1)).tolist())
            h.bucket_index.extend(b_idx.tolist())
            h.bucket_count.extend(b_cnt.tolist())
        for (name, period), rows in meta["profiles"].items():
            _add_profile(out.profiles.add(name=int(local([name])[0]), period_ns=period), rows, local)
        if meta["events"] or meta["events_lost"]:
            e = out.events
            for t, kind, pid, ppid, comm, cgroup, detail, code in meta["events"]:
                e.time_ns.append(t)
                e.kind.append(int(local([kind])[0]))
                e.pid.append(pid)
                e.ppid.append(ppid)
                e.comm.append(int(local([comm])[0]))
                e.cgroup.append(int(local([cgroup])[0]))
                e.detail.append(int(local([detail])[0]))
                e.code.append(code)
            e.lost = meta["events_lost"]
        return out


def _add_profile(p: pb.ProfileBlock, rows: dict[ProfileKey, int], local: Any) -> None:
    """Fill one profile block; stacks are deduplicated within it."""
    stack_ids: dict[tuple[int, ...], int] = {}
    offsets = [0]

    def stack_id(frames: tuple[int, ...] | None) -> int:
        if frames is None:
            return -1
        sid = stack_ids.get(frames)
        if sid is None:
            sid = stack_ids[frames] = len(stack_ids)
            p.stack_frames.extend(local(list(frames)).tolist())
            offsets.append(len(p.stack_frames))
        return sid

    for (pid, comm, cgroup, _z, ks, us), n in rows.items():
        p.pid.append(pid)
        p.comm.append(int(local([comm])[0]))
        p.cgroup.append(int(local([cgroup])[0]))
        p.kernel_stack.append(stack_id(ks))
        p.user_stack.append(stack_id(us))
        p.samples.append(n)
    p.stack_offsets.extend(offsets)
