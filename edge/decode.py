"""Turn raw map rows into labelled series, generically, from the descriptions.

Each key field names a decoder; a decoder turns the raw field into one or more
(label, value) pairs. Unknown decoder names are rejected when the description
is parsed (spec.DECODERS), and a decoder that fails on one value counts an
error and yields "[error]" instead of dropping the whole drain.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stratoscope.edge.decoders.cgroups import CgroupResolver
from stratoscope.edge.decoders.errno_names import errno_name
from stratoscope.edge.decoders.syscalls import syscall_name
from stratoscope.edge.spec import CountersMap, EventsMap, FieldSpec, HistogramMap, ProfileMap

Labels = tuple[str, ...]


@dataclass
class DecodeContext:
    """What decoders consult outside the process; injectable for tests."""

    cgroups: CgroupResolver
    sys_root: Path = Path("/sys")
    arch: str | None = None
    errors: int = 0
    _devnames: dict[int, str] = field(default_factory=dict)

    def block_device(self, dev: int) -> str:
        """Kernel dev_t (major << 20 | minor) -> device name such as "vda"."""
        name = self._devnames.get(dev)
        if name is None:
            major, minor = dev >> 20, dev & 0xFFFFF
            name = f"{major}:{minor}"
            try:
                for line in (self.sys_root / f"dev/block/{major}:{minor}/uevent").read_text().split():
                    if line.startswith("DEVNAME="):
                        name = line.split("=", 1)[1]
            except OSError:
                pass
            self._devnames[dev] = name
        return name


def _raw(value: Any) -> Any:
    if isinstance(value, ct.Array):
        return bytes(value)
    return value


def format_addr(raw: bytes) -> str:
    """A 16-byte address: IPv4-mapped addresses print as IPv4, others as IPv6."""
    addr = ipaddress.IPv6Address(bytes(raw[:16]))
    return str(addr.ipv4_mapped or addr)


FieldDecoder = Callable[[Any, FieldSpec, DecodeContext], list[tuple[str, str]]]


def _one(fn: Callable[[Any, FieldSpec, DecodeContext], str]) -> FieldDecoder:
    return lambda v, f, c: [(f.label_name, fn(v, f, c))]


def _cgroup(v: Any, f: FieldSpec, c: DecodeContext) -> list[tuple[str, str]]:
    path = c.cgroups.path(int(v))
    return [(f.label_name, path), ("container", CgroupResolver.container_id(path))]


DECODERS: dict[str, FieldDecoder] = {
    "uint": _one(lambda v, f, c: str(int(v))),
    "int": _one(lambda v, f, c: str(int(v))),
    "hex": _one(lambda v, f, c: hex(int(v))),
    "port": _one(lambda v, f, c: str(int(v))),
    "string": _one(lambda v, f, c: bytes(v).split(b"\0", 1)[0].decode(errors="replace")),
    "syscall": _one(lambda v, f, c: syscall_name(int(v), c.arch)),
    "errno": _one(lambda v, f, c: errno_name(int(v))),
    "enum": _one(lambda v, f, c: f.values.get(int(v), str(int(v)))),
    "inet_addr": _one(lambda v, f, c: format_addr(bytes(v))),
    "majorminor": _one(lambda v, f, c: c.block_device(int(v))),
    "cgroup": _cgroup,
}

#: Decoders that do not produce labels: handled by the map kind itself.
STRUCTURAL = frozenset({"bucket", "ksym_stack", "usym_stack"})


def label_keys(fields: list[FieldSpec]) -> list[str]:
    """Label names a key produces, in order (cgroup adds "container")."""
    keys: list[str] = []
    for f in fields:
        if f.padding or f.decoder in STRUCTURAL:
            continue
        keys.append(f.label_name)
        if f.decoder == "cgroup":
            keys.append("container")
    return keys


def unbounded_labels(fields: list[FieldSpec]) -> set[str]:
    out: set[str] = set()
    for f in fields:
        if f.unbounded:
            out.add(f.label_name)
            if f.decoder == "cgroup":
                out.add("container")
    return out


def decode_labels(key: Any, fields: list[FieldSpec], ctx: DecodeContext) -> Labels:
    values: list[str] = []
    for f in fields:
        if f.padding or f.decoder in STRUCTURAL:
            continue
        raw = _raw(getattr(key, f.name)) if hasattr(key, "_fields_") else _raw(key)
        try:
            pairs = DECODERS[f.decoder](raw, f, ctx)
        except Exception:
            ctx.errors += 1
            pairs = [(f.label_name, "[error]")] + (
                [("container", "")] if f.decoder == "cgroup" else []
            )
        values.extend(v for _, v in pairs)
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
            for k, v in DECODERS[f.decoder](raw, f, ctx):
                out[k] = v
    return out
