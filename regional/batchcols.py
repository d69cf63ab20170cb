"""One edge batch as numpy columns, decoded once for both validation and merge.

Columns come from either wire encoding (stratoscope/columns.py): raw little-endian
bytes, mapped onto arrays without a copy (what the edge sends), or packed repeated
fields. Everything after this module works on whole columns; columns read from
bytes are read-only views, so nothing downstream writes into a decoded column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from stratoscope.columns import read_all
from stratoscope.v1 import batch_pb2 as pb

U32 = npt.NDArray[np.uint32]
U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


@dataclass
class MetricCols:
    kind: int
    name: int
    unit: int
    help: int
    label_keys: U32
    #: row-major (series x label_keys)
    label_values: U32
    counter_values: U64
    gauge_values: F64

    @property
    def rows(self) -> int:
        return len(self.counter_values) if self.kind == pb.COUNTER else len(self.gauge_values)


@dataclass
class HistCols:
    name: int
    unit: int
    help: int
    scale: int
    label_keys: U32
    label_values: U32
    count: U64
    sum: U64
    zero: U64
    offsets: I64
    bucket_index: I64
    bucket_count: U64


@dataclass
class ProfileCols:
    name: int
    period_ns: int
    stack_offsets: I64
    stack_frames: U32
    pid: U32
    comm: U32
    cgroup: U32
    kernel_stack: I64
    user_stack: I64
    samples: U64


@dataclass
class EventCols:
    time_ns: U64
    kind: U32
    pid: U32
    ppid: U32
    comm: U32
    cgroup: U32
    detail: U32
    code: I64
    lost: int


@dataclass
class BatchCols:
    node_id: str
    boot_id: str
    seq: int
    start_ns: int
    end_ns: int
    strings: list[str]
    node_label_keys: U32
    node_label_values: U32
    metrics: list[MetricCols]
    histograms: list[HistCols]
    profiles: list[ProfileCols]
    events: EventCols | None

    @property
    def points(self) -> int:
        """Series points (metric and histogram series): what throughput is counted in."""
        return sum(m.rows for m in self.metrics) + sum(len(h.count) for h in self.histograms)


_U32, _U64, _I64, _F64 = (np.dtype(t) for t in (np.uint32, np.uint64, np.int64, np.float64))
#: What an absent column reads as (shared: an empty array cannot be written into).
_EMPTY = {dt: np.zeros(0, dt) for dt in (_U32, _U64, _I64, _F64)}


def _col(cols: dict[str, npt.NDArray[Any]], name: str, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    a = cols.get(name)
    if a is None:
        return _EMPTY[dtype]
    return a if a.dtype == dtype else a.astype(dtype)


def decode(b: pb.Batch) -> BatchCols:
    """All columns of ``b``, from either encoding (stratoscope/columns.py); lengths are
    not checked here (validate() does that). Raises ColumnError for a column that
    cannot be read."""
    top = read_all(b)
    metrics = []
    for m in b.metrics:
        c = read_all(m)
        metrics.append(MetricCols(m.kind, m.name, m.unit, m.help, _col(c, "label_keys", _U32),
                                  _col(c, "label_values", _U32), _col(c, "counter_values", _U64),
                                  _col(c, "gauge_values", _F64)))
    hists = []
    for h in b.histograms:
        c = read_all(h)
        hists.append(HistCols(h.name, h.unit, h.help, h.scale, _col(c, "label_keys", _U32),
                              _col(c, "label_values", _U32), _col(c, "count", _U64),
                              _col(c, "sum", _U64), _col(c, "zero_count", _U64),
                              _col(c, "bucket_offsets", _I64), _col(c, "bucket_index", _I64),
                              _col(c, "bucket_count", _U64)))
    profiles = []
    for p in b.profiles:
        c = read_all(p)
        profiles.append(ProfileCols(p.name, p.period_ns, _col(c, "stack_offsets", _I64),
                                    _col(c, "stack_frames", _U32), _col(c, "pid", _U32),
                                    _col(c, "comm", _U32), _col(c, "cgroup", _U32),
                                    _col(c, "kernel_stack", _I64), _col(c, "user_stack", _I64),
                                    _col(c, "samples", _U64)))
    events = None
    if b.HasField("events"):
        e = b.events
        c = read_all(e)
        events = EventCols(_col(c, "time_ns", _U64), _col(c, "kind", _U32), _col(c, "pid", _U32),
                           _col(c, "ppid", _U32), _col(c, "comm", _U32), _col(c, "cgroup", _U32),
                           _col(c, "detail", _U32), _col(c, "code", _I64), e.lost)
    return BatchCols(
        node_id=b.node_id, boot_id=b.boot_id, seq=b.seq, start_ns=b.start_ns, end_ns=b.end_ns,
        strings=list(b.strings),
        node_label_keys=_col(top, "node_label_keys", _U32),
        node_label_values=_col(top, "node_label_values", _U32),
        metrics=metrics, histograms=hists, profiles=profiles, events=events,
    )
