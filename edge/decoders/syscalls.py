"""Syscall number <-> name mapping for the architectures the edge collector runs on.

BPF programs attached to ``raw_syscalls:sys_enter`` only see the syscall *number*, and those
numbers differ per architecture (``openat`` is 257 on x86_64 but 56 on aarch64), so the name has
to be decided in user space with the table of the machine that produced the event. The tables
are literal data (see ``_syscall_tables``) so no kernel headers are needed at runtime.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from stratoscope.edge.decoders._syscall_tables import AARCH64, X86_64

__all__ = ["SUPPORTED_ARCHES", "normalize_arch", "syscall_name", "syscall_number"]

# Canonical arch name -> number -> name.
_BY_NUMBER: Final[Mapping[str, Mapping[int, str]]] = MappingProxyType(
    {"x86_64": X86_64, "aarch64": AARCH64}
)
# Canonical arch name -> name -> number (derived once; the tables have no duplicate names).
_BY_NAME: Final[Mapping[str, Mapping[str, int]]] = MappingProxyType(
    {arch: MappingProxyType({n: nr for nr, n in t.items()}) for arch, t in _BY_NUMBER.items()}
)
# Spellings seen in practice: ``uname -m`` says x86_64/aarch64, Go/Debian/Docker say amd64/arm64.
_ALIASES: Final[Mapping[str, str]] = MappingProxyType(
    {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
)

SUPPORTED_ARCHES: Final[frozenset[str]] = frozenset(_BY_NUMBER)

_UNKNOWN_PREFIX: Final = "sys_"


def normalize_arch(arch: str | None = None) -> str:
    """Return the canonical arch name ("x86_64" or "aarch64") for ``arch``.

    ``None`` means the machine we are running on, which is right for the edge collector because
    it decodes events produced by the local kernel. Aliases are accepted because arch strings
    arrive from many tools (``uname``, container image metadata, Go's GOARCH). An unsupported
    arch raises ``ValueError`` rather than silently decoding with the wrong table.
    """
    raw = platform.machine() if arch is None else arch
    canonical = _ALIASES.get(raw.strip().lower())
    if canonical is None:
        raise ValueError(f"unsupported architecture {raw!r}; expected one of {sorted(_ALIASES)}")
    return canonical


def syscall_name(nr: int, arch: str | None = None) -> str:
    """Return the syscall name for number ``nr`` on ``arch`` (default: this machine).

    Unknown numbers (newer kernels, arch-private ranges, or garbage such as -1 from a
    ``sys_exit`` of a non-syscall) become ``"sys_<nr>"`` instead of raising, so a single odd
    event never breaks aggregation and the number is still recoverable from the label.
    """
    table = _BY_NUMBER[normalize_arch(arch)]
    return table.get(nr, f"{_UNKNOWN_PREFIX}{nr}")


def syscall_number(name: str, arch: str | None = None) -> int:
    """Return the syscall number for ``name`` on ``arch`` (default: this machine).

    This is the inverse of :func:`syscall_name`, used to turn user-facing filters ("only
    openat") into the numbers the BPF side compares against. It accepts the ``sys_`` prefix
    (``"sys_openat"``) and the ``"sys_<nr>"`` labels that :func:`syscall_name` produces for
    unknown numbers, so every label round-trips. Anything else raises ``ValueError``.
    """
    canonical = normalize_arch(arch)
    table = _BY_NAME[canonical]
    if name in table:
        return table[name]
    if name.startswith(_UNKNOWN_PREFIX):
        rest = name[len(_UNKNOWN_PREFIX) :]
        if rest in table:
            return table[rest]
        digits = rest[1:] if rest.startswith("-") else rest
        if digits.isdecimal() and digits.isascii():
            return int(rest)
    raise ValueError(f"unknown syscall {name!r} on {canonical}")
