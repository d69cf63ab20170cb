"""Checks that turn a missing prerequisite into one line that names the fix."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from stratoscope.edge.errors import PreflightError

CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


def effective_caps(status: Path = Path("/proc/self/status")) -> int:
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check(tracefs: Path = Path("/sys/kernel/tracing"), modules: Path = Path("/lib/modules")) -> None:
    caps = effective_caps()
    has_bpf = bool(caps & (1 << CAP_BPF)) or bool(caps & (1 << CAP_SYS_ADMIN))
    has_perfmon = bool(caps & (1 << CAP_PERFMON)) or bool(caps & (1 << CAP_SYS_ADMIN))
    if not (has_bpf and has_perfmon):
        raise PreflightError(
            "missing CAP_BPF/CAP_PERFMON: run as root or grant them (with CAP_SYSLOG and "
            "CAP_SETPCAP, used at start-up only: deploy/systemd/stratoscope-edge.service)"
        )
    debug_tracing = Path("/sys/kernel/debug/tracing/events")
    try:
        mounted = (tracefs / "events").is_dir() or debug_tracing.is_dir()
    except PermissionError:
        # tracefs is root-only (0700) unless mounted with gid= and mode=.
        raise PreflightError(
            f"cannot read {tracefs}: run as root, or mount tracefs readable by this "
            f"service's group (`mount -o remount,gid=GROUP,mode=0750 {tracefs}`)"
        ) from None
    if not mounted:
        raise PreflightError(
            f"tracefs is not mounted: run `mount -t tracefs nodev {tracefs}` (scripts/setup.sh does it)"
        )
    build = modules / platform.release() / "build"
    if not build.exists():
        raise PreflightError(
            f"no kernel headers at {build}: install linux-headers-{platform.release()} "
            "or run scripts/setup.sh (it falls back to the nearest headers)"
        )
    if not os.access("/sys/fs/bpf", os.F_OK) and not Path("/sys/kernel/btf/vmlinux").exists():
        raise PreflightError("this kernel exposes neither /sys/fs/bpf nor BTF: BPF is unavailable")
