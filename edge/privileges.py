"""Least privilege for the edge: once its BPF programs are loaded and attached, the process
keeps only the capabilities it still needs for the rest of its life.

Which capability is needed when (measured on Linux 6.18 by tests/integration/
test_edge_privileges.py, which reads every thread's capability sets after start-up):

* ``CAP_BPF`` and ``CAP_PERFMON``: creating maps, loading programs, attaching tracepoints
  and the profiler's perf events. **Start-up only.** What the edge does afterwards acts
  on file descriptors it already holds: flipping, reading and batch-deleting map entries,
  walking stack maps, polling ring buffers, detaching. From Linux 5.19 the kernel checks
  those by descriptor, not by capability, even with ``kernel.unprivileged_bpf_disabled``
  set; before 5.19 every ``bpf()`` command needed ``CAP_BPF`` while that sysctl was set.
  :func:`map_access_needs_cap_bpf` probes which kind of kernel this is (in a child that has
  dropped every capability), and only the older kind keeps ``CAP_BPF``.
* ``CAP_SYSLOG``: ``/proc/kallsyms`` shows addresses only to an opener with it (unless
  ``kernel.kptr_restrict=0`` and ``kernel.perf_event_paranoid<=1``). The collector reads
  the kernel's symbols once, at start-up (edge/collector.py). **Start-up only**; without
  it kernel stacks show as ``[unknown]`` and the edge says so at start.
* ``CAP_SETPCAP``: emptying the bounding set (:func:`drop`). **Start-up only**; without it
  the bounding set is left as it was (``no_new_privs`` still stops ``execve`` from granting
  anything) and the edge says so.
* ``CAP_SYS_ADMIN``: only for ``bpf_stats: true``, which turns BPF run-time statistics on
  through ``BPF_ENABLE_STATS`` (:func:`enable_bpf_stats`); the descriptor it returns keeps
  them on for the life of the process, so **start-up only**. Without it the feature is off
  and the edge says so.
* ``CAP_SYS_PTRACE``: **kept for life** when a loaded program symbolizes user stacks (the
  profiler) and the edge was started with it. Naming a sampled address needs the sampled
  process's ``/proc/PID/maps`` and its files through ``/proc/PID/root``, which the kernel
  guards with a ptrace read check: without the capability only processes of the edge's
  own user with no more capabilities than the edge pass it. It is what lets a compromised
  edge read other processes' memory, which is why the systemd unit does not grant it by
  default; without it the edge says at start that other processes' user stacks show as
  ``[unknown]``.

Capabilities are per thread, so :func:`drop` refuses to run once a second thread exists:
the edge drops before it starts its gRPC, forwarder and /metrics threads (which then
inherit the reduced sets), and before numpy is imported it limits OpenBLAS to the calling
thread (stratoscope/cli.py).
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from stratoscope.edge.bpfsys import BPF_ENABLE_STATS, BPF_MAP_LOOKUP_ELEM, bpf
from stratoscope.edge.errors import EdgeError

__all__ = [
    "CAPABILITIES",
    "DropReport",
    "PrivilegeError",
    "ThreadCapabilities",
    "drop",
    "drop_after_load",
    "enable_bpf_stats",
    "map_access_needs_cap_bpf",
    "names",
    "plan",
    "thread_capabilities",
]

log = logging.getLogger("stratoscope.edge")

#: Capability numbers (linux/capability.h) by name.
CAPABILITIES: dict[str, int] = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3,
    "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
    "CAP_LINUX_IMMUTABLE": 9, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11,
    "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15,
    "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_CHROOT": 18, "CAP_SYS_PTRACE": 19,
    "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25, "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27,
    "CAP_LEASE": 28, "CAP_AUDIT_WRITE": 29, "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31,
    "CAP_MAC_OVERRIDE": 32, "CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36, "CAP_AUDIT_READ": 37, "CAP_PERFMON": 38, "CAP_BPF": 39,
    "CAP_CHECKPOINT_RESTORE": 40,
}
_NAMES = {v: k for k, v in CAPABILITIES.items()}
CAP_SETPCAP = CAPABILITIES["CAP_SETPCAP"]
CAP_SYS_PTRACE = CAPABILITIES["CAP_SYS_PTRACE"]
CAP_SYS_ADMIN = CAPABILITIES["CAP_SYS_ADMIN"]
CAP_BPF = CAPABILITIES["CAP_BPF"]

_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_VERSION_3 = 0x20080522

_BPF_STATS_RUN_TIME = 0


class PrivilegeError(EdgeError):
    """The process cannot be brought down to the capabilities it should keep."""


class _CapHeader(ct.Structure):
    _fields_ = [("version", ct.c_uint32), ("pid", ct.c_int)]


class _CapData(ct.Structure):
    _fields_ = [("effective", ct.c_uint32), ("permitted", ct.c_uint32),
                ("inheritable", ct.c_uint32)]


_libc = ct.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ct.c_int, ct.c_ulong, ct.c_ulong, ct.c_ulong, ct.c_ulong]
_libc.prctl.restype = ct.c_int


def names(mask: int) -> list[str]:
    """Capability names of a bit mask, in number order (unknown bits as ``cap_N``)."""
    return [_NAMES.get(i, f"cap_{i}") for i in range(64) if mask >> i & 1]


def _mask(caps: Iterable[int]) -> int:
    out = 0
    for c in caps:
        out |= 1 << c
    return out


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ct.get_errno()
        raise PrivilegeError(f"{what}: {os.strerror(err)}")


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    return int(_libc.prctl(option, arg2, arg3, 0, 0))


def _capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread."""
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ct.byref(header), data), "capget")
    return tuple(  # type: ignore[return-value]
        getattr(data[0], f) | getattr(data[1], f) << 32
        for f in ("effective", "permitted", "inheritable")
    )


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in (0, 1):
        data[i].effective = effective >> (32 * i) & 0xFFFFFFFF
        data[i].permitted = permitted >> (32 * i) & 0xFFFFFFFF
        data[i].inheritable = inheritable >> (32 * i) & 0xFFFFFFFF
    _check(_libc.capset(ct.byref(header), data), "capset")


def _last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return max(_NAMES)


@dataclass(frozen=True)
class ThreadCapabilities:
    """The capability lines of one thread's /proc status (bit masks)."""

    effective: int
    permitted: int
    inheritable: int
    bounding: int
    ambient: int
    no_new_privs: bool


def thread_capabilities(status: Path) -> ThreadCapabilities:
    """Read CapEff, CapPrm, CapInh, CapBnd, CapAmb and NoNewPrivs from a /proc status file."""
    fields: dict[str, str] = {}
    for line in status.read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return ThreadCapabilities(
        effective=int(fields["CapEff"], 16), permitted=int(fields["CapPrm"], 16),
        inheritable=int(fields["CapInh"], 16), bounding=int(fields["CapBnd"], 16),
        ambient=int(fields["CapAmb"], 16), no_new_privs=fields.get("NoNewPrivs") == "1",
    )


def _threads() -> list[str]:
    """Names of this process's threads, one per thread."""
    out = []
    for tid in sorted(os.listdir("/proc/self/task")):
        try:
            out.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:  # it ended while we looked
            continue
    return out


def map_access_needs_cap_bpf() -> bool:
    """Whether this kernel wants CAP_BPF for ``bpf()`` commands on maps the process holds.

    A forked child drops every capability and asks for an element of map ``-1``: a kernel
    that checks the descriptor first answers EBADF (Linux 5.19 and later, or unprivileged
    BPF allowed); one that wants the capability first answers EPERM. The child exits at
    once, so the parent's capabilities and threads are untouched.
    """
    attr = ct.create_string_buffer(b"\xff\xff\xff\xff", 32)  # map_fd = -1
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 2
        try:
            _capset(0, 0, 0)
            rc, err = bpf(BPF_MAP_LOOKUP_ELEM, attr)
            code = 0 if rc < 0 and err == errno.EBADF else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)


def enable_bpf_stats() -> int | None:
    """Turn on the kernel's BPF run-time statistics for as long as this process lives.

    ``BPF_ENABLE_STATS`` returns a descriptor that keeps them on until it is closed (by
    :func:`os.close` or by the process's exit, a crash included), so nothing has to be put
    back and nothing needs privileges afterwards; writing the ``kernel.bpf_stats_enabled``
    sysctl would need them again at exit. Needs ``CAP_SYS_ADMIN`` now. Returns the
    descriptor, or None (with one line saying why) when the kernel refused.
    """
    attr = ct.create_string_buffer(_BPF_STATS_RUN_TIME.to_bytes(4, "little"), 8)
    fd, err = bpf(BPF_ENABLE_STATS, attr)
    if fd >= 0:
        return fd
    if err == errno.EPERM:
        log.warning("bpf_stats: per-program run time is off: turning BPF statistics on needs "
                    "CAP_SYS_ADMIN at start-up, which this edge was not given")
    else:
        log.warning("bpf_stats: per-program run time is off: BPF_ENABLE_STATS failed: %s",
                    os.strerror(err))
    return None


@dataclass
class DropReport:
    """What :func:`drop` left: the capabilities kept (effective and permitted), the bounding
    set, and one line for each thing it could not do."""

    kept: int
    bounding: int
    warnings: list[str] = field(default_factory=list)


def _only_thread() -> None:
    """Raise PrivilegeError unless the calling thread is the process's only one."""
    threads = _threads()
    if len(threads) > 1:
        raise PrivilegeError(
            f"cannot drop capabilities: {len(threads)} threads already run "
            f"({', '.join(threads)}); capabilities are per thread, so they must be dropped "
            "before any thread starts")


def drop(keep: int) -> DropReport:
    """Keep only ``keep`` (a bit mask, intersected with what is held) for the process's life.

    Empties the ambient set, takes everything else out of the bounding set (needs
    CAP_SETPCAP, itself dropped last), sets effective = permitted = ``keep``, inheritable
    empty, then ``PR_SET_NO_NEW_PRIVS``, so no later ``execve`` can grant anything back.
    Every thread is checked afterwards. Raises PrivilegeError when another thread already
    runs: capabilities belong to threads, and one that kept them would keep them for all.
    """
    _only_thread()
    effective, permitted, _ = _capget()
    keep &= permitted
    report = DropReport(kept=keep, bounding=0)
    last = _last_cap()
    if effective >> CAP_SETPCAP & 1:
        for cap in range(last + 1):
            if not keep >> cap & 1 and _prctl(_PR_CAPBSET_READ, cap) == 1:
                _check(_prctl(_PR_CAPBSET_DROP, cap),
                       f"dropping {_NAMES.get(cap, cap)} from the bounding set")
    else:
        report.warnings.append(
            "capability bounding set left as it was: emptying it needs CAP_SETPCAP at start-up "
            "(no_new_privs still stops execve from granting any capability)")
    report.bounding = _mask(c for c in range(last + 1) if _prctl(_PR_CAPBSET_READ, c) == 1)
    _check(_prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL), "clearing the ambient set")
    _capset(keep, keep, 0)
    _check(_prctl(_PR_SET_NO_NEW_PRIVS, 1), "setting no_new_privs")
    for tid in os.listdir("/proc/self/task"):
        try:
            got = thread_capabilities(Path(f"/proc/self/task/{tid}/status"))
        except (FileNotFoundError, ProcessLookupError):  # it ended while we looked
            continue
        if (got.effective, got.permitted, got.inheritable, got.ambient) != (keep, keep, 0, 0):
            raise PrivilegeError(f"thread {tid} still holds {names(got.permitted)} after the drop")
    return report


def plan(permitted: int, *, user_stacks: bool, map_access_needs_cap_bpf: bool
         ) -> tuple[int, list[str]]:
    """The capabilities to keep for the rest of the edge's life (a mask within
    ``permitted``), and one line for each feature that is off for want of one.

    ``user_stacks``: a loaded program symbolizes user stacks (CAP_SYS_PTRACE, when held).
    ``map_access_needs_cap_bpf``: :func:`map_access_needs_cap_bpf`'s answer; then CAP_BPF,
    or CAP_SYS_ADMIN on a kernel older than CAP_BPF (5.8), whichever loaded the programs.
    """
    keep = 0
    lines: list[str] = []
    if map_access_needs_cap_bpf:
        keep |= 1 << (CAP_BPF if permitted >> CAP_BPF & 1 else CAP_SYS_ADMIN)
    if user_stacks:
        if permitted >> CAP_SYS_PTRACE & 1:
            keep |= 1 << CAP_SYS_PTRACE
        else:
            lines.append(
                "profile: other processes' user stacks show as [unknown]: reading their "
                "/proc/PID/maps needs CAP_SYS_PTRACE, which this edge was not given (grant it "
                "to name them; the edge then keeps it)")
    return keep & permitted, lines


def drop_after_load(*, user_stacks: bool) -> DropReport:
    """Drop to what the loaded programs need for the rest of the edge's life (:func:`plan`),
    and say so: a warning line for each feature that is off, one info line for what is kept.
    """
    _only_thread()  # before the probe's fork, too
    _, permitted, _ = _capget()
    keep, lines = plan(permitted, user_stacks=user_stacks,
                       map_access_needs_cap_bpf=map_access_needs_cap_bpf())
    report = drop(keep)
    for line in [*lines, *report.warnings]:
        log.warning("%s", line)
    log.info("capabilities after start-up: %s; no_new_privs set",
             ", ".join(names(report.kept)) or "none")
    return report
