"""The regional aggregator's merge: a pure state machine, record() and flush().

Edge batches (10 s deltas) are assigned to output windows (default 60 s) by
the time their data was read (end_ns - 1). Within a window, counters and
histograms are summed per (node, series) and gauges keep their maximum;
families whose description declares a roll-up are also summed across nodes
(node "" in the output; regional/rollups.py).
Profile rows are summed per (node, profile, pid, comm, cgroup, stacks); events
are kept as they are.

Every sum saturates at 2^64-1 instead of wrapping (regional/columns.py,
``saturating_reduceat``): validation keeps each batch's sums under 2^64, but not the
sum of a node's batches in a window nor that of the nodes in a roll-up, and a wrapped
uint64 (2^64-1 + 2 stored as 1) would be a plausible, wrong number. Each clamped sum is
counted by stage (``SATURATION_STAGES``) in the frame it ends up in
(``Frame.saturated``), which the regional adds to
``stratoscope_regional_counter_saturated_total`` when the frame reaches it: frames may be
reduced in a forked child, whose own counters nobody would see. A count is of clamps, not
of series: a sum already at 2^64-1 that a later fold adds to is clamped, and counted, again.

A window holds its aggregate, not its inputs. record() maps a batch's strings
into the window's string table (one Python step per *string*, not per point),
translates each family's label values to window string ids (one gather per family)
and appends the rows to the family's *pending* rows in the batch's *shard* (the
window's nodes in groups of ``fold_nodes``, by arrival). Once a shard's pending rows
are as many as its aggregate's (and at least ``fold_min_rows``), they are *folded*:
aggregate and pending rows are grouped by their bit-packed keys and summed (numpy,
regional/columns.py), so a window's memory follows its distinct series, not the points
it received, and each point is grouped a bounded number of times (amortized: the
pending rows a fold takes are at least the aggregate it re-reads). Why shards: a
fold's time is the shard's, not the window's (the merge process's event loop runs it:
tens of milliseconds, not seconds), and the shards are the frames' building blocks.
Stacks are interned per window by their content.

A window closes at its end + allowed lateness. emit() folds each shard's last pending
rows and returns one ``Frame`` per ``frame_nodes`` nodes (whole shards): every node's
merged rows at once, which the sinks read as columns (see regional/frame.py). A node's
``Block`` is a part of the frame.

A batch for a closed window is not lost: it goes into a *late partial* for that window,
emitted at the next flush as separate blocks whose counts add to what was stored
before (storage sums rows; it never overwrites). Block ids are derived from the
identities of the edge batches they contain, so re-emitting the same content gives
the same id and downstream idempotency keys hold.

Every window keeps an account of the bytes it holds (``held_bytes``: its arrays, and
a fixed cost per string, batch identity and array object), which the regional's
memory bound (``max_held_bytes``) is checked against.
"""

from __future__ import annotations

import hashlib
import math
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
from stratoscope.regional.columns import (
    exact_total,
    group,
    group_columns,
    ragged_index,
    saturating_reduceat,
)
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
from stratoscope.regional.wal import SEGMENT_SHIFT
from stratoscope.v1 import batch_pb2 as pb

NS = 1_000_000_000
_BUCKET_SHIFT = 64  # bucket indices (-64..127) shifted to stay unsigned

U32 = npt.NDArray[np.uint32]
U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
I16 = npt.NDArray[np.int16]

#: Accounted bytes beyond array data (held_bytes): a numpy array object; a string in
#: the window's table (str object, dict entry, list slot); a batch's identity in a
#: window's sources (a tuple, its boot id and seq, a list slot). Measured with
#: sys.getsizeof and tracemalloc on CPython 3.11 / numpy 2, rounded up.
ARRAY_BYTES = 112
STRING_BYTES = 120
SOURCE_BYTES = 160


#: Where a sum can saturate (the ``stage`` label of
#: stratoscope_regional_counter_saturated_total, a fixed set): "window", adding a node's
#: batches of one window (counters, histogram counts, sums, zero counts and buckets,
#: profile samples); "rollup", adding the nodes of a frame into node "". Coarser
#: resolutions (the hourly tables) are summed by ClickHouse, not here.
SATURATION_STAGES = ("window", "rollup")

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
    #: Nodes per shard, the unit a window's rows are folded in (the module docstring);
    #: the shards are gcd(fold_nodes, frame_nodes) nodes so that frames are whole shards.
    fold_nodes: int = 25
    #: A shard folds once its pending rows are at least this many (and at least its
    #: aggregate's rows): below it the numpy calls per family cost more than the rows.
    fold_min_rows: int = 32_768


def _nbytes(*arrays: npt.NDArray[np.generic]) -> int:
    n = ARRAY_BYTES * len(arrays)
    for a in arrays:
        n += a.nbytes
    return n


class _Counters:
    """One counter or gauge family's rows in one shard: the aggregate (if folded) first,
    then the pending chunks. Keys are (rows x 1 + label keys) matrices of window string
    ids: the node, then the label values."""

    __slots__ = ("kind", "name", "unit", "help", "label_keys", "keys", "values", "folded")

    def __init__(self, kind: int, name: int, unit: int, help: int, label_keys: tuple[int, ...]) -> None:
        self.kind, self.name, self.unit, self.help, self.label_keys = kind, name, unit, help, label_keys
        self.keys: list[U32] = []
        self.values: list[npt.NDArray[np.generic]] = []
        #: whether keys[0] is the aggregate (unique, sorted keys)
        self.folded = False

    def fold(self) -> tuple[int, int]:
        """Group the rows into the aggregate; returns its rows and the sums clamped at
        2^64-1."""
        if len(self.keys) == 1 and self.folded:
            return len(self.keys[0]), 0
        keys = np.concatenate(self.keys) if len(self.keys) > 1 else self.keys[0]
        vals = np.concatenate(self.values) if len(self.values) > 1 else self.values[0]
        g = group(keys)
        self.keys = [g.keys]
        clamped = 0
        if self.kind == pb.GAUGE:
            self.values = [g.max(vals)]
        else:
            total, clamped = g.sum(vals)  # type: ignore[arg-type]
            self.values = [total]
        self.folded = True
        return len(g.keys), clamped

    def nbytes(self) -> int:
        return _nbytes(*self.keys, *self.values)


class _Hists:
    """One histogram family's rows in one shard (like ``_Counters``); each chunk's bucket
    offsets are its rows + 1, from 0."""

    __slots__ = ("name", "unit", "help", "label_keys", "keys", "count", "sum", "zero", "offsets",
                 "b_idx", "b_cnt", "folded")

    def __init__(self, name: int, unit: int, help: int, label_keys: tuple[int, ...]) -> None:
        self.name, self.unit, self.help, self.label_keys = name, unit, help, label_keys
        self.keys: list[U32] = []
        self.count: list[npt.NDArray[np.generic]] = []
        self.sum: list[npt.NDArray[np.generic]] = []
        self.zero: list[npt.NDArray[np.generic]] = []
        self.offsets: list[I64] = []
        self.b_idx: list[I16] = []
        self.b_cnt: list[U64] = []
        self.folded = False

    def fold(self) -> tuple[int, int]:
        """Like ``_Counters.fold``; each column (count, sum, zero count, every bucket)
        saturates on its own."""
        if len(self.keys) == 1 and self.folded:
            return len(self.keys[0]), 0
        rows = list(map(len, self.count))
        g = group(np.concatenate(self.keys))
        n = len(g.keys)
        series = g.inverse[_bucket_rows(self.offsets, rows)]
        b_sid, b_idx, b_cnt, clamped = _reduce_buckets(series, np.concatenate(self.b_idx),
                                                       np.concatenate(self.b_cnt))
        self.keys = [g.keys]
        sums: list[list[npt.NDArray[np.generic]]] = []
        for col in (self.count, self.sum, self.zero):
            total, k = g.sum(np.concatenate(col))
            sums.append([total])
            clamped += k
        self.count, self.sum, self.zero = sums
        self.offsets = [np.searchsorted(b_sid, np.arange(n + 1)).astype(np.int64)]
        self.b_idx = [b_idx.astype(np.int16)]
        self.b_cnt = [b_cnt]
        self.folded = True
        return n, clamped

    def nbytes(self) -> int:
        return _nbytes(*self.keys, *self.count, *self.sum, *self.zero, *self.offsets, *self.b_idx, *self.b_cnt)


#: Profile row columns while a window is held: PROFILE_COLS with the node instead of the part.
_PROFILE_KEYS = ("node", "name", "period", "pid", "comm", "cgroup", "kstack", "ustack")


class _Profiles:
    """One shard's profile rows: chunks of columns (``_PROFILE_KEYS`` and ``samples``),
    the aggregate (if folded) first."""

    __slots__ = ("chunks", "folded")

    def __init__(self) -> None:
        self.chunks: list[dict[str, npt.NDArray[np.generic]]] = []
        self.folded = False

    def fold(self) -> tuple[int, int]:
        """Sum the rows of equal keys; returns the rows and the sample sums clamped."""
        if not self.chunks:
            return 0, 0
        if len(self.chunks) == 1 and self.folded:
            return len(self.chunks[0]["samples"]), 0
        cols = {k: np.concatenate([c[k] for c in self.chunks]) for k in self.chunks[0]}
        # (name, period) pairs are few: a small id instead of a 64-bit period in the key
        kind = _pair_ids(cols["name"], cols["period"])
        order, starts, _ = group_columns([
            cols["node"], kind.astype(np.uint32), cols["pid"], cols["comm"], cols["cgroup"],
            (cols["kstack"] + 1).astype(np.uint64), (cols["ustack"] + 1).astype(np.uint64),
        ])
        rep = order[starts]
        out = {k: cols[k][rep] for k in _PROFILE_KEYS}
        out["samples"], clamped = saturating_reduceat(cols["samples"][order].astype(np.uint64, copy=False),
                                                      starts)
        self.chunks = [out]
        self.folded = True
        return len(starts), clamped

    def nbytes(self) -> int:
        return sum(_nbytes(*c.values()) for c in self.chunks)


@dataclass
class _Shard:
    """The rows of up to ``fold_nodes`` nodes of a window, folded together."""

    counters: dict[tuple[int, int, tuple[int, ...]], _Counters] = field(default_factory=dict)
    hists: dict[tuple[int, tuple[int, ...]], _Hists] = field(default_factory=dict)
    profiles: _Profiles = field(default_factory=_Profiles)
    #: rows recorded since the last fold, and the aggregate's rows after it
    pending: int = 0
    rows: int = 0
    #: accounted bytes of every family's rows and the profile rows
    nbytes: int = 0
    #: sums clamped at 2^64-1 by this shard's folds (stage "window"), reported with the
    #: frame the shard ends up in
    saturated: int = 0

    def fold(self) -> None:
        """Fold every family's pending rows into its aggregate (and re-account the bytes)."""
        if not self.pending:
            return
        rows = nbytes = clamped = 0
        families: list[_Counters | _Hists] = [*self.counters.values(), *self.hists.values()]
        for fam in families:
            if fam.keys:
                r, k = fam.fold()
                rows, clamped = rows + r, clamped + k
                nbytes += fam.nbytes()
        r, k = self.profiles.fold()
        rows, clamped = rows + r, clamped + k
        nbytes += self.profiles.nbytes()
        self.rows, self.pending, self.nbytes = rows, 0, nbytes
        self.saturated += clamped


@dataclass
class _Window:
    start_ns: int
    end_ns: int
    late: bool
    strings: StringTable = field(default_factory=StringTable)
    #: every node (window string id) -> its arrival rank in the window (shards and
    #: frames are ranges of ranks)
    rank: dict[int, int] = field(default_factory=dict)
    shards: dict[int, _Shard] = field(default_factory=dict)
    #: the window's distinct stacks: their frames' window string ids as bytes -> index,
    #: and their frames
    stack_index: dict[bytes, int] = field(default_factory=dict)
    stacks: list[tuple[I64, U32]] = field(default_factory=list)
    events: list[dict[str, npt.NDArray[np.generic]]] = field(default_factory=list)
    events_lost: dict[int, int] = field(default_factory=dict)
    node_labels: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    sources: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    #: series points, profile rows and event rows received (what max_held_points counts)
    points: int = 0
    #: accounted bytes outside the shards: strings, sources, stacks, events
    own_bytes: int = 0
    event_rows: int = 0
    #: the write-ahead log position of the newest batch recorded (0 without a log), and
    #: how many of its batches each log segment holds (regional/instances.py)
    max_pos: int = 0
    segments: dict[int, int] = field(default_factory=dict)
    #: set once the instance is sealed: what ``max_pos`` was then (its identity in the log)
    seal_pos: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes the window holds, as accounted (the module docstring)."""
        return self.own_bytes + sum(s.nbytes for s in self.shards.values())

    @property
    def series(self) -> int:
        """Rows the window holds: its shards' aggregates and pending rows, and event rows."""
        return sum(s.rows + s.pending for s in self.shards.values()) + self.event_rows


class Aggregator:
    """record() edge batches, flush() merged blocks. No I/O, no clock of its own."""

    def __init__(self, settings: MergeSettings | None = None, regional_id: str = "regional") -> None:
        self.settings = settings or MergeSettings()
        self.regional_id = regional_id
        self._res_ns = self.settings.resolution_s * NS
        #: nodes per shard: frames (frame_nodes) are whole shards
        self._shard_nodes = math.gcd(self.settings.fold_nodes, self.settings.frame_nodes)
        self._open: dict[int, _Window] = {}
        self._late: dict[int, _Window] = {}
        self._closed: OrderedDict[int, None] = OrderedDict()
        #: window instances rebuilt from the log that were sealed before a restart:
        #: (start, seal position) -> window, emitted by the next take_due as they are
        self._restored: dict[tuple[int, int], _Window] = {}
        self.late_batches = 0
        self.points_in = 0
        self._lock = threading.Lock()

    # -- input -------------------------------------------------------------------
    def window_of(self, batch: pb.Batch | BatchCols) -> int:
        return ((batch.end_ns - 1) // self._res_ns) * self._res_ns

    def record(self, batch: pb.Batch | BatchCols, pos: int = 0) -> bool:
        """Merge one validated batch (``pos``: its write-ahead log position, given in
        increasing order); returns True if it landed in a late partial."""
        cols = decode(batch) if isinstance(batch, pb.Batch) else batch
        with self._lock:
            return self._record(cols, pos)

    def restore(self, batch: BatchCols, pos: int, seal_pos: int, late: bool) -> None:
        """Merge a batch read back from the log into the window instance it was sealed
        in before a restart (``seal_pos``): the instance is emitted again as it was, so
        its blocks keep their identities."""
        ws = self.window_of(batch)
        with self._lock:
            w = self._restored.get((ws, seal_pos))
            if w is None:
                w = self._restored[(ws, seal_pos)] = _Window(ws, ws + self._res_ns, late, seal_pos=seal_pos)
            self._record(batch, pos, w)

    def mark_closed(self, start_ns: int) -> None:
        """Window ``start_ns`` was closed before a restart: batches for it are late."""
        with self._lock:
            self._closed[start_ns] = None

    def _record(self, b: BatchCols, pos: int, w: _Window | None = None) -> bool:
        ws = self.window_of(b)
        late = False
        if w is None:
            late = ws in self._closed
            table = self._late if late else self._open
            w = table.get(ws)
            if w is None:
                w = table[ws] = _Window(ws, ws + self._res_ns, late)
            if late:
                self.late_batches += 1
        if pos:
            w.max_pos = max(w.max_pos, pos)
            seg = pos >> SEGMENT_SHIFT
            w.segments[seg] = w.segments.get(seg, 0) + 1
        n_strings = len(w.strings.items)
        gmap = w.strings.intern_all(b.strings)
        node = w.strings(b.node_id)
        rank = w.rank.get(node)
        if rank is None:
            rank = w.rank[node] = len(w.rank)
        shard = w.shards.get(rank // self._shard_nodes)
        if shard is None:
            shard = w.shards[rank // self._shard_nodes] = _Shard()
        w.sources.setdefault(node, []).append((b.boot_id, b.seq))
        if len(b.node_label_keys):
            w.node_labels[node] = tuple(
                zip(gmap[b.node_label_keys].tolist(), gmap[b.node_label_values].tolist(), strict=True)
            )
        rows = nbytes = 0
        for m in b.metrics:
            r, nb = self._record_metric(shard, gmap, node, m)
            rows, nbytes = rows + r, nbytes + nb
        for h in b.histograms:
            r, nb = self._record_hist(shard, gmap, node, h)
            rows, nbytes = rows + r, nbytes + nb
        n_stack_chunks = len(w.stacks)
        for p in b.profiles:
            r, nb = self._record_profile(w, shard, gmap, node, p)
            rows, nbytes = rows + r, nbytes + nb
        w.own_bytes += (STRING_BYTES * (len(w.strings.items) - n_strings) + SOURCE_BYTES
                        + sum(_nbytes(off, fr) for off, fr in w.stacks[n_stack_chunks:]))
        if b.events is not None:
            w.own_bytes += self._record_events(w, gmap, node, b.events)
        w.points += rows
        shard.pending += rows
        shard.nbytes += nbytes
        if shard.pending >= max(shard.rows, self.settings.fold_min_rows):
            shard.fold()
        return late

    def _record_metric(self, shard: _Shard, gmap: U32, node: int, m: MetricCols) -> tuple[int, int]:
        label_keys = tuple(gmap[m.label_keys].tolist())
        name = int(gmap[m.name])
        fam = shard.counters.get((m.kind, name, label_keys))
        if fam is None:
            fam = shard.counters[(m.kind, name, label_keys)] = _Counters(
                m.kind, name, int(gmap[m.unit]), int(gmap[m.help]), label_keys)
        vals: npt.NDArray[np.generic] = m.gauge_values if m.kind == pb.GAUGE else m.counter_values
        n = len(vals)
        self.points_in += n
        if not n:
            return 0, 0
        keys = _series_keys(gmap, node, m.label_values, n, len(label_keys))
        vals = np.array(vals)  # a copy: a view would keep the whole hand-over buffer
        fam.keys.append(keys)
        fam.values.append(vals)
        return n, keys.nbytes + vals.nbytes + 2 * ARRAY_BYTES

    def _record_hist(self, shard: _Shard, gmap: U32, node: int, h: HistCols) -> tuple[int, int]:
        label_keys = tuple(gmap[h.label_keys].tolist())
        name = int(gmap[h.name])
        fam = shard.hists.get((name, label_keys))
        if fam is None:
            fam = shard.hists[(name, label_keys)] = _Hists(
                name, int(gmap[h.unit]), int(gmap[h.help]), label_keys)
        n = len(h.count)
        self.points_in += n
        if not n:
            return 0, 0
        arrays = (_series_keys(gmap, node, h.label_values, n, len(label_keys)),
                  np.array(h.count), np.array(h.sum), np.array(h.zero), np.array(h.offsets, dtype=np.int64),
                  h.bucket_index.astype(np.int16), np.array(h.bucket_count))
        for chunks, a in zip((fam.keys, fam.count, fam.sum, fam.zero, fam.offsets, fam.b_idx, fam.b_cnt),
                             arrays, strict=True):
            chunks.append(a)  # type: ignore[attr-defined]
        return n, _nbytes(*arrays)

    def _record_profile(self, w: _Window, shard: _Shard, gmap: U32, node: int,
                        p: ProfileCols) -> tuple[int, int]:
        n = len(p.samples)
        if not n:
            return 0, 0
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
        chunk: dict[str, npt.NDArray[np.generic]] = {
            "node": np.full(n, node, np.uint32), "name": np.full(n, gmap[p.name], np.uint32),
            "period": np.full(n, p.period_ns, np.uint64), "pid": np.array(p.pid),
            "comm": gmap[p.comm], "cgroup": gmap[p.cgroup],
            "kstack": local[p.kernel_stack], "ustack": local[p.user_stack], "samples": np.array(p.samples),
        }
        shard.profiles.chunks.append(chunk)
        return n, _nbytes(*chunk.values())

    def _record_events(self, w: _Window, gmap: U32, node: int, e: EventCols) -> int:
        """Keep a batch's event rows (copied off the hand-over buffer); returns their bytes."""
        n = len(e.time_ns)
        w.points += n  # event rows are held too: they count against max_held_points
        if e.lost:
            w.events_lost[node] = w.events_lost.get(node, 0) + e.lost
        if not n:
            return 0
        chunk: dict[str, npt.NDArray[np.generic]] = {
            "node": np.full(n, node, np.uint32), "time": np.array(e.time_ns), "kind": gmap[e.kind],
            "pid": np.array(e.pid), "ppid": np.array(e.ppid), "comm": gmap[e.comm], "cgroup": gmap[e.cgroup],
            "detail": gmap[e.detail], "code": np.array(e.code),
        }
        w.events.append(chunk)
        w.event_rows += n
        return _nbytes(*chunk.values())

    def held_points(self) -> int:
        """Points and event rows recorded into windows not yet taken for emission (open
        and late): what the regional's bound max_held_points counts."""
        with self._lock:
            return sum(w.points for w in self._open.values()) + sum(w.points for w in self._late.values())

    def held(self) -> tuple[int, int]:
        """(bytes, rows) held in windows not yet taken for emission: what the regional's
        memory bound (max_held_bytes) counts, and the rows (aggregated series, pending
        rows, event rows) they hold."""
        with self._lock:
            windows = [*self._open.values(), *self._late.values()]
            return sum(w.nbytes for w in windows), sum(w.series for w in windows)

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
            due.extend(self._restored[k] for k in sorted(self._restored))
            self._restored.clear()
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

        The chunks of a window are fixed by the window alone (its nodes by arrival
        rank), so ``skip`` resumes after the first chunks (a caller whose frame child
        died part-way). Each chunk rolls its own nodes up: the roll-up of a window
        arrives as additive partials, like a late batch's.
        """
        n = 0
        for w in windows:
            for sub in self._split_by_frames(w):
                n += 1
                if n <= skip:
                    continue
                yield blocks_of(self.frame(sub))

    def _split_by_frames(self, w: _Window) -> Iterator[_Window]:
        """``w`` as windows of up to ``frame_nodes`` nodes each, by arrival rank (``w``
        itself if it is small). Whole shards move (frames are whole shards); the parts
        share the window's string table and its stacks (each frame keeps only the
        stacks its rows use)."""
        chunk = self.settings.frame_nodes
        if len(w.rank) <= chunk:
            yield w
            return
        per_frame = chunk // self._shard_nodes
        # the window's stacks concatenated once, not once per part
        full = _stack_table(w.stacks)
        frames: U32 = np.asarray(full.values("frames", "values"), dtype=np.uint32)
        stacks = [(full.offsets("frames"), frames)] if len(full) else []
        subs = [_Window(w.start_ns, w.end_ns, w.late, strings=w.strings, stack_index=w.stack_index,
                        stacks=stacks, seal_pos=w.seal_pos) for _ in range(0, len(w.rank), chunk)]
        for node, rank in w.rank.items():
            subs[rank // chunk].rank[node] = rank
        for attr in ("sources", "node_labels", "events_lost"):
            for n, v in getattr(w, attr).items():
                getattr(subs[w.rank[n] // chunk], attr)[n] = v
        for sid, shard in w.shards.items():
            subs[sid // per_frame].shards[sid] = shard
        for c in w.events:
            subs[w.rank[int(c["node"][0])] // chunk].events.append(c)
        yield from subs

    def _block_id(self, w: _Window, node: str, sources: list[tuple[str, int]]) -> str:
        """A block's identity: its content's sources only -- resolution, window, node and
        the edge batches in it -- never the regional that merged it or how blocks are
        grouped later, so a replay after a crash (or the same batches merged by another
        regional) yields the same id."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.settings.resolution_s}|{w.start_ns}|{node}|".encode())
        h.update("".join(f"{boot}:{seq};" for boot, seq in sorted(sources)).encode())
        return h.hexdigest()

    def frame(self, w: _Window) -> Frame:
        """Reduce one detached window to its Frame."""
        strings = w.strings.items
        for shard in w.shards.values():
            shard.fold()
        counters = _gather_counters(w)
        hists = _gather_hists(w)
        rollup_counters, rollup_hists, rollup_clamped = self._rollups(w, counters, hists)
        nodes = sorted(w.rank)
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
            profiles=profiles, stacks=stacks, events=events, seal_pos=w.seal_pos,
            saturated={"window": sum(s.saturated for s in w.shards.values()), "rollup": rollup_clamped},
        )

    def _rollups(self, w: _Window, counters: list, hists: list) -> tuple[list, list, int]:  # type: ignore[type-arg]
        """The roll-up families' rows (node 0) and how many of their sums were clamped at
        2^64-1: adding nodes up can pass it where no node's own sum did."""
        rules = {r.metric: r for r in self.settings.rollups}
        out_c, out_h = [], []
        clamped = 0
        for fam, keys, vals in counters:
            rule = rules.get(w.strings.items[fam.name])
            if rule is None or fam.kind == pb.GAUGE:
                continue
            proj, label_keys = _project(w, fam.label_keys, keys, rule.by)
            g = group(proj)
            rf = _Counters(fam.kind, fam.name, fam.unit, fam.help, label_keys)
            total, k = g.sum(vals)
            clamped += k
            out_c.append((rf, g.keys, total))
        for fam, keys, cnt, sm, zero, b_sid, b_idx, b_cnt in hists:
            rule = rules.get(w.strings.items[fam.name])
            if rule is None:
                continue
            proj, label_keys = _project(w, fam.label_keys, keys, rule.by)
            g = group(proj)
            rb_sid, rb_idx, rb_cnt, k = _reduce_buckets(g.inverse[b_sid], b_idx, b_cnt)
            clamped += k
            sums = []
            for col in (cnt, sm, zero):
                total, k = g.sum(col)
                sums.append(total)
                clamped += k
            rh = _Hists(fam.name, fam.unit, fam.help, label_keys)
            out_h.append((rh, g.keys, *sums, rb_sid, rb_idx, rb_cnt))
        return out_c, out_h, clamped

    @staticmethod
    def _reduce_profiles(w: _Window, part_of: npt.NDArray[np.int32]) -> tuple[Table, Table]:
        chunks = [c for s in w.shards.values() for c in s.profiles.chunks]
        if not chunks:
            return empty_profiles(), empty_stacks()
        stacks = _stack_table(w.stacks)
        # shards hold disjoint nodes and each is folded: the rows are the merged rows
        out = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        out["part"] = part_of[out.pop("node")]
        rows = np.lexsort((out["period"], out["name"], out["part"]))
        t = Table({k: out[k][rows].astype(PROFILE_COLS[k]) for k in PROFILE_COLS})
        # only the stacks these rows use: the parts of a split window share its stacks,
        # and a frame carries (and a sink hashes) just its own
        return t, used_stacks(t, stacks)


def _series_keys(gmap: U32, node: int, label_values: U32, n: int, k: int) -> U32:
    """A chunk's key matrix (n x 1 + k): the node, then its label values translated from
    the batch's string indices to the window's."""
    keys = np.empty((n, k + 1), dtype=np.uint32)
    keys[:, 0] = node
    if k:
        keys[:, 1:] = gmap[label_values].reshape(n, k)
    return keys


def _gather_counters(w: _Window) -> list[tuple[_Counters, U32, npt.NDArray[np.generic]]]:
    """Every counter family's folded rows across the window's shards (disjoint nodes,
    so the rows are the family's merged rows), in the order families were first seen."""
    by_key: dict[tuple[int, int, tuple[int, ...]], list[_Counters]] = {}
    for shard in w.shards.values():
        for key, f in shard.counters.items():
            by_key.setdefault(key, []).append(f)
    out = []
    for fams in by_key.values():
        keys = [k for f in fams for k in f.keys]
        vals = [v for f in fams for v in f.values]
        f0 = fams[0]
        if not keys:
            keys, vals = [np.zeros((0, len(f0.label_keys) + 1), np.uint32)], [np.zeros(0, np.uint64)]
        out.append((f0, np.concatenate(keys), np.concatenate(vals)))
    return out


def _gather_hists(w: _Window) -> list[tuple]:  # type: ignore[type-arg]
    """Every histogram family's folded rows across the window's shards (like
    ``_gather_counters``), with each bucket's row."""
    by_key: dict[tuple[int, tuple[int, ...]], list[_Hists]] = {}
    for shard in w.shards.values():
        for key, f in shard.hists.items():
            by_key.setdefault(key, []).append(f)
    out = []
    for fams in by_key.values():
        f0 = fams[0]
        k = len(f0.label_keys)
        parts = [f for f in fams if f.keys]
        if not parts:
            e64 = np.zeros(0, np.uint64)
            out.append((f0, np.zeros((0, k + 1), np.uint32), e64, e64, e64, np.zeros(0, np.int64),
                        np.zeros(0, np.int64), e64))
            continue
        rows = [len(f.count[0]) for f in parts]
        b_sid = _bucket_rows([f.offsets[0] for f in parts], rows)
        out.append((f0, np.concatenate([f.keys[0] for f in parts]),
                    np.concatenate([f.count[0] for f in parts]), np.concatenate([f.sum[0] for f in parts]),
                    np.concatenate([f.zero[0] for f in parts]), b_sid,
                    np.concatenate([f.b_idx[0] for f in parts]).astype(np.int64),
                    np.concatenate([f.b_cnt[0] for f in parts])))
    return out


def release_windows(windows: list[_Window]) -> None:
    """Free detached, already reduced windows one chunk at a time (run it in a worker
    thread); ``windows`` is emptied.

    Why: dropped at once, a window's arrays and Python objects are freed in one
    deallocation cascade that holds the GIL throughout (1.9 s at ~600 k points/s when
    windows kept every batch's columns), during which the process neither merges nor
    hands frames to the sinks. Freed one family at a time, the interpreter hands the
    GIL to the other threads between steps (sys.setswitchinterval).

    Only containers private to the window are emptied: the string table is left whole
    (frames reduced in this process share its list of strings).
    """
    while windows:
        w = windows.pop()
        while w.shards:
            _, s = w.shards.popitem()
            for fams in (s.counters, s.hists):
                while fams:
                    fams.popitem()
            s.profiles.chunks.clear()
        for chunks in (w.events, w.stacks):
            while chunks:
                chunks.pop()


def _stack_table(chunks: list[tuple[I64, U32]]) -> Table:
    """A window's stacks (recorded chunks of new stacks) as one table, in id order."""
    if not chunks:  # profile rows whose stacks are all absent (-1)
        return empty_stacks()
    tables = [Table({"id": np.zeros(len(off) - 1, np.int64)}, {"frames": (off, {"values": frames})})
              for off, frames in chunks]
    return tables[0] if len(tables) == 1 else Table.concat(tables)


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


def _reduce_buckets(series: I64, idx: I64, cnt: U64) -> tuple[I64, I64, U64, int]:
    """Sum bucket counts per (series, bucket index); output sorted by series, then index;
    and how many sums were clamped at 2^64-1.

    Dense (series x bucket range) bincounts over ranges of series -- linear, no sort --
    exact while the total count stays below 2^53 (a window of sample counts always
    does: nothing to clamp); otherwise one sort of packed (series, index) keys and a
    saturating sum. The total is the exact one: numpy's wrapping sum would send counts
    that add up past 2^64 to the float path, whose cast back to uint64 is undefined.
    """
    if len(series) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint64), 0
    lo, hi = int(idx.min()), int(idx.max())
    width = hi - lo + 1
    n_series = int(series.max()) + 1
    if exact_total(cnt) < _EXACT_F64:
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
                np.concatenate(out_c), 0)
    key = (series.astype(np.uint64) << np.uint64(8)) | (idx + _BUCKET_SHIFT).astype(np.uint64)
    order = np.argsort(key)
    k = key[order]
    starts = np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))
    uk = k[starts]
    sums, clamped = saturating_reduceat(cnt[order].astype(np.uint64, copy=False), starts)
    return ((uk >> np.uint64(8)).astype(np.int64), (uk & np.uint64(0xFF)).astype(np.int64) - _BUCKET_SHIFT,
            sums, clamped)


def _project(
    w: _Window, label_keys: tuple[int, ...], keys: U32, by: tuple[str, ...]
) -> tuple[U32, tuple[int, ...]]:
    names = [w.strings.items[k] for k in label_keys]
    cols = [1 + names.index(b) for b in by if b in names]
    proj = np.zeros((len(keys), 1 + len(cols)), dtype=np.uint32)
    if cols:
        proj[:, 1:] = keys[:, cols]
    return proj, tuple(label_keys[c - 1] for c in cols)
