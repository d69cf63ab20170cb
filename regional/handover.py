"""An admitted batch's columns, packed for the hop from the ingest process to the merge.

Why not protobuf: the ingest process has already inflated, parsed, decoded and
validated the batch. Handing the merge the protobuf bytes made it parse them again
(upb copies every bytes field out of the message) and decode ~130 columns again,
~0.4-0.5 ms of its busiest thread per 2,000-series batch, plus a fresh copy of the
batch's bytes per step (page faults, ~3-10 us each on this VM). Here the columns
travel as they are: one buffer holding every array end to end (8-byte aligned) and a
small pickled header (identity, window, strings, scalars, each array's dtype and
length). ``unpack`` maps the arrays onto the buffer without copying (read-only views,
like ``batchcols.decode`` over ``x_le`` fields). This is a private format between two
processes of one regional (same build, same machine), never stored or sent elsewhere;
the wire contract stays proto/.

Layout: ``[arrays, each padded to 8 bytes][header pickle][header length: 8 bytes LE]``.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import numpy.typing as npt

from stratoscope.regional.batchcols import BatchCols, EventCols, HistCols, MetricCols, ProfileCols

_PAD = b"\0" * 8
_DTYPES: dict[str, np.dtype[Any]] = {}


def _arrays(b: BatchCols) -> list[npt.NDArray[Any]]:
    """Every array of ``b`` in the one order ``unpack`` reads them back."""
    out: list[npt.NDArray[Any]] = [b.node_label_keys, b.node_label_values]
    for m in b.metrics:
        out += [m.label_keys, m.label_values, m.counter_values, m.gauge_values]
    for h in b.histograms:
        out += [h.label_keys, h.label_values, h.count, h.sum, h.zero, h.offsets, h.bucket_index,
                h.bucket_count]
    for p in b.profiles:
        out += [p.stack_offsets, p.stack_frames, p.pid, p.comm, p.cgroup, p.kernel_stack,
                p.user_stack, p.samples]
    if b.events is not None:
        e = b.events
        out += [e.time_ns, e.kind, e.pid, e.ppid, e.comm, e.cgroup, e.detail, e.code]
    return out


def pack(b: BatchCols) -> bytes:
    """``b`` as one buffer (see the module docstring)."""
    parts: list[Any] = []
    layout: list[tuple[str, int]] = []
    append = parts.append
    for a in _arrays(b):
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        append(a.data)
        if a.nbytes % 8:
            append(_PAD[a.nbytes % 8:])
        layout.append((a.dtype.str, a.size))
    # The strings as one NUL-joined text (pickling the list costs twice as much to pack);
    # a table whose strings contain NUL themselves goes as a list.
    text = "\0".join(b.strings)
    strings: str | list[str] = text if text.count("\0") == len(b.strings) - 1 else b.strings
    header = pickle.dumps((
        b.node_id, b.boot_id, b.seq, b.start_ns, b.end_ns, strings,
        [(m.kind, m.name, m.unit, m.help) for m in b.metrics],
        [(h.name, h.unit, h.help, h.scale) for h in b.histograms],
        [(p.name, p.period_ns) for p in b.profiles],
        None if b.events is None else b.events.lost,
        layout,
    ), protocol=pickle.HIGHEST_PROTOCOL)
    parts += [header, len(header).to_bytes(8, "little")]
    return b"".join(parts)


def unpack(buf: bytes | memoryview) -> BatchCols:
    """The columns ``pack`` packed, as read-only views of ``buf``."""
    header = int.from_bytes(buf[-8:], "little")
    end = len(buf) - 8 - header  # where the arrays end
    (node_id, boot_id, seq, start_ns, end_ns, strings, metrics, hists, profiles, lost,
     layout) = pickle.loads(buf[end: len(buf) - 8])
    if isinstance(strings, str):
        strings = strings.split("\0")
    # one buffer export, then a slice and a view per array: ~1 us each instead of
    # np.frombuffer's ~1.5 us (~95 arrays a batch)
    raw = np.frombuffer(buf, dtype=np.uint8)
    arrays = []
    at = 0
    for dtype, count in layout:
        dt = _DTYPES.get(dtype) or _DTYPES.setdefault(dtype, np.dtype(dtype))
        n = count * dt.itemsize
        arrays.append(raw[at:at + n].view(dt))
        at += (n + 7) & ~7
    if at != end:  # a slice past the arrays would be cut short silently, not raise
        raise ValueError(f"hand-over layout covers {at} bytes, its arrays take {end}")
    it = iter(arrays)
    nxt = it.__next__
    return BatchCols(
        node_id=node_id, boot_id=boot_id, seq=seq, start_ns=start_ns, end_ns=end_ns,
        strings=strings, node_label_keys=nxt(), node_label_values=nxt(),
        metrics=[MetricCols(kind, name, unit, help_, nxt(), nxt(), nxt(), nxt())
                 for kind, name, unit, help_ in metrics],
        histograms=[HistCols(name, unit, help_, scale, nxt(), nxt(), nxt(), nxt(), nxt(), nxt(),
                             nxt(), nxt())
                    for name, unit, help_, scale in hists],
        profiles=[ProfileCols(name, period, nxt(), nxt(), nxt(), nxt(), nxt(), nxt(), nxt(), nxt())
                  for name, period in profiles],
        events=None if lost is None else EventCols(nxt(), nxt(), nxt(), nxt(), nxt(), nxt(), nxt(),
                                                   nxt(), lost),
    )
