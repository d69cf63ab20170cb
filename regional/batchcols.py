"""One edge batch as numpy columns, decoded once for both validation and merge.

Columns come from either wire encoding (stratoscope/columns.py): raw little-endian
bytes, mapped onto arrays without a copy (what the edge sends), or packed repeated
fields. Everything after this module works on whole columns; columns read from
bytes are read-only views, so nothing downstream writes into a decoded column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stratoscope.columns import read
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


def decode(b: pb.Batch) -> BatchCols:
    """All columns of ``b``, from either encoding (stratoscope/columns.py); lengths are
    not checked here (validate() does that). Raises ColumnError for a column that
    cannot be read."""
    e = b.events
    return BatchCols(
        node_id=b.node_id, boot_id=b.boot_id, seq=b.seq, start_ns=b.start_ns, end_ns=b.end_ns,
        strings=list(b.strings),
        node_label_keys=read(b, "node_label_keys", np.uint32),
        node_label_values=read(b, "node_label_values", np.uint32),
        metrics=[
            MetricCols(m.kind, m.name, m.unit, m.help, read(m, "label_keys", np.uint32),
                       read(m, "label_values", np.uint32), read(m, "counter_values", np.uint64),
                       read(m, "gauge_values", np.float64))
            for m in b.metrics
        ],
        histograms=[
            HistCols(h.name, h.unit, h.help, h.scale, read(h, "label_keys", np.uint32),
                     read(h, "label_values", np.uint32), read(h, "count", np.uint64),
                     read(h, "sum", np.uint64), read(h, "zero_count", np.uint64),
                     read(h, "bucket_offsets", np.int64), read(h, "bucket_index", np.int64),
                     read(h, "bucket_count", np.uint64))
            for h in b.histograms
        ],
        profiles=[
            ProfileCols(p.name, p.period_ns, read(p, "stack_offsets", np.int64),
                        read(p, "stack_frames", np.uint32), read(p, "pid", np.uint32),
                        read(p, "comm", np.uint32), read(p, "cgroup", np.uint32),
                        read(p, "kernel_stack", np.int64), read(p, "user_stack", np.int64),
                        read(p, "samples", np.uint64))
            for p in b.profiles
        ],
        events=EventCols(read(e, "time_ns", np.uint64), read(e, "kind", np.uint32),
                         read(e, "pid", np.uint32), read(e, "ppid", np.uint32),
                         read(e, "comm", np.uint32), read(e, "cgroup", np.uint32),
                         read(e, "detail", np.uint32), read(e, "code", np.int64), e.lost)
        if b.HasField("events") else None,
    )
