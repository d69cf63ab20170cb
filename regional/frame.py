"""A merged window as columns: the regional's output, shared by every block of the window.

The merge produces one ``Frame`` per closed window (or late partial): every node's
merged rows (and the roll-ups) as a few numpy tables over the window's string table.
A ``Block`` -- one node's rows of the window, the unit sinks deliver and de-duplicate
-- is a *part* of a frame, never a copy of its rows. Sinks read the frame's columns
and encode them themselves (Arrow for ClickHouse in ``sinks/clickhouse_arrow.py``,
one protobuf per block for Kafka in ``sinks/kafka.py``); no sink keeps state on a
frame.

Rows of every table are sorted by part, so one node's rows are one slice and a run
of consecutive blocks is one slice too. Variable-length cells (a series' label
values, a histogram's buckets, a stack's frames) are *ragged* columns: flat values
plus offsets.
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import cast

import numpy as np
import numpy.typing as npt

from stratoscope.regional.columns import ragged_index

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
    #: edge batches merged into this block (0 for the roll-up)
    batches: int = 0


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
    #: The log position that seals the window instance this frame is a part of
    #: (regional/instances.py; 0 without a write-ahead log).
    seal_pos: int = 0
    #: Sums of this frame's rows clamped at 2^64-1, by stage (merge.SATURATION_STAGES):
    #: carried with the frame because it may be reduced in a forked child
    #: (regional/forkframe.py), and counted by the regional once it arrives. Empty on a
    #: frame's subsets, which are deliveries of rows already counted.
    saturated: dict[str, int] = field(default_factory=dict)

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
                     stacks=stacks, events=rows("events"), seal_pos=self.seal_pos)

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state.pop("_bounds", None)  # derived, rebuilt on demand
        return state


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


class Block:
    """One node's merged rows of one window (node "" is the roll-up across nodes):
    part ``part`` of ``frame``.

    What sinks deliver and what the delivery queue counts, retries and drops.
    ``block_id`` is stable for the same content (derived from the identities of the
    edge batches merged into it), so it is the idempotency key downstream
    (ClickHouse ``insert_deduplication_token``, the Kafka ``block_id`` header).
    """

    __slots__ = ("frame", "part")

    def __init__(self, frame: Frame, part: int) -> None:
        if not 0 <= part < len(frame.parts):
            raise IndexError(f"part {part} of a frame of {len(frame.parts)} parts")
        self.frame = frame
        self.part = part

    @property
    def block_id(self) -> str:
        return self.frame.parts[self.part].block_id

    @property
    def resolution_s(self) -> int:
        return self.frame.resolution_s

    @property
    def node(self) -> str:
        """The node's id ("" for the roll-up)."""
        return self.frame.strings[self.frame.parts[self.part].node]

    def __repr__(self) -> str:
        return f"Block({self.block_id!r}, resolution_s={self.resolution_s})"


def blocks_of(frame: Frame) -> list[Block]:
    """Every part of ``frame`` as a block, in part order."""
    return [Block(frame, i) for i in range(len(frame.parts))]
