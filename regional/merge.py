"""The regional aggregator's merge: a pure state machine, record() and flush().

Edge batches (10 s deltas) are assigned to output windows (default 60 s) by
the time their data was read (end_ns - 1). Within a window, counters and
histograms are summed per (node, series) and gauges keep their maximum;
families whose description declares a roll-up are also summed across nodes
(node "" in the output; regional/rollups.py).
Profile rows are summed per (node, profile, pid, comm, cgroup, stacks); events
are kept as they are.

Work is columnar. record() maps a batch's strings into the window's string table
(one Python step per *string*, not per point) and keeps the batch's columns and
that map; stacks are interned by their content (one dict lookup per stack).
emit() translates label values through the maps (one gather per family),
concatenates and reduces each family's columns with numpy and returns
one ``Frame`` per window: every node's merged rows at once, which the sinks read
as columns (see regional/frame.py). A node's ``Block`` is a part of the frame.

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
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from stratoscope.regional.batchcols import (
    BatchCols,
    EventCols,
    HistCols,
    MetricCols,
    ProfileCols,
    decode,
)
from stratoscope.regional.columns import group, group_columns, ragged_index
from stratoscope.regional.frame import (
    EVENT_COLS,
    HISTOGRAM,
    PROFILE_COLS,
    Block,
    Family,
    Frame,
    Part,
    StringTable,
    Table,
    blocks_of,
    empty_events,
    empty_hists,
    empty_metrics,
    empty_profiles,
    empty_stacks,
    sort_by_part,
    used_stacks,
)
from stratoscope.regional.rollups import Rollup, declared_rollups
from stratoscope.v1 import batch_pb2 as pb

NS = 1_000_000_000
_BUCKET_SHIFT = 64  # bucket indices (-64..127) shifted to stay unsigned

U32 = npt.NDArray[np.uint32]
U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]


#: The roll-ups the packaged program descriptions declare (regional/rollups.py).
DEFAULT_ROLLUPS: tuple[Rollup, ...] = declared_rollups()


@dataclass(frozen=True)
class MergeSettings:
    resolution_s: int = 60
    lateness_s: float = 15.0
    rollups: tuple[Rollup, ...] = DEFAULT_ROLLUPS
    #: Closed windows remembered to route late batches (older ones still merge correctly).
    remember_closed: int = 10_000
    #: Nodes per frame when a window is reduced (see Aggregator.emit_chunks).
    frame_nodes: int = 250


class _Gmaps:
    """Every recorded batch's map from its string indices to the window's (one array per
    batch, shared by a window and the parts it is split into for emitting).

    Why: record() keeps a family's label values as the batch sent them and the batch's
    index here; emit() translates every chunk of a family with one gather over ``concat()``.
    Translating at record time cost a matrix and three numpy calls per family per batch
    (~170 us of the merge process's busiest thread per 2,000-series batch); at emit it is a
    few calls per family per frame, in the frame child.
    """

    __slots__ = ("items", "_concat")

    def __init__(self) -> None:
        self.items: list[U32] = []
        self._concat: tuple[U32, I64] | None = None

    def add(self, gmap: U32) -> int:
        self.items.append(gmap)
        return len(self.items) - 1

    def concat(self) -> tuple[U32, I64]:
        """(every map end to end, where each batch's starts). Only for a detached window."""
        if self._concat is None or len(self._concat[1]) != len(self.items):
            sizes = np.fromiter(map(len, self.items), dtype=np.int64, count=len(self.items))
            base = np.zeros(len(self.items), dtype=np.int64)
            np.cumsum(sizes[:-1], out=base[1:])
            self._concat = (np.concatenate(self.items) if self.items else np.zeros(0, np.uint32), base)
        return self._concat


@dataclass
class _Chunks:
    """One family's recorded chunks, one per batch: the batch's node (window string id),
    its index in the window's ``_Gmaps`` and its label values (batch string indices,
    row-major: rows x label keys)."""

    nodes: list[int] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    labels: list[U32] = field(default_factory=list)

    def add(self, node: int, batch: int, labels: U32) -> None:
        self.nodes.append(node)
        self.batches.append(batch)
        self.labels.append(labels)


@dataclass
class _Counters(_Chunks):
    kind: int = 0
    name: int = 0
    unit: int = 0
    help: int = 0
    label_keys: tuple[int, ...] = ()
    values: list[npt.NDArray[np.generic]] = field(default_factory=list)


@dataclass
class _Hists(_Chunks):
    name: int = 0
    unit: int = 0
    help: int = 0
    label_keys: tuple[int, ...] = ()
    count: list[U64] = field(default_factory=list)
    sum: list[U64] = field(default_factory=list)
    zero: list[U64] = field(default_factory=list)
    #: the batch's bucket offsets (rows + 1, from 0)
    offsets: list[I64] = field(default_factory=list)
    b_idx: list[I64] = field(default_factory=list)
    b_cnt: list[U64] = field(default_factory=list)


@dataclass
class _Window:
    start_ns: int
    end_ns: int
    late: bool
    strings: StringTable = field(default_factory=StringTable)
    gmaps: _Gmaps = field(default_factory=_Gmaps)
    counters: dict[tuple[int, int, tuple[int, ...]], _Counters] = field(default_factory=dict)
    hists: dict[tuple[int, tuple[int, ...]], _Hists] = field(default_factory=dict)
    #: profile row chunks: PROFILE_COLS with the node instead of the part
    profiles: list[dict[str, npt.NDArray[np.generic]]] = field(default_factory=list)
    #: the window's distinct stacks: their frames' window string ids as bytes -> index,
    #: and their frames
    stack_index: dict[bytes, int] = field(default_factory=dict)
    stacks: list[tuple[I64, U32]] = field(default_factory=list)
    events: list[dict[str, npt.NDArray[np.generic]]] = field(default_factory=list)
    events_lost: dict[int, int] = field(default_factory=dict)
    node_labels: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    sources: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    points: int = 0


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
    def window_of(self, batch: pb.Batch | BatchCols) -> int:
        return ((batch.end_ns - 1) // self._res_ns) * self._res_ns

    def record(self, batch: pb.Batch | BatchCols) -> bool:
        """Merge one validated batch; returns True if it landed in a late partial."""
        cols = decode(batch) if isinstance(batch, pb.Batch) else batch
        with self._lock:
            return self._record(cols)

    def _record(self, b: BatchCols) -> bool:
        ws = self.window_of(b)
        late = ws in self._closed
        table = self._late if late else self._open
        w = table.get(ws)
        if w is None:
            w = table[ws] = _Window(ws, ws + self._res_ns, late)
        if late:
            self.late_batches += 1
        gmap = w.strings.intern_all(b.strings)
        batch = w.gmaps.add(gmap)
        node = w.strings(b.node_id)
        w.sources.setdefault(node, []).append((b.boot_id, b.seq))
        if len(b.node_label_keys):
            w.node_labels[node] = tuple(
                zip(gmap[b.node_label_keys].tolist(), gmap[b.node_label_values].tolist(), strict=True)
            )
        for m in b.metrics:
            self._record_metric(w, gmap, node, batch, m)
        for h in b.histograms:
            self._record_hist(w, gmap, node, batch, h)
        for p in b.profiles:
            self._record_profile(w, gmap, node, p)
        if b.events is not None:
            self._record_events(w, gmap, node, b.events)
        return late

    def _record_metric(self, w: _Window, gmap: U32, node: int, batch: int, m: MetricCols) -> None:
        label_keys = tuple(gmap[m.label_keys].tolist())
        name = int(gmap[m.name])
        fam = w.counters.get((m.kind, name, label_keys))
        if fam is None:
            fam = w.counters[(m.kind, name, label_keys)] = _Counters(
                kind=m.kind, name=name, unit=int(gmap[m.unit]), help=int(gmap[m.help]),
                label_keys=label_keys)
        vals: npt.NDArray[np.generic] = m.gauge_values if m.kind == pb.GAUGE else m.counter_values
        n = len(vals)
        fam.add(node, batch, m.label_values)
        fam.values.append(vals)
        w.points += n
        self.points_in += n

    def _record_hist(self, w: _Window, gmap: U32, node: int, batch: int, h: HistCols) -> None:
        label_keys = tuple(gmap[h.label_keys].tolist())
        name = int(gmap[h.name])
        fam = w.hists.get((name, label_keys))
        if fam is None:
            fam = w.hists[(name, label_keys)] = _Hists(
                name=name, unit=int(gmap[h.unit]), help=int(gmap[h.help]), label_keys=label_keys)
        n = len(h.count)
        fam.add(node, batch, h.label_values)
        fam.count.append(h.count)
        fam.sum.append(h.sum)
        fam.zero.append(h.zero)
        fam.offsets.append(h.offsets)
        fam.b_idx.append(h.bucket_index)
        fam.b_cnt.append(h.bucket_count)
        w.points += n
        self.points_in += n

    def _record_profile(self, w: _Window, gmap: U32, node: int, p: ProfileCols) -> None:
        n = len(p.samples)
        if not n:
            return
        frames = gmap[p.stack_frames]
        # Stacks are interned per window by their content: the bytes of their frames'
        # window string ids, one slice and one dict lookup per *stack* (not per frame).
        # Exact, and ~4x cheaper than hashing the frame column with numpy (193 -> 42 us
        # for a batch of 246 stacks): at 2,400 frames numpy's per-call costs dominate.
        raw = frames.tobytes()
        bounds = (p.stack_offsets * frames.itemsize).tolist()
        keys = [raw[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        index = w.stack_index
        ids = list(map(index.get, keys))
        if None in ids:
            new = []
            for i, v in enumerate(ids):
                if v is None:
                    v = index.get(keys[i])
                    if v is None:
                        v = index[keys[i]] = len(index)
                        new.append(i)
                    ids[i] = v
            off, idx = ragged_index(p.stack_offsets, np.asarray(new, dtype=np.int64))
            w.stacks.append((off, frames[idx]))
        local = np.asarray(ids + [-1], dtype=np.int64)  # index -1: "no stack"
        w.profiles.append({
            "node": np.full(n, node, np.uint32), "name": np.full(n, gmap[p.name], np.uint32),
            "period": np.full(n, p.period_ns, np.uint64), "pid": p.pid,
            "comm": gmap[p.comm], "cgroup": gmap[p.cgroup],
            "kstack": local[p.kernel_stack], "ustack": local[p.user_stack], "samples": p.samples,
        })
        w.points += n

    def _record_events(self, w: _Window, gmap: U32, node: int, e: EventCols) -> None:
        n = len(e.time_ns)
        w.points += n  # event rows are held too: they count against max_held_points
        if n:
            w.events.append({
                "node": np.full(n, node, np.uint32), "time": e.time_ns, "kind": gmap[e.kind],
                "pid": e.pid, "ppid": e.ppid, "comm": gmap[e.comm], "cgroup": gmap[e.cgroup],
                "detail": gmap[e.detail], "code": e.code,
            })
        if e.lost:
            w.events_lost[node] = w.events_lost.get(node, 0) + e.lost

    def held_points(self) -> int:
        """Points and event rows recorded into windows not yet taken for emission (open
        and late): what the regional's memory bound (max_held_points) counts."""
        with self._lock:
            return sum(w.points for w in self._open.values()) + sum(w.points for w in self._late.values())

    # -- output --------------------------------------------------------------------
    def open_windows(self) -> list[int]:
        with self._lock:
            return sorted(self._open)

    def flush(self, now_ns: int, force: bool = False) -> list[Block]:
        """Blocks for every window past end + lateness (all windows if force), and late partials."""
        return self.emit(self.take_due(now_ns, force))

    def take_due(self, now_ns: int, force: bool = False) -> list[_Window]:
        """Detach the windows to emit (cheap; under the lock record() also takes).

        Split from emit() so a server can build frames in a worker thread while
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
        return [b for chunk in self.emit_chunks(windows) for b in chunk]

    def emit_chunks(self, windows: list[_Window], skip: int = 0) -> Iterator[list[Block]]:
        """The blocks of detached windows, one frame of up to ``settings.frame_nodes``
        nodes at a time, so that sinks can write the first while the next is reduced.

        The chunks of a window are fixed by the window alone (its nodes in string-id
        order), so ``skip`` resumes after the first chunks (a caller whose frame child
        died part-way). Each chunk rolls its own nodes up: the roll-up of a window
        arrives as additive partials, like a late batch's.
        """
        n = 0
        for w in windows:
            for sub in _split_by_nodes(w, self.settings.frame_nodes):
                n += 1
                if n <= skip:
                    continue
                yield blocks_of(self.frame(sub))

    def _block_id(self, w: _Window, node: str, sources: list[tuple[str, int]]) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.regional_id}|{self.settings.resolution_s}|{w.start_ns}|{node}|".encode())
        h.update("".join(f"{boot}:{seq};" for boot, seq in sorted(sources)).encode())
        return h.hexdigest()

    def frame(self, w: _Window) -> Frame:
        """Reduce one detached window to its Frame."""
        strings = w.strings.items
        counters = [self._reduce_counters(w, f) for f in w.counters.values()]
        hists = [self._reduce_hists(w, f) for f in w.hists.values()]
        rollup_counters, rollup_hists = self._rollups(w, counters, hists)
        nodes = _window_nodes(w)
        if rollup_counters or rollup_hists:
            nodes.insert(0, 0)  # node "" (string id 0) sorts first
        part_of = np.full(len(strings), -1, dtype=np.int32)
        part_of[nodes] = np.arange(len(nodes), dtype=np.int32)
        parts = []
        all_sources = [(strings[n] + "/" + boot, seq) for n in w.sources for boot, seq in w.sources[n]]
        for node in nodes:
            if node == 0:
                bid = self._block_id(w, "*", all_sources)
            else:
                bid = self._block_id(w, strings[node], w.sources.get(node, []))
            parts.append(Part(node, bid, w.node_labels.get(node, ()), w.events_lost.get(node, 0),
                              len(w.sources.get(node, ())) if node else 0))
        families: list[Family] = []
        m_tables: list[Table] = []
        h_tables: list[Table] = []
        for fam, keys, vals in counters + rollup_counters:
            f = len(families)
            families.append(Family(fam.kind, fam.name, fam.unit, fam.help, fam.label_keys))
            m_tables.append(_metric_table(part_of, f, fam.kind, keys, vals))
        for fam, keys, cnt, sm, zero, b_sid, b_idx, b_cnt in hists + rollup_hists:
            f = len(families)
            families.append(Family(HISTOGRAM, fam.name, fam.unit, fam.help, fam.label_keys))
            h_tables.append(_hist_table(part_of, f, keys, cnt, sm, zero, b_sid, b_idx, b_cnt))
        profiles, stacks = self._reduce_profiles(w, part_of)
        events = _event_table(w, part_of)
        return Frame(
            w.start_ns, w.end_ns, self.settings.resolution_s, w.late, strings, parts, families,
            metrics=sort_by_part(Table.concat(m_tables)) if m_tables else empty_metrics(),
            histograms=sort_by_part(Table.concat(h_tables)) if h_tables else empty_hists(),
            profiles=profiles, stacks=stacks, events=events,
        )

    @staticmethod
    def _reduce_counters(w: _Window, f: _Counters) -> tuple[_Counters, U32, npt.NDArray[np.generic]]:
        vals = np.concatenate(f.values)
        keys = _keys(w, f, list(map(len, f.values)))
        g = group(keys)
        return f, g.keys, (g.max(vals) if f.kind == pb.GAUGE else g.sum(vals))

    @staticmethod
    def _reduce_hists(w: _Window, f: _Hists) -> tuple:  # type: ignore[type-arg]
        rows = list(map(len, f.count))
        keys = _keys(w, f, rows)
        g = group(keys)
        cnt = g.sum(np.concatenate(f.count))
        sm = g.sum(np.concatenate(f.sum))
        zero = g.sum(np.concatenate(f.zero))
        b_sid, b_idx, b_cnt = _reduce_buckets(
            g.inverse[_bucket_rows(f.offsets, rows)], np.concatenate(f.b_idx), np.concatenate(f.b_cnt),
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
            rf = _Counters(kind=fam.kind, name=fam.name, unit=fam.unit, help=fam.help, label_keys=label_keys)
            out_c.append((rf, g.keys, g.sum(vals)))
        for fam, keys, cnt, sm, zero, b_sid, b_idx, b_cnt in hists:
            rule = rules.get(w.strings.items[fam.name])
            if rule is None:
                continue
            proj, label_keys = _project(w, fam.label_keys, keys, rule.by)
            g = group(proj)
            rb_sid, rb_idx, rb_cnt = _reduce_buckets(g.inverse[b_sid], b_idx, b_cnt)
            rh = _Hists(name=fam.name, unit=fam.unit, help=fam.help, label_keys=label_keys)
            out_h.append((rh, g.keys, g.sum(cnt), g.sum(sm), g.sum(zero), rb_sid, rb_idx, rb_cnt))
        return out_c, out_h

    @staticmethod
    def _reduce_profiles(w: _Window, part_of: npt.NDArray[np.int32]) -> tuple[Table, Table]:
        if not w.profiles:
            return empty_profiles(), empty_stacks()
        stacks = _stack_table(w.stacks)
        cols = {k: np.concatenate([c[k] for c in w.profiles]) for k in w.profiles[0]}
        # (name, period) pairs are few: a small id instead of a 64-bit period in the key
        kind = _pair_ids(cols["name"], cols["period"])
        order, starts, _ = group_columns([
            cols["node"], kind.astype(np.uint32), cols["pid"], cols["comm"], cols["cgroup"],
            (cols["kstack"] + 1).astype(np.uint64), (cols["ustack"] + 1).astype(np.uint64),
        ])
        rep = order[starts]
        out = {
            "part": part_of[cols["node"][rep]], "name": cols["name"][rep],
            "period": cols["period"][rep], "pid": cols["pid"][rep], "comm": cols["comm"][rep],
            "cgroup": cols["cgroup"][rep], "kstack": cols["kstack"][rep], "ustack": cols["ustack"][rep],
            "samples": np.add.reduceat(cols["samples"][order], starts).astype(np.uint64),
        }
        rows = np.lexsort((out["period"], out["name"], out["part"]))
        t = Table({k: out[k][rows].astype(PROFILE_COLS[k]) for k in PROFILE_COLS})
        # only the stacks these rows use: the parts of a split window share its stacks,
        # and a frame carries (and a sink hashes) just its own
        return t, used_stacks(t, stacks)


def release_windows(windows: list[_Window]) -> None:
    """Free detached, already reduced windows one chunk at a time (run it in a worker
    thread); ``windows`` is emptied.

    Why: a window of a few thousand nodes holds hundreds of thousands of column
    arrays. Dropped at once, they are freed in one deallocation cascade that holds the
    GIL throughout: 1.9 s at ~600 k points/s (loadtest/regional_throughput.py, the
    merge process's event-loop stall), during which the process neither merges nor
    hands frames to the sinks. Freed one chunk per step, the interpreter hands the GIL
    to the other threads between steps (sys.setswitchinterval).

    Only containers private to the window are emptied: the string table is left whole
    (frames reduced in this process share its list of strings).
    """
    while windows:
        w = windows.pop()
        for fams in (w.counters, w.hists):
            while fams:
                _, f = fams.popitem()
                for chunks in vars(f).values():
                    if isinstance(chunks, list):
                        while chunks:
                            chunks.pop()
        for chunks in (w.profiles, w.events, w.stacks, w.gmaps.items):
            while chunks:
                chunks.pop()
        w.gmaps._concat = None


def _stack_table(chunks: list[tuple[I64, U32]]) -> Table:
    """A window's stacks (recorded chunks of new stacks) as one table, in id order."""
    if not chunks:  # profile rows whose stacks are all absent (-1)
        return empty_stacks()
    tables = [Table({"id": np.zeros(len(off) - 1, np.int64)}, {"frames": (off, {"values": frames})})
              for off, frames in chunks]
    return tables[0] if len(tables) == 1 else Table.concat(tables)


def _window_nodes(w: _Window) -> list[int]:
    return sorted(set(w.sources) | {int(c["node"][0]) for c in w.profiles}
                  | {int(c["node"][0]) for c in w.events})


def _split_by_nodes(w: _Window, chunk: int) -> Iterator[_Window]:
    """``w`` as windows of up to ``chunk`` nodes each (``w`` itself if it is small).

    Every recorded column chunk comes from one batch, so from one node: splitting
    moves whole chunks, in one pass over them (a pass per part made this quadratic:
    a third of a 3,400-node window's reduction). The parts share the window's string
    maps and its stacks (each frame keeps only the stacks its rows use).
    """
    nodes = _window_nodes(w)
    if len(nodes) <= chunk:
        yield w
        return
    part_of = {n: i // chunk for i, n in enumerate(nodes)}
    # the window's stacks concatenated once, not once per part
    full = _stack_table(w.stacks)
    frames: U32 = np.asarray(full.values("frames", "values"), dtype=np.uint32)
    stacks = [(full.offsets("frames"), frames)] if len(full) else []
    subs = [_Window(w.start_ns, w.end_ns, w.late, strings=w.strings, gmaps=w.gmaps,
                    stack_index=w.stack_index, stacks=stacks) for _ in range(0, len(nodes), chunk)]
    for attr in ("sources", "node_labels", "events_lost"):
        for n, v in getattr(w, attr).items():
            getattr(subs[part_of[n]], attr)[n] = v
    for c in w.profiles:
        subs[part_of[int(c["node"][0])]].profiles.append(c)
    for c in w.events:
        subs[part_of[int(c["node"][0])]].events.append(c)
    for key, fam in w.counters.items():
        for j, node in enumerate(fam.nodes):
            if len(fam.values[j]):
                sub = subs[part_of[node]]
                sf = sub.counters.get(key)
                if sf is None:
                    sf = sub.counters[key] = _Counters(kind=fam.kind, name=fam.name, unit=fam.unit,
                                                       help=fam.help, label_keys=fam.label_keys)
                sf.add(node, fam.batches[j], fam.labels[j])
                sf.values.append(fam.values[j])
    for hkey, h in w.hists.items():
        for j, node in enumerate(h.nodes):
            if len(h.count[j]):
                sub = subs[part_of[node]]
                sh = sub.hists.get(hkey)
                if sh is None:
                    sh = sub.hists[hkey] = _Hists(name=h.name, unit=h.unit, help=h.help,
                                                  label_keys=h.label_keys)
                sh.add(node, h.batches[j], h.labels[j])
                sh.count.append(h.count[j])
                sh.sum.append(h.sum[j])
                sh.zero.append(h.zero[j])
                sh.offsets.append(h.offsets[j])
                sh.b_idx.append(h.b_idx[j])
                sh.b_cnt.append(h.b_cnt[j])
    yield from subs


def _keys(w: _Window, f: _Counters | _Hists, rows: list[int]) -> U32:
    """A family's key matrix: one row per recorded series, the node (window string id)
    then the label values translated to window string ids (see ``_Gmaps``)."""
    k = len(f.label_keys)
    counts = np.asarray(rows, dtype=np.int64)
    n = int(counts.sum())
    keys = np.empty((n, k + 1), dtype=np.uint32)
    keys[:, 0] = np.repeat(np.asarray(f.nodes, dtype=np.uint32), counts)
    if k and n:
        allg, base = w.gmaps.concat()
        local = np.concatenate(f.labels).astype(np.int64)
        local += np.repeat(base[f.batches], counts * k)
        keys[:, 1:] = allg[local].reshape(n, k)
    return keys


def _bucket_rows(offsets: list[I64], rows: list[int]) -> I64:
    """For every bucket of a family's chunks, the row (series) it belongs to, counted
    across the chunks: from each chunk's bucket offsets (rows + 1 of them, from 0, as
    validate() guarantees for every histogram block)."""
    if not offsets:
        return np.zeros(0, dtype=np.int64)
    flat: I64 = np.concatenate(offsets).astype(np.int64, copy=False)
    # the diff across two chunks' offsets (last of one, first of the next) is no row
    ends = np.cumsum(np.asarray(rows, dtype=np.int64) + 1)[:-1] - 1
    widths: I64 = np.delete(flat[1:] - flat[:-1], ends)
    return np.repeat(np.arange(len(widths), dtype=np.int64), widths)


def _pair_ids(name: U32, period: U64) -> I64:
    """Small ids of (name, period) pairs; rows come in long runs of one pair (a chunk each)."""
    ids: dict[tuple[int, int], int] = {}
    change = np.ones(len(name), dtype=bool)
    change[1:] = (name[1:] != name[:-1]) | (period[1:] != period[:-1])
    starts = np.flatnonzero(change)
    run_ids = [ids.setdefault((a, b), len(ids)) for a, b in
               zip(name[starts].tolist(), period[starts].tolist(), strict=True)]
    lens = np.diff(np.append(starts, len(name)))
    return np.repeat(np.asarray(run_ids, dtype=np.int64), lens)


def _metric_table(part_of: npt.NDArray[np.int32], fam: int, kind: int, keys: U32,
                  vals: npt.NDArray[np.generic]) -> Table:
    n, k = keys.shape[0], keys.shape[1] - 1
    return Table(
        {"part": part_of[keys[:, 0]], "fam": np.full(n, fam, np.int32),
         "value": vals if kind != pb.GAUGE else np.zeros(n, np.uint64),
         "gauge": vals.astype(np.float64) if kind == pb.GAUGE else np.zeros(n, np.float64)},
        {"labels": (np.arange(n + 1, dtype=np.int64) * k, {"values": np.ascontiguousarray(keys[:, 1:]).ravel()})},
    )


def _hist_table(part_of: npt.NDArray[np.int32], fam: int, keys: U32, cnt: U64, sm: U64, zero: U64,
                b_sid: I64, b_idx: I64, b_cnt: U64) -> Table:
    n, k = keys.shape[0], keys.shape[1] - 1
    return Table(
        {"part": part_of[keys[:, 0]], "fam": np.full(n, fam, np.int32),
         "count": cnt, "sum": sm, "zero": zero},
        {"labels": (np.arange(n + 1, dtype=np.int64) * k, {"values": np.ascontiguousarray(keys[:, 1:]).ravel()}),
         "buckets": (np.searchsorted(b_sid, np.arange(n + 1)).astype(np.int64),
                     {"index": b_idx.astype(np.int16), "count": b_cnt.astype(np.uint64)})},
    )


def _event_table(w: _Window, part_of: npt.NDArray[np.int32]) -> Table:
    if not w.events:
        return empty_events()
    cols = {k: np.concatenate([c[k] for c in w.events]) for k in w.events[0]}
    part = part_of[cols.pop("node")]
    rows = np.argsort(part, kind="stable")
    cols["part"] = part
    return Table({k: cols[k][rows].astype(t) for k, t in EVENT_COLS.items()})


#: Cells (series x bucket range) of one dense bucket accumulation pass (128 MB of float64).
_DENSE_CELLS = 1 << 24
#: float64 sums are exact while every partial sum stays below 2^53.
_EXACT_F64 = 1 << 53


def _reduce_buckets(series: I64, idx: I64, cnt: U64) -> tuple[I64, I64, U64]:
    """Sum bucket counts per (series, bucket index); output sorted by series, then index.

    Dense (series x bucket range) bincounts over ranges of series -- linear, no sort --
    exact while the total count stays below 2^53 (a window of sample counts always
    does); otherwise one sort of packed (series, index) keys.
    """
    if len(series) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint64)
    lo, hi = int(idx.min()), int(idx.max())
    width = hi - lo + 1
    n_series = int(series.max()) + 1
    if int(cnt.sum(dtype=np.uint64)) < _EXACT_F64:
        step = max(1, _DENSE_CELLS // width)
        cell = series * width + (idx - lo)
        weights = cnt.astype(np.float64)
        out_s, out_i, out_c = [], [], []
        for a in range(0, n_series, step):
            b = min(n_series, a + step)
            if a == 0 and b == n_series:
                sel_cell, sel_w = cell, weights
            else:
                sel = (series >= a) & (series < b)
                sel_cell, sel_w = cell[sel] - a * width, weights[sel]
            dense = np.bincount(sel_cell, weights=sel_w, minlength=(b - a) * width)
            cells = np.flatnonzero(dense)
            out_s.append(cells // width + a)
            out_i.append(cells % width + lo)
            out_c.append(dense[cells].astype(np.uint64))
        return (np.concatenate(out_s).astype(np.int64), np.concatenate(out_i).astype(np.int64),
                np.concatenate(out_c))
    key = (series.astype(np.uint64) << np.uint64(8)) | (idx + _BUCKET_SHIFT).astype(np.uint64)
    order = np.argsort(key)
    k = key[order]
    starts = np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))
    uk = k[starts]
    return ((uk >> np.uint64(8)).astype(np.int64), (uk & np.uint64(0xFF)).astype(np.int64) - _BUCKET_SHIFT,
            np.add.reduceat(cnt[order], starts).astype(np.uint64))


def _project(
    w: _Window, label_keys: tuple[int, ...], keys: U32, by: tuple[str, ...]
) -> tuple[U32, tuple[int, ...]]:
    names = [w.strings.items[k] for k in label_keys]
    cols = [1 + names.index(b) for b in by if b in names]
    proj = np.zeros((len(keys), 1 + len(cols)), dtype=np.uint32)
    if cols:
        proj[:, 1:] = keys[:, cols]
    return proj, tuple(label_keys[c - 1] for c in cols)
