"""Turn raw map rows into labelled series, generically, from the descriptions.

Each key field names a decoder; a decoder turns the raw field into the values of
the labels it declares (decoders/registry.py, which spec validation reads too, so
an unknown name is refused when the description is parsed). A decoder that
fails on one value counts an error and yields "[error]" instead of failing the
whole drain.
"""

from __future__ import annotations

import ctypes as ct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stratoscope.edge.decoders.context import DecodeContext
from stratoscope.edge.spec import CountersMap, EventsMap, FieldSpec, HistogramMap, ProfileMap

__all__ = [
    "DecodeContext", "Histogram", "Labels", "ProfileRow", "decode_counters", "decode_event",
    "decode_histogram", "decode_labels", "decode_profile", "event_struct",
]

Labels = tuple[str, ...]


def _raw(value: Any) -> Any:
    if isinstance(value, ct.Array):
        return bytes(value)
    return value


def _decode_field(raw: Any, f: FieldSpec, ctx: DecodeContext) -> tuple[str, ...]:
    """One field's label values; a decoder that fails counts an error and yields
    "[error]" (and "" for its extra labels) instead of failing the whole drain."""
    d = f.decoder_def
    assert d.fn is not None
    try:
        values = d.fn(raw, f, ctx)
    except Exception:
        ctx.errors += 1
        return d.failed()
    if len(values) != 1 + len(d.extra_labels):
        ctx.errors += 1
        return d.failed()
    return values


def decode_labels(key: Any, fields: list[FieldSpec], ctx: DecodeContext) -> Labels:
    """A map key -> its label values, in the order of spec.label_keys(fields)."""
    values: list[str] = []
    for f in fields:
        if not f.labels:
            continue
        raw = _raw(getattr(key, f.name)) if hasattr(key, "_fields_") else _raw(key)
        values.extend(_decode_field(raw, f, ctx))
    return tuple(values)


@dataclass
class Histogram:
    """One histogram series: sparse OTel scale-0 buckets plus zero bucket."""

    buckets: dict[int, int] = field(default_factory=dict)
    zero: int = 0
    count: int = 0
    sum: int = 0

    def add_slot(self, slot: int, count: int, total: int) -> None:
        """Add a kernel slot (0 = zero bucket, k >= 1 = index k - 2)."""
        self.count += count
        self.sum += total
        if slot == 0:
            self.zero += count
        else:
            idx = slot - 2
            self.buckets[idx] = self.buckets.get(idx, 0) + count

    def merge(self, other: Histogram) -> None:
        self.zero += other.zero
        self.count += other.count
        self.sum += other.sum
        for i, c in other.buckets.items():
            self.buckets[i] = self.buckets.get(i, 0) + c


def decode_counters(
    m: CountersMap, rows: list[tuple[Any, Any]], ctx: DecodeContext
) -> dict[str, dict[Labels, int]]:
    """metric -> labels -> summed delta."""
    out: dict[str, dict[Labels, int]] = {v.metric: {} for v in m.values}
    for key, value in rows:
        labels = decode_labels(key, m.key, ctx)
        for v in m.values:
            n = int(value[v.field]) if v.field else int(value)
            if n:
                series = out[v.metric]
                series[labels] = series.get(labels, 0) + n
    return out


def decode_histogram(
    m: HistogramMap, rows: list[tuple[Any, Any]], ctx: DecodeContext
) -> dict[Labels, Histogram]:
    bucket_field = next(f.name for f in m.key if f.decoder == "bucket")
    out: dict[Labels, Histogram] = {}
    for key, value in rows:
        labels = decode_labels(key, m.key, ctx)
        hist = out.setdefault(labels, Histogram())
        hist.add_slot(int(getattr(key, bucket_field)), int(value["count"]), int(value["sum"]))
    return out


@dataclass(frozen=True)
class ProfileRow:
    pid: int
    comm: str
    cgroup: str
    kernel_stack: tuple[str, ...] | None
    user_stack: tuple[str, ...] | None


def decode_profile(
    m: ProfileMap,
    rows: list[tuple[Any, Any]],
    stacks: dict[int, list[int]],
    ctx: DecodeContext,
    symbolize_kernel: Callable[[int], str],
    symbolize_user: Callable[[int, int], str],
) -> dict[ProfileRow, int]:
    """Stack-id counts -> symbolized stacks (leaf first) per process."""
    out: dict[ProfileRow, int] = {}
    by_decoder = {f.decoder: f.name for f in m.key}
    for key, value in rows:
        pid = int(key.pid)
        kid = int(getattr(key, by_decoder["ksym_stack"]))
        uid = int(getattr(key, by_decoder["usym_stack"]))
        # A stack id whose trace is gone (or empty) means "no stack", not an empty one.
        kframes = tuple(symbolize_kernel(a) for a in stacks.get(kid, ())) or None
        uframes = tuple(symbolize_user(pid, a) for a in stacks.get(uid, ())) or None
        comm = bytes(key.comm).split(b"\0", 1)[0].decode(errors="replace")
        cgroup = ctx.cgroups.path(int(key.cgroup))
        row = ProfileRow(pid, comm, cgroup, kframes, uframes)
        out[row] = out.get(row, 0) + int(value)
    return out


_CTYPES: dict[str, Any] = {
    "u8": ct.c_uint8, "s8": ct.c_int8, "u16": ct.c_uint16, "s16": ct.c_int16,
    "u32": ct.c_uint32, "s32": ct.c_int32, "u64": ct.c_uint64, "s64": ct.c_int64,
}


def event_struct(m: EventsMap) -> type[ct.Structure]:
    """A ctypes struct laid out like the C event struct (natural alignment)."""
    fields: list[tuple[str, Any]] = []
    for f in m.fields:
        if f.type in _CTYPES:
            fields.append((f.name, _CTYPES[f.type]))
        else:
            fields.append((f.name, ct.c_char * f.size if f.type.startswith("char") else ct.c_uint8 * f.size))
    return type(f"{m.name}_event", (ct.Structure,), {"_fields_": fields})


def decode_event(
    m: EventsMap, struct: type[ct.Structure], data: bytes, ctx: DecodeContext
) -> dict[str, Any]:
    """One ring-buffer record -> field name -> decoded value (strings resolved)."""
    if len(data) < ct.sizeof(struct):
        raise ValueError(
            f"event of {len(data)} bytes is shorter than the described {ct.sizeof(struct)}"
        )
    ev = struct.from_buffer_copy(data[: ct.sizeof(struct)])
    out: dict[str, Any] = {}
    for f in m.fields:
        if f.padding:
            continue
        raw = _raw(getattr(ev, f.name))
        if f.decoder in ("uint", "int"):
            out[f.name] = int(raw)
        else:
            out.update(zip(f.labels, _decode_field(raw, f, ctx), strict=True))
    return out
