"""Errno code -> symbolic name, for syscall/kernel-function return values seen by BPF.

BPF programs record raw return values: syscalls return ``-errno`` and some tools store the
positive code, so both signs are accepted. Names come from Python's ``errno`` module, which on
Linux is generated from the same ``asm-generic/errno*.h`` used by both x86_64 and aarch64.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

__all__ = ["errno_name"]

# Python's errorcode picks an arbitrary spelling for aliased codes (it reports ENOTSUP for 95
# and EDEADLOCK for 35); pin the kernel's canonical spelling, which is what strace and kernel
# docs use, so labels are stable across Python builds.
_CANONICAL_ALIASES: Final[Mapping[int, str]] = MappingProxyType(
    {errno.EAGAIN: "EAGAIN", errno.EDEADLK: "EDEADLK", errno.EOPNOTSUPP: "EOPNOTSUPP"}
)

# Codes the kernel can hand to BPF that Python's errno lacks:
# - EHWPOISON (uapi asm-generic/errno.h), only added to Python's errno in 3.12;
# - kernel-internal codes (include/linux/errno.h) that never reach libc but do show up in BPF:
#   raw_syscalls:sys_exit sees ERESTARTSYS & co. before signal delivery rewrites them, and
#   fexit/kretprobe programs see whatever in-kernel functions return.
_KERNEL_ONLY: Final[Mapping[int, str]] = MappingProxyType(
    {
        133: "EHWPOISON",
        512: "ERESTARTSYS",
        513: "ERESTARTNOINTR",
        514: "ERESTARTNOHAND",
        515: "ENOIOCTLCMD",
        516: "ERESTART_RESTARTBLOCK",
        517: "EPROBE_DEFER",
        518: "EOPENSTALE",
        519: "ENOPARAM",
        521: "EBADHANDLE",
        522: "ENOTSYNC",
        523: "EBADCOOKIE",
        524: "ENOTSUPP",
        525: "ETOOSMALL",
        526: "ESERVERFAULT",
        527: "EBADTYPE",
        528: "EJUKEBOX",
        529: "EIOCBQUEUED",
        530: "ERECALLCONFLICT",
        531: "ENOGRACE",
    }
)


def errno_name(code: int) -> str:
    """Return the symbolic name of errno ``code`` (either sign), e.g. ``-2`` -> ``"ENOENT"``.

    ``0`` is ``"OK"`` because a zero return is success, not an error, and dashboards group on
    this label. Unknown codes become ``"E<n>"`` with the absolute value (so ``-4095`` and
    ``4095`` share a label, like every known code does) instead of raising, because one odd
    return value must not break decoding of a whole batch.
    """
    if code == 0:
        return "OK"
    magnitude = abs(code)
    name = (
        _CANONICAL_ALIASES.get(magnitude)
        or errno.errorcode.get(magnitude)
        or _KERNEL_ONLY.get(magnitude)
    )
    return name if name is not None else f"E{magnitude}"
