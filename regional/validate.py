"""Checks a batch from an edge before it touches any state.

A batch that breaks a limit is rejected whole with a reason (the edge drops it
and counts it); nothing else is affected. Checks are on whole columns (numpy
max/min), so a 100k-series batch costs microseconds, not a Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from stratoscope.columns import ColumnError
from stratoscope.regional.batchcols import BatchCols, decode
from stratoscope.v1 import batch_pb2 as pb
from stratoscope.wire import InflationError, WireError, open_sealed

NS = 1_000_000_000


#: What a rejection is counted under (the metric's ``reason`` label): a fixed set, so
#: nothing a client sends makes a new time series. The message, which may carry numbers
#: from the batch, goes in the ack and a rate-limited log line only.
REASONS = ("identity", "size", "encoding", "inflation", "window", "strings", "series", "buckets",
           "stacks", "events", "values")


class BatchRejected(ValueError):
    """The batch is invalid; the message says why, ``reason`` (one of REASONS) what kind."""

    def __init__(self, message: str, reason: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 16 * 1024 * 1024
    #: how far a sealed body may inflate for its size: at most this many times its
    #: compressed bytes, or ``inflation_floor``, whichever is more. Checked before the
    #: parse, from the size the frame declares, else while inflating: protobuf's parse
    #: costs per element (an empty metric block: 2 bytes, ~80 ns), so 16 MiB of them
    #: from a 1.5 KB body cost the ingest process ~1 s before max_blocks could look.
    #: Real edge batches inflate 4.2-5.9x with raw columns and 1.8-2.8x packed (68
    #: batches of five recordings, all programs or the profile alone at 99 Hz); batches
    #: of an edge's shape built to compress well, 4.6-19x (a port scan, a fork storm,
    #: 16,384 profile rows of one stack, 50,000 one-bucket histograms, the benchmark's
    #: node templates); loadtest/inflation_ratio.py. 64 is 10.8x the largest real ratio
    #: and 3.4x the largest built one; docs/SECURITY.md has what it leaves.
    max_inflation: int = 64
    #: the least a sealed body may inflate to whatever its size (small batches compress
    #: unevenly; 64 KiB of empty blocks cost the parse ~3 ms)
    inflation_floor: int = 64 * 1024
    max_strings: int = 200_000
    max_string_bytes: int = 4096
    #: characters over the whole string table: every string of an accepted batch is
    #: interned into the window it lands in, so the table is bounded as a whole
    max_strings_chars: int = 4 * 1024 * 1024
    #: strings no column refers to (the edge sends none): each would be interned and
    #: kept for nothing, outside the merge's memory bound, which counts rows
    max_unreferenced_strings: int = 16
    max_series: int = 200_000
    #: metric, histogram and profile blocks (an edge sends ~20): protobuf keeps an empty
    #: block in 2 bytes and decoding makes numpy arrays of each, so 1 M empty blocks in a
    #: sealed body of 1 KiB cost decode 24 s and 776 MiB. Checked before decoding.
    max_blocks: int = 256
    #: label keys of one metric or histogram family (an edge's programs use up to ~5):
    #: the merge keys a family by its label keys, kept per window outside its memory
    #: bound even for a family of no series (19 families of 200 k keys held 145 MiB)
    max_label_keys: int = 32
    #: node label pairs (the edge sends its config's static labels): the merge keeps each
    #: node's pairs per window as Python tuples, outside its memory bound, which counts
    #: rows; unbounded, one 544 KiB sealed batch of 1.9 M pairs held 224 MiB in the merge
    #: (11 MiB of it counted) and took it 26 s to record
    max_node_labels: int = 64
    max_buckets_per_series: int = 160
    max_stack_depth: int = 512
    max_events: int = 100_000
    max_window_s: int = 3600
    max_future_skew_s: int = 300
    max_age_s: int = 7 * 24 * 3600
    max_node_id: int = 253
    #: bytes (UTF-8) of a boot_id; the edge sends a UUID (36). Checked before
    #: de-duplication: the identity is a key of the dedup state.
    max_boot_id: int = 64


def parse_batch(wire: bytes) -> pb.Batch:
    """The Batch in ``wire``. Bytes that are not one (protobuf's DecodeError, the only
    error its parser raises: truncated fields, bad tags or wire types, invalid UTF-8 in a
    string, nesting too deep) reject the batch for "encoding"."""
    try:
        return pb.Batch.FromString(wire)
    except DecodeError:
        raise BatchRejected("bytes are not a Batch", "encoding") from None


#: The fields a sealed batch keeps in the clear, outside its compressed body.
CLEAR_FIELDS = ("node_id", "boot_id", "seq", "start_ns", "end_ns")


def open_batch(batch: pb.Batch, limits: Limits) -> tuple[pb.Batch, int]:
    """The whole batch behind a sealed one (stratoscope/wire.py) and its inflated size
    (-1 when it was not sealed); a body that cannot be opened rejects the batch, one that
    inflates further than ``Limits.max_inflation`` allows for "inflation", before the parse.

    The whole batch must carry the clear header's identity and window exactly: the gate
    checks and de-duplicates the header's identity (and the client certificate names the
    header's node_id), while the merge keeps the whole batch's. The body is joined to the
    header's bytes, so a body that sets a field the header leaves at its default (seq 0),
    or that ends in a length-delimited field swallowing the header's bytes, would be
    merged as another seq or another node."""
    try:
        whole, size = open_sealed(batch, limits.max_bytes, limits.max_inflation, limits.inflation_floor)
    except InflationError as exc:
        raise BatchRejected(f"compressed body: {exc}", "inflation") from None
    except WireError as exc:
        raise BatchRejected(f"compressed body: {exc}", "encoding") from None
    if size >= 0 and any(getattr(whole, f) != getattr(batch, f) for f in CLEAR_FIELDS):
        raise BatchRejected("the sealed body carries an identity or window other than its header's",
                            "identity")
    return whole, size


def check_identity(node_id: str, boot_id: str, limits: Limits) -> None:
    """The batch identity is bounded before it is used as a key (de-duplication, logs)."""
    if not node_id or len(node_id) > limits.max_node_id:
        raise BatchRejected(f"node_id must be 1-{limits.max_node_id} characters", "identity")
    if not boot_id or len(boot_id.encode()) > limits.max_boot_id:
        raise BatchRejected(f"boot_id must be 1-{limits.max_boot_id} bytes", "identity")


def check_counts(strings: int, blocks: int, limits: Limits) -> None:
    """The counts that decoding pays for per item, checked before decoding: each string
    becomes a Python str (4 M strings of 2 characters, 16 MiB inflated from a sealed
    body of 1 KiB, cost decode 1.4 s and 309 MiB), each block a set of numpy arrays."""
    if strings > limits.max_strings:
        raise BatchRejected(f"{strings} strings exceed {limits.max_strings}", "strings")
    if blocks > limits.max_blocks:
        raise BatchRejected(f"{blocks} blocks exceed {limits.max_blocks}", "series")


def _check_indices(name: str, n_strings: int, *columns: npt.NDArray[np.generic] | list[int]) -> None:
    for values in columns:
        arr = np.asarray(values)
        if arr.size and (int(arr.max()) >= n_strings or int(arr.min()) < 0):
            raise BatchRejected(f"{name}: string index out of range", "strings")


def validate(b: BatchCols | pb.Batch, limits: Limits, now_ns: int, size: int | None = None) -> BatchCols:
    """Raise BatchRejected naming the first broken rule; returns the decoded columns."""
    if isinstance(b, pb.Batch):
        check_counts(len(b.strings), len(b.metrics) + len(b.histograms) + len(b.profiles), limits)
        try:
            b = decode(b)
        except ColumnError as exc:
            raise BatchRejected(f"column: {exc}", "encoding") from None
    if size is not None and size > limits.max_bytes:
        raise BatchRejected(f"batch of {size} bytes exceeds {limits.max_bytes}", "size")
    check_identity(b.node_id, b.boot_id, limits)
    if b.seq < 1:
        raise BatchRejected("seq must be >= 1", "identity")
    if not b.start_ns < b.end_ns:
        raise BatchRejected("window start must be before its end", "window")
    if b.end_ns - b.start_ns > limits.max_window_s * NS:
        raise BatchRejected(f"window longer than {limits.max_window_s}s", "window")
    if b.end_ns > now_ns + limits.max_future_skew_s * NS:
        raise BatchRejected(f"window ends more than {limits.max_future_skew_s}s in the future", "window")
    if b.end_ns < now_ns - limits.max_age_s * NS:
        raise BatchRejected(f"window older than {limits.max_age_s}s", "window")
    check_columns(b, limits)
    check_values(b, limits)
    return b


U64_MAX = 2**64 - 1


def _sum_u64(values: npt.NDArray[np.uint64]) -> int:
    """The exact sum of a uint64 column (numpy's wraps): high and low halves apart."""
    return (int((values >> np.uint64(32)).sum()) << 32) + int((values & np.uint64(0xFFFFFFFF)).sum())


def check_values(b: BatchCols, limits: Limits) -> None:
    """The values themselves, once the structure is sound: gauges are finite, no counter
    column sums past 2^64-1 (roll-ups add a block's series up), and event times lie in the
    batch's window widened by the clock skew allowed (events are partitioned by day in
    ClickHouse: times spread over centuries would make a part per day)."""
    for i, m in enumerate(b.metrics):
        if m.kind == pb.GAUGE:
            if m.gauge_values.size and not np.isfinite(m.gauge_values).all():
                raise BatchRejected(f"metrics[{i}]: a gauge is NaN or infinite", "values")
        elif m.counter_values.size and _sum_u64(m.counter_values) > U64_MAX:
            raise BatchRejected(f"metrics[{i}]: counter values add up past 2^64-1", "values")
    for i, h in enumerate(b.histograms):
        for name, col in (("counts", h.count), ("sums", h.sum), ("zero counts", h.zero),
                          ("bucket counts", h.bucket_count)):
            if col.size and _sum_u64(col) > U64_MAX:
                raise BatchRejected(f"histograms[{i}]: {name} add up past 2^64-1", "values")
    e = b.events
    if e is not None and e.time_ns.size:
        skew = limits.max_future_skew_s * NS
        if int(e.time_ns.min()) < b.start_ns - skew or int(e.time_ns.max()) > b.end_ns + skew:
            raise BatchRejected(f"events: a time outside the window widened by {limits.max_future_skew_s}s", "events")


def check_columns(b: BatchCols, limits: Limits) -> None:
    """The structural rules alone: columns agree in length, indices are in range.

    String indices are checked with one max() over all index columns of the batch;
    only a batch that fails it is searched for the column to name.
    """
    _check_shapes(b, limits)
    n = len(b.strings)
    cols = _index_columns(b)
    scalars = [i for m in b.metrics for i in (m.name, m.unit, m.help)]
    scalars += [i for h in b.histograms for i in (h.name, h.unit, h.help)]
    scalars += [p.name for p in b.profiles]
    flat = np.concatenate(cols) if cols else np.zeros(0, np.uint32)  # one max, not ~50
    top = max([int(flat.max()) if flat.size else 0, *scalars])
    if top >= n:
        for where, *columns in _named_index_columns(b):
            _check_indices(where, n, *columns)
        raise BatchRejected("a string index is out of range", "strings")
    used = np.zeros(n, np.bool_)
    used[flat] = True
    used[scalars] = True
    used[0] = True  # the empty string is always there
    unused = n - int(np.count_nonzero(used))
    if unused > limits.max_unreferenced_strings:
        raise BatchRejected(f"{unused} strings are not referred to (at most "
                            f"{limits.max_unreferenced_strings})", "strings")


def _index_columns(b: BatchCols) -> list[npt.NDArray[np.uint32]]:
    cols = [b.node_label_keys, b.node_label_values]
    for m in b.metrics:
        cols += [m.label_keys, m.label_values]
    for h in b.histograms:
        cols += [h.label_keys, h.label_values]
    for p in b.profiles:
        cols += [p.comm, p.cgroup, p.stack_frames]
    if b.events is not None:
        e = b.events
        cols += [e.kind, e.comm, e.cgroup, e.detail]
    return cols


def _named_index_columns(b: BatchCols) -> list[list]:  # type: ignore[type-arg]
    out: list[list] = [["node labels", b.node_label_keys, b.node_label_values]]  # type: ignore[type-arg]
    out += [[f"metrics[{i}]", [m.name, m.unit, m.help], m.label_keys, m.label_values]
            for i, m in enumerate(b.metrics)]
    out += [[f"histograms[{i}]", [h.name, h.unit, h.help], h.label_keys, h.label_values]
            for i, h in enumerate(b.histograms)]
    out += [[f"profiles[{i}]", [p.name], p.comm, p.cgroup, p.stack_frames]
            for i, p in enumerate(b.profiles)]
    if b.events is not None:
        e = b.events
        out.append(["events", e.kind, e.comm, e.cgroup, e.detail])
    return out


def _check_shapes(b: BatchCols, limits: Limits) -> None:
    n = len(b.strings)
    if n == 0 or b.strings[0] != "":
        raise BatchRejected("string table must start with the empty string", "strings")
    check_counts(n, len(b.metrics) + len(b.histograms) + len(b.profiles), limits)
    lengths = list(map(len, b.strings))
    if max(lengths) > limits.max_string_bytes:
        raise BatchRejected(f"a string exceeds {limits.max_string_bytes} characters", "strings")
    if sum(lengths) > limits.max_strings_chars:
        raise BatchRejected(f"strings exceed {limits.max_strings_chars} characters in all", "strings")
    if len(b.node_label_keys) != len(b.node_label_values):
        raise BatchRejected("node label keys and values differ in length", "series")
    if len(b.node_label_keys) > limits.max_node_labels:
        raise BatchRejected(f"{len(b.node_label_keys)} node labels exceed {limits.max_node_labels}", "series")
    series = 0
    for i, m in enumerate(b.metrics):
        where = f"metrics[{i}]"
        if m.kind not in (pb.COUNTER, pb.GAUGE):
            raise BatchRejected(f"{where}: unknown kind {m.kind}", "series")
        values = len(m.counter_values) if m.kind == pb.COUNTER else len(m.gauge_values)
        other = len(m.gauge_values) if m.kind == pb.COUNTER else len(m.counter_values)
        if other:
            raise BatchRejected(f"{where}: values in the wrong column for its kind", "series")
        if len(m.label_keys) > limits.max_label_keys:
            raise BatchRejected(f"{where}: more than {limits.max_label_keys} label keys", "series")
        if len(m.label_values) != values * len(m.label_keys):
            raise BatchRejected(f"{where}: label matrix does not match {values} series", "series")
        if len(set(m.label_keys.tolist())) != len(m.label_keys):
            raise BatchRejected(f"{where}: a label key appears twice", "series")
        series += values
    for i, h in enumerate(b.histograms):
        where = f"histograms[{i}]"
        k = len(h.count)
        if h.scale != 0:
            raise BatchRejected(f"{where}: only scale 0 is supported", "buckets")
        if len(h.sum) != k or len(h.zero) != k or len(h.offsets) != k + 1:
            raise BatchRejected(f"{where}: columns differ in length", "buckets")
        if len(h.label_keys) > limits.max_label_keys:
            raise BatchRejected(f"{where}: more than {limits.max_label_keys} label keys", "buckets")
        if len(h.label_values) != k * len(h.label_keys):
            raise BatchRejected(f"{where}: label matrix does not match {k} series", "buckets")
        if len(set(h.label_keys.tolist())) != len(h.label_keys):
            raise BatchRejected(f"{where}: a label key appears twice", "buckets")
        offs = h.offsets
        widths = np.diff(offs)
        if offs[0] != 0 or offs[-1] != len(h.bucket_index) or (k and widths.min() < 0):
            raise BatchRejected(f"{where}: bucket offsets are not monotonic over the buckets", "buckets")
        if len(h.bucket_count) != len(h.bucket_index):
            raise BatchRejected(f"{where}: bucket index and count differ in length", "buckets")
        if k and widths.max() > limits.max_buckets_per_series:
            raise BatchRejected(f"{where}: more than {limits.max_buckets_per_series} buckets in a series", "buckets")
        idx = h.bucket_index
        if idx.size and (idx.min() < -64 or idx.max() > 127):
            raise BatchRejected(f"{where}: bucket index outside [-64, 127]", "buckets")
        series += k
    for i, p in enumerate(b.profiles):
        where = f"profiles[{i}]"
        rows = len(p.samples)
        if not all(len(c) == rows for c in (p.pid, p.comm, p.cgroup, p.kernel_stack, p.user_stack)):
            raise BatchRejected(f"{where}: columns differ in length", "stacks")
        offs = p.stack_offsets
        if offs.size == 0 or offs[0] != 0 or offs[-1] != len(p.stack_frames) or (
            offs.size > 1 and np.diff(offs).min() < 0
        ):
            raise BatchRejected(f"{where}: stack offsets do not cover the frames", "stacks")
        if offs.size > 1 and np.diff(offs).max() > limits.max_stack_depth:
            raise BatchRejected(f"{where}: a stack deeper than {limits.max_stack_depth}", "stacks")
        stacks = len(offs) - 1
        if stacks > 2 * rows:  # the merge interns every stack of a block, referred to or not
            raise BatchRejected(f"{where}: more stacks than its rows refer to (2 a row)", "stacks")
        for ids in (p.kernel_stack, p.user_stack):
            if ids.size and (ids.min() < -1 or ids.max() >= stacks):
                raise BatchRejected(f"{where}: stack id out of range", "stacks")
        series += rows
    e = b.events
    if e is not None:
        rows = len(e.time_ns)
        if not all(len(c) == rows for c in (e.kind, e.pid, e.ppid, e.comm, e.cgroup, e.detail, e.code)):
            raise BatchRejected("events: columns differ in length", "events")
        if rows > limits.max_events:
            raise BatchRejected(f"{rows} events exceed {limits.max_events}", "events")
    if series > limits.max_series:
        raise BatchRejected(f"{series} series exceed {limits.max_series}", "series")
