"""One edge batch as numpy columns, decoded once for both validation and merge.

upb exposes packed repeated fields through the buffer protocol, so
``np.asarray(field, dtype)`` copies a column in ~3 ns per value; a Python loop over
the same field costs ~70 ns per value. Everything after this module works on
whole columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stratoscope.v1 import batch_pb2 as pb

U32 = npt.NDArray[np.uint32]
U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


def u32(values: object) -> U32:
    return np.asarray(values, dtype=np.uint32)


def u64(values: object) -> U64:
    return np.asarray(values, dtype=np.uint64)


def i64(values: object) -> I64:
    return np.asarray(values, dtype=np.int64)


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
    """All columns of ``b``; lengths are not checked here (validate() does that)."""
    e = b.events
    return BatchCols(
        node_id=b.node_id, boot_id=b.boot_id, seq=b.seq, start_ns=b.start_ns, end_ns=b.end_ns,
        strings=list(b.strings),
        node_label_keys=u32(b.node_label_keys), node_label_values=u32(b.node_label_values),
        metrics=[
            MetricCols(m.kind, m.name, m.unit, m.help, u32(m.label_keys), u32(m.label_values),
                       u64(m.counter_values), np.asarray(m.gauge_values, dtype=np.float64))
            for m in b.metrics
        ],
        histograms=[
            HistCols(h.name, h.unit, h.help, h.scale, u32(h.label_keys), u32(h.label_values),
                     u64(h.count), u64(h.sum), u64(h.zero_count), i64(h.bucket_offsets),
                     i64(h.bucket_index), u64(h.bucket_count))
            for h in b.histograms
        ],
        profiles=[
            ProfileCols(p.name, p.period_ns, i64(p.stack_offsets), u32(p.stack_frames),
                        u32(p.pid), u32(p.comm), u32(p.cgroup), i64(p.kernel_stack),
                        i64(p.user_stack), u64(p.samples))
            for p in b.profiles
        ],
        events=EventCols(u64(e.time_ns), u32(e.kind), u32(e.pid), u32(e.ppid), u32(e.comm),
                         u32(e.cgroup), u32(e.detail), i64(e.code), e.lost)
        if b.HasField("events") else None,
    )
