"""A merged window as columns: the regional's output, shared by every block of the window.

The merge produces one ``Frame`` per closed window (or late partial): every node's
merged rows (and the roll-ups) as a few numpy tables over the window's string table.
A node's ``Block`` is a *part* of the frame. Sinks that store rows (ClickHouse) read
the frame's columns directly -- no per-node protobuf is built and parsed again --
while sinks that ship per-node messages (Kafka) ask a block for its ``batch``, built
from the frame's rows on demand.

Rows of every table are sorted by part, so one node's rows are one slice and a run
of consecutive blocks is one slice too. Variable-length cells (a series' label
values, a histogram's buckets, a stack's frames) are *ragged* columns: flat values
plus offsets.
"""

from __future__ import annotations

import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import cast

import numpy as np
import numpy.typing as npt

from stratoscope import __version__
from stratoscope.regional.batchcols import BatchCols, decode
from stratoscope.regional.columns import ragged_index
from stratoscope.v1 import batch_pb2 as pb

I64 = npt.NDArray[np.int64]
Col = npt.NDArray[np.generic]

#: Histogram families have kind 0 in ``Family``.
HISTOGRAM = 0


@dataclass(frozen=True)
class Family:
    """What a metric or histogram row is: string ids in the frame's table."""

    kind: int  # pb.COUNTER, pb.GAUGE or HISTOGRAM
    name: int
    unit: int
    help: int
    label_keys: tuple[int, ...]


@dataclass
class Part:
    """One block of the frame: a node's merged rows (node 0 = "" = the roll-up)."""

    node: int
    block_id: str
    labels: tuple[tuple[int, int], ...] = ()
    events_lost: int = 0


class Table:
    """Columns of equal length plus ragged groups (offsets + value columns)."""

    __slots__ = ("cols", "ragged")

    def __init__(self, cols: dict[str, Col], ragged: dict[str, tuple[I64, dict[str, Col]]] | None = None) -> None:
        self.cols = cols
        self.ragged = ragged or {}

    def __len__(self) -> int:
        return len(next(iter(self.cols.values())))

    def __getitem__(self, name: str) -> Col:
        return self.cols[name]

    def offsets(self, group: str) -> I64:
        return self.ragged[group][0]

    def values(self, group: str, name: str) -> Col:
        return self.ragged[group][1][name]

    def take(self, rows: I64 | slice) -> Table:
        if isinstance(rows, slice):
            lo, hi, _ = rows.indices(len(self))
            ragged = {}
            for g, (off, vals) in self.ragged.items():
                a, b = int(off[lo]), int(off[hi])
                ragged[g] = (off[lo:hi + 1] - a, {k: v[a:b] for k, v in vals.items()})
            return Table({k: v[lo:hi] for k, v in self.cols.items()}, ragged)
        ragged = {}
        for g, (off, vals) in self.ragged.items():
            new_off, idx = ragged_index(off, rows)
            ragged[g] = (new_off, {k: v[idx] for k, v in vals.items()})
        return Table({k: v[rows] for k, v in self.cols.items()}, ragged)

    @staticmethod
    def concat(tables: Sequence[Table]) -> Table:
        first = tables[0]
        cols = {k: np.concatenate([t.cols[k] for t in tables]) for k in first.cols}
        ragged = {}
        for g, (_, vals) in first.ragged.items():
            offs = [np.zeros(1, dtype=np.int64)]
            base = 0
            for t in tables:
                o = t.ragged[g][0]
                offs.append(o[1:] + base)
                base += int(o[-1])
            ragged[g] = (np.concatenate(offs),
                         {k: np.concatenate([t.ragged[g][1][k] for t in tables]) for k in vals})
        return Table(cols, ragged)

    @property
    def nbytes(self) -> int:
        n = sum(v.nbytes for v in self.cols.values())
        for off, vals in self.ragged.values():
            n += off.nbytes + sum(v.nbytes for v in vals.values())
        return n


def _empty(dtype: type) -> Col:
    return np.zeros(0, dtype=dtype)


def empty_metrics() -> Table:
    return Table({"part": _empty(np.int32), "fam": _empty(np.int32), "value": _empty(np.uint64),
                  "gauge": _empty(np.float64)},
                 {"labels": (np.zeros(1, np.int64), {"values": _empty(np.uint32)})})


def empty_hists() -> Table:
    return Table({"part": _empty(np.int32), "fam": _empty(np.int32), "count": _empty(np.uint64),
                  "sum": _empty(np.uint64), "zero": _empty(np.uint64)},
                 {"labels": (np.zeros(1, np.int64), {"values": _empty(np.uint32)}),
                  "buckets": (np.zeros(1, np.int64), {"index": _empty(np.int16),
                                                      "count": _empty(np.uint64)})})


PROFILE_COLS = {"part": np.int32, "name": np.uint32, "period": np.uint64, "pid": np.uint32,
                "comm": np.uint32, "cgroup": np.uint32, "kstack": np.int64, "ustack": np.int64,
                "samples": np.uint64}
EVENT_COLS = {"part": np.int32, "time": np.uint64, "kind": np.uint32, "pid": np.uint32,
              "ppid": np.uint32, "comm": np.uint32, "cgroup": np.uint32, "detail": np.uint32,
              "code": np.int64}


def empty_profiles() -> Table:
    return Table({k: _empty(t) for k, t in PROFILE_COLS.items()})


def empty_events() -> Table:
    return Table({k: _empty(t) for k, t in EVENT_COLS.items()})


def empty_stacks() -> Table:
    return Table({"id": _empty(np.int64)}, {"frames": (np.zeros(1, np.int64), {"values": _empty(np.uint32)})})


def used_stacks(profiles: Table, stacks: Table) -> Table:
    """The stacks that ``profiles``' rows use, numbered anew from 0; the rows' ``kstack``
    and ``ustack`` are renumbered to match (in place; -1, "no stack", stays)."""
    used = np.unique(np.concatenate([profiles["kstack"], profiles["ustack"]]))
    used = used[used >= 0]
    if len(used) < len(stacks):
        stacks = stacks.take(used)
        for col in ("kstack", "ustack"):
            ids = np.asarray(profiles[col], dtype=np.int64)
            profiles.cols[col] = np.where(ids >= 0, np.searchsorted(used, ids), -1).astype(np.int64)
    return Table({**stacks.cols, "id": np.arange(len(stacks), dtype=np.int64)}, stacks.ragged)


def sort_by_part(t: Table) -> Table:
    """Stable sort on the part column (keeps each part's family order)."""
    if len(t) == 0:
        return t
    part = np.asarray(t["part"], dtype=np.int64)
    if len(part) < 2 or bool(np.all(part[1:] >= part[:-1])):
        return t
    return t.take(np.argsort(part, kind="stable").astype(np.int64))


@dataclass
class Frame:
    """Merged rows of one output window for many nodes (see the module docstring)."""

    start_ns: int
    end_ns: int
    resolution_s: int
    late: bool
    strings: list[str]
    parts: list[Part]
    families: list[Family]
    metrics: Table = field(default_factory=empty_metrics)
    histograms: Table = field(default_factory=empty_hists)
    profiles: Table = field(default_factory=empty_profiles)
    #: Unique stacks of the frame; profile rows index them (-1: no stack).
    stacks: Table = field(default_factory=empty_stacks)
    events: Table = field(default_factory=empty_events)
    #: Derived views sinks keep with the frame (e.g. its Arrow string table).
    cache: dict[str, object] = field(default_factory=dict, repr=False, compare=False)

    # -- slicing ------------------------------------------------------------------
    def bounds(self, table: Table) -> I64:
        """Row range of every part: rows of part i are [b[i], b[i+1])."""
        return np.searchsorted(table["part"], np.arange(len(self.parts) + 1)).astype(np.int64)

    @cached_property
    def _bounds(self) -> dict[str, I64]:
        return {name: self.bounds(getattr(self, name))
                for name in ("metrics", "histograms", "profiles", "events")}

    def rows_of(self, table: str, parts: Sequence[int]) -> I64 | slice:
        """Rows of ``parts`` (sorted part indices) in ``table``: a slice when contiguous."""
        b = self._bounds[table]
        if not parts:
            return slice(0, 0)
        if parts[-1] - parts[0] == len(parts) - 1:
            return slice(int(b[parts[0]]), int(b[parts[-1] + 1]))
        p = np.asarray(parts, dtype=np.int64)
        lo, hi = b[p], b[p + 1]
        lens = hi - lo
        out_off = np.zeros(len(p) + 1, dtype=np.int64)
        np.cumsum(lens, out=out_off[1:])
        return np.arange(out_off[-1], dtype=np.int64) - np.repeat(out_off[:-1] - lo, lens)

    @property
    def nbytes(self) -> int:
        """Bytes of the merged columns (what the window costs to hold and ship)."""
        return (self.metrics.nbytes + self.histograms.nbytes + self.profiles.nbytes
                + self.stacks.nbytes + self.events.nbytes)

    @property
    def points(self) -> int:
        return len(self.metrics) + len(self.histograms)

    def subset(self, parts: Sequence[int]) -> Frame:
        """A frame of just ``parts`` (sorted, distinct): their rows, parts numbered anew.

        What a sink in another process is sent for a delivery of some of the blocks (the
        frame itself, not a copy, for a delivery of all of them).
        """
        if len(parts) == len(self.parts):
            return self
        index = np.full(len(self.parts), -1, dtype=np.int32)
        index[list(parts)] = np.arange(len(parts), dtype=np.int32)

        def rows(name: str) -> Table:
            t = getattr(self, name).take(self.rows_of(name, parts))
            t.cols["part"] = index[t["part"]]
            return t

        profiles = rows("profiles")
        stacks = used_stacks(profiles, self.stacks)
        return Frame(self.start_ns, self.end_ns, self.resolution_s, self.late, self.strings,
                     [self.parts[i] for i in parts], self.families,
                     metrics=rows("metrics"), histograms=rows("histograms"), profiles=profiles,
                     stacks=stacks, events=rows("events"))

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state.pop("_bounds", None)  # derived, rebuilt on demand
        state["cache"] = {}
        return state

    # -- per-node protobuf ------------------------------------------------------------
    def batch_for(self, part: int) -> pb.Batch:
        """The part's rows as one stratoscope.v1.Batch with its own compact string table."""
        p = self.parts[part]
        m = self.metrics.take(self.rows_of("metrics", [part]))
        h = self.histograms.take(self.rows_of("histograms", [part]))
        pr = self.profiles.take(self.rows_of("profiles", [part]))
        ev = self.events.take(self.rows_of("events", [part]))
        used_stacks = np.unique(np.concatenate([pr["kstack"], pr["ustack"]]))
        used_stacks = used_stacks[used_stacks >= 0]
        st = self.stacks.take(used_stacks)
        fams = np.unique(np.concatenate([m["fam"], h["fam"]]))
        fam_ids = [self.families[f] for f in fams.tolist()]
        fixed = [0, p.node, *(x for kv in p.labels for x in kv)]
        for f in fam_ids:
            fixed += [f.name, f.unit, f.help, *f.label_keys]
        used = np.unique(np.concatenate([
            np.asarray(fixed, dtype=np.int64),
            m.values("labels", "values"), h.values("labels", "values"),
            pr["name"], pr["comm"], pr["cgroup"], st.values("frames", "values"),
            ev["kind"], ev["comm"], ev["cgroup"], ev["detail"],
        ]).astype(np.int64))
        remap = np.zeros(max(len(self.strings), 1), dtype=np.int64)
        remap[used] = np.arange(len(used))

        def local(ids: Col | list[int]) -> list[int]:
            return remap[np.asarray(ids, dtype=np.int64)].tolist()  # type: ignore[no-any-return]

        strings = self.strings
        out = pb.Batch(node_id=strings[p.node], start_ns=self.start_ns, end_ns=self.end_ns,
                       producer=f"stratoscope-regional/{__version__}")
        out.strings.extend([strings[i] for i in used.tolist()])
        if p.labels:
            out.node_label_keys.extend(local([k for k, _ in p.labels]))
            out.node_label_values.extend(local([v for _, v in p.labels]))
        for fam, lo, hi in _runs(m["fam"]):
            f = self.families[fam]
            name, unit, help_ = local([f.name, f.unit, f.help])
            mb = out.metrics.add(name=name, kind=f.kind, unit=unit, help=help_)
            mb.label_keys.extend(local(list(f.label_keys)))
            off = m.offsets("labels")
            mb.label_values.extend(local(m.values("labels", "values")[off[lo]:off[hi]]))
            if f.kind == pb.GAUGE:
                mb.gauge_values.extend(m["gauge"][lo:hi].tolist())
            else:
                mb.counter_values.extend(m["value"][lo:hi].tolist())
        for fam, lo, hi in _runs(h["fam"]):
            f = self.families[fam]
            name, unit, help_ = local([f.name, f.unit, f.help])
            hb = out.histograms.add(name=name, unit=unit, help=help_, scale=0)
            hb.label_keys.extend(local(list(f.label_keys)))
            off = h.offsets("labels")
            hb.label_values.extend(local(h.values("labels", "values")[off[lo]:off[hi]]))
            hb.count.extend(h["count"][lo:hi].tolist())
            hb.sum.extend(h["sum"][lo:hi].tolist())
            hb.zero_count.extend(h["zero"][lo:hi].tolist())
            boff = h.offsets("buckets")
            hb.bucket_offsets.extend((boff[lo:hi + 1] - boff[lo]).tolist())
            hb.bucket_index.extend(h.values("buckets", "index")[boff[lo]:boff[hi]].tolist())
            hb.bucket_count.extend(h.values("buckets", "count")[boff[lo]:boff[hi]].tolist())
        if len(pr):
            stack_local = np.full(len(self.stacks) + 1, -1, dtype=np.int64)  # index -1 -> -1
            stack_local[used_stacks] = np.arange(len(used_stacks))
            key = np.stack([pr["name"].astype(np.uint64), pr["period"]])
            change = np.ones(len(pr), dtype=bool)
            change[1:] = np.any(key[:, 1:] != key[:, :-1], axis=0)
            starts = np.flatnonzero(change).tolist() + [len(pr)]
            frames_off = st.offsets("frames")
            frames = local(st.values("frames", "values"))
            for lo, hi in zip(starts, starts[1:], strict=False):
                pb_ = out.profiles.add(name=local([pr["name"][lo]])[0], period_ns=int(pr["period"][lo]))
                pb_.stack_offsets.extend(frames_off.tolist())
                pb_.stack_frames.extend(frames)
                pb_.pid.extend(pr["pid"][lo:hi].tolist())
                pb_.comm.extend(local(pr["comm"][lo:hi]))
                pb_.cgroup.extend(local(pr["cgroup"][lo:hi]))
                pb_.kernel_stack.extend(stack_local[pr["kstack"][lo:hi]].tolist())
                pb_.user_stack.extend(stack_local[pr["ustack"][lo:hi]].tolist())
                pb_.samples.extend(pr["samples"][lo:hi].tolist())
        if len(ev) or p.events_lost:
            e = out.events
            e.time_ns.extend(ev["time"].tolist())
            e.kind.extend(local(ev["kind"]))
            e.pid.extend(ev["pid"].tolist())
            e.ppid.extend(ev["ppid"].tolist())
            e.comm.extend(local(ev["comm"]))
            e.cgroup.extend(local(ev["cgroup"]))
            e.detail.extend(local(ev["detail"]))
            e.code.extend(ev["code"].tolist())
            e.lost = p.events_lost
        return out


def _runs(col: Col) -> Iterable[tuple[int, int, int]]:
    """(value, lo, hi) for every run of equal values of a column."""
    n = len(col)
    if n == 0:
        return []
    change = np.flatnonzero(col[1:] != col[:-1]) + 1
    starts = [0, *change.tolist()]
    ends = [*change.tolist(), n]
    vals = col[starts].tolist()
    return zip(vals, starts, ends, strict=True)


class StringTable:
    """Interns strings into one table; index 0 is ""."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {"": 0}
        self.items: list[str] = [""]

    def intern_all(self, strings: list[str]) -> npt.NDArray[np.uint32]:
        """Table ids of ``strings``: one C-level dict lookup each, Python only for new ones."""
        get = self.index.get
        ids = list(map(get, strings))
        try:  # array.array: ~3x cheaper than np.array on a list of ints; a None raises
            out = array.array("I", cast("list[int]", ids))
        except TypeError:  # new strings
            for i, v in enumerate(ids):
                if v is None:
                    ids[i] = self(strings[i])
            out = array.array("I", cast("list[int]", ids))
        return np.frombuffer(out, dtype=np.uint32)

    def __call__(self, s: str) -> int:
        i = self.index.get(s)
        if i is None:
            i = self.index[s] = len(self.items)
            self.items.append(s)
        return i


def frame_from_batches(blocks: Sequence[tuple[str, pb.Batch | BatchCols, int]]) -> list[Frame]:
    """Frames holding already-merged blocks as they are, one frame per window.

    For blocks that exist only as protobuf (read back from Kafka, built by a test):
    they get the same storage path as the merge's own frames. No merging happens.
    """
    by_window: dict[tuple[int, int, int], list[tuple[str, BatchCols]]] = {}
    for block_id, batch, res in blocks:
        cols = decode(batch) if isinstance(batch, pb.Batch) else batch
        by_window.setdefault((cols.start_ns, cols.end_ns, res), []).append((block_id, cols))
    frames = []
    for (start, end, res), items in by_window.items():
        frames.append(_frame_of(start, end, res, items))
    return frames


def _frame_of(start: int, end: int, res: int, items: list[tuple[str, BatchCols]]) -> Frame:
    strings = StringTable()
    families: dict[Family, int] = {}
    parts: list[Part] = []
    mt, ht, pt, st, et = [], [], [], [], []
    n_stacks = 0
    for pi, (block_id, b) in enumerate(items):
        g = strings.intern_all(b.strings)
        labels = tuple(zip(g[b.node_label_keys].tolist(), g[b.node_label_values].tolist(), strict=True))
        parts.append(Part(strings(b.node_id), block_id, labels, b.events.lost if b.events else 0))

        def fam_id(kind: int, name: int, unit: int, help_: int, keys: npt.NDArray[np.uint32],
                   g: npt.NDArray[np.uint32] = g) -> int:
            f = Family(kind, int(g[name]), int(g[unit]), int(g[help_]), tuple(g[keys].tolist()))
            return families.setdefault(f, len(families))

        for m in b.metrics:
            n, k = m.rows, len(m.label_keys)
            off = np.arange(n + 1, dtype=np.int64) * k
            mt.append(Table(
                {"part": np.full(n, pi, np.int32),
                 "fam": np.full(n, fam_id(m.kind, m.name, m.unit, m.help, m.label_keys), np.int32),
                 "value": m.counter_values if m.kind == pb.COUNTER else np.zeros(n, np.uint64),
                 "gauge": m.gauge_values if m.kind == pb.GAUGE else np.zeros(n, np.float64)},
                {"labels": (off, {"values": g[m.label_values]})}))
        for h in b.histograms:
            n, k = len(h.count), len(h.label_keys)
            ht.append(Table(
                {"part": np.full(n, pi, np.int32),
                 "fam": np.full(n, fam_id(HISTOGRAM, h.name, h.unit, h.help, h.label_keys), np.int32),
                 "count": h.count, "sum": h.sum, "zero": h.zero},
                {"labels": (np.arange(n + 1, dtype=np.int64) * k, {"values": g[h.label_values]}),
                 "buckets": (h.offsets, {"index": h.bucket_index.astype(np.int16),
                                         "count": h.bucket_count})}))
        for p in b.profiles:
            n = len(p.samples)
            pt.append(Table({
                "part": np.full(n, pi, np.int32), "name": np.full(n, g[p.name], np.uint32),
                "period": np.full(n, p.period_ns, np.uint64), "pid": p.pid, "comm": g[p.comm],
                "cgroup": g[p.cgroup],
                "kstack": np.where(p.kernel_stack >= 0, p.kernel_stack + n_stacks, -1),
                "ustack": np.where(p.user_stack >= 0, p.user_stack + n_stacks, -1),
                "samples": p.samples}))
            k = len(p.stack_offsets) - 1
            st.append(Table({"id": np.arange(n_stacks, n_stacks + k, dtype=np.int64)},
                            {"frames": (p.stack_offsets, {"values": g[p.stack_frames]})}))
            n_stacks += k
        if b.events is not None and len(b.events.time_ns):
            e = b.events
            n = len(e.time_ns)
            et.append(Table({"part": np.full(n, pi, np.int32), "time": e.time_ns, "kind": g[e.kind],
                             "pid": e.pid, "ppid": e.ppid, "comm": g[e.comm], "cgroup": g[e.cgroup],
                             "detail": g[e.detail], "code": e.code}))
    return Frame(
        start, end, res, False, strings.items, parts, list(families),
        metrics=Table.concat(mt) if mt else empty_metrics(),
        histograms=Table.concat(ht) if ht else empty_hists(),
        profiles=Table.concat(pt) if pt else empty_profiles(),
        stacks=Table.concat(st) if st else empty_stacks(),
        events=Table.concat(et) if et else empty_events(),
    )
