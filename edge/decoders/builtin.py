"""The decoders every description may name (registered in decoders/registry.py).

Each takes the raw field (an int, or bytes for arrays), the field's description
and the decode context, and returns one value per label it declares.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from stratoscope.edge.decoders.cgroups import CgroupResolver
from stratoscope.edge.decoders.context import DecodeContext
from stratoscope.edge.decoders.errno_names import errno_name
from stratoscope.edge.decoders.registry import decoder, structural
from stratoscope.edge.decoders.syscalls import syscall_name
from stratoscope.edge.spec import FieldSpec


def _integer(v: Any, f: FieldSpec, c: DecodeContext) -> tuple[str, ...]:
    return (str(int(v)),)


# Signed and unsigned integers and ports print the same; the names say what a field holds.
for _name in ("uint", "int", "port"):
    decoder(_name)(_integer)


@decoder("hex")
def _hex(v: Any, f: FieldSpec, c: DecodeContext) -> tuple[str, ...]:
    return (hex(int(v)),)


@decoder("string")
def _string(v: Any, f: FieldSpec, c: DecodeContext) -> tuple[str, ...]:
    """A NUL-terminated char array (comm, filenames)."""
    return (bytes(v).split(b"\0", 1)[0].decode(errors="replace"),)


@decoder("syscall")
def _syscall(v: Any, f: FieldSpec, c: DecodeContext) -> tuple[str, ...]:
    return (syscall_name(int(v), c.arch),)


@decoder("errno")
def _errno(v: Any, f: FieldSpec, c: DecodeContext) -> tuple[str, ...]:
    return (errno_name(int(v)),)


@decoder("enum")
def _enum(v: Any, f: FieldSpec, c: DecodeContext) -> tuple[str, ...]:
    """A small integer named by the description's ``values`` (unknown: the number)."""
    return (f.values.get(int(v), str(int(v))),)


def format_addr(raw: bytes) -> str:
    """A 16-byte address: IPv4-mapped addresses print as IPv4, others as IPv6."""
    addr = ipaddress.IPv6Address(bytes(raw[:16]))
    return str(addr.ipv4_mapped or addr)


@decoder("inet_addr")
def _inet_addr(v: Any, f: FieldSpec, c: DecodeContext) -> tuple[str, ...]:
    return (format_addr(bytes(v)),)


@decoder("majorminor")
def _majorminor(v: Any, f: FieldSpec, c: DecodeContext) -> tuple[str, ...]:
    return (c.block_device(int(v)),)


@decoder("cgroup", extra_labels=("container",))
def _cgroup(v: Any, f: FieldSpec, c: DecodeContext) -> tuple[str, ...]:
    """cgroup id -> its path, and the container id parsed from the path ("" if none)."""
    path = c.cgroups.path(int(v))
    return (path, CgroupResolver.container_id(path))


structural("bucket")
structural("ksym_stack")
structural("usym_stack")
