"""The few bpf(2) commands the edge issues itself rather than through BCC.

BCC's Python binding has no call for ``BPF_ENABLE_STATS``, and its raw-tracepoint feature
probe looks a kernel symbol up through its own kallsyms reader, which answers "not found"
to any process whose euid is not 0, capabilities or not. These commands go straight to the
kernel instead, through libc's ``syscall``.
"""

from __future__ import annotations

import ctypes as ct
import errno
import platform

__all__ = ["BPF_ENABLE_STATS", "BPF_MAP_LOOKUP_ELEM", "BPF_RAW_TRACEPOINT_OPEN", "bpf",
           "supports_raw_tracepoints"]

BPF_MAP_LOOKUP_ELEM = 1
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_ENABLE_STATS = 32

#: bpf(2)'s number by machine (Python has no binding for it).
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "loongarch64": 280,
            "ppc64le": 361, "ppc64": 361, "s390x": 351, "armv7l": 386, "i686": 357}

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


def bpf(cmd: int, attr: ct.Array[ct.c_char]) -> tuple[int, int]:
    """bpf(cmd, attr, len(attr)): (return value, errno); ENOSYS on a machine not listed."""
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        return -1, errno.ENOSYS
    rc = int(_libc.syscall(ct.c_long(number), ct.c_int(cmd), attr, ct.c_uint(len(attr))))
    return rc, ct.get_errno() if rc < 0 else 0


def supports_raw_tracepoints() -> bool:
    """Whether the kernel has ``BPF_RAW_TRACEPOINT_OPEN`` (Linux 4.17).

    Asks it to attach program ``-1`` to ``sys_enter``: a kernel that knows the command
    looks the program up and answers EBADF; one that does not answers EINVAL. Nothing is
    attached either way.
    """
    name = ct.create_string_buffer(b"sys_enter")
    attr = ct.create_string_buffer(16)
    ct.c_uint64.from_buffer(attr, 0).value = ct.addressof(name)  # raw_tracepoint.name
    ct.c_int32.from_buffer(attr, 8).value = -1  # raw_tracepoint.prog_fd
    _, err = bpf(BPF_RAW_TRACEPOINT_OPEN, attr)
    return err in (errno.EBADF, errno.EPERM)
