"""cgroup v2 id -> cgroup path, and cgroup path -> container id.

``bpf_get_current_cgroup_id()`` returns the kernfs id of the task's cgroup in the v2 (default)
hierarchy, which is also the inode number of that cgroup's directory under the cgroup2 mount.
The kernel cannot give us the path cheaply from BPF, so user space inverts the mapping by walking
the cgroup2 tree and caching ``inode -> path``. Paths are what operators recognise
("/system.slice/nginx.service") and what container ids are parsed from.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

__all__ = ["CgroupResolver", "find_cgroup2_mount"]

_log = logging.getLogger(__name__)

_MOUNTINFO: Final = "/proc/self/mountinfo"
_OCTAL_ESCAPE: Final = re.compile(r"\\([0-7]{3})")

# Runtime-named leaf cgroups (systemd cgroup driver): docker-<id>.scope, cri-containerd-<id>.scope,
# crio-<id>.scope, libpod-<id>.scope. ``crio-conmon-<id>.scope`` is deliberately not matched:
# it holds the conmon monitor, not the container's processes.
_SCOPE_RE: Final = re.compile(r"^(?:docker|cri-containerd|crio|libpod)-([0-9a-fA-F]{12,})\.scope$")
# A bare id directory (cgroupfs driver): /docker/<id>, /kubepods/<qos>/pod<uid>/<id>.
_BARE_ID_RE: Final = re.compile(r"^[0-9a-fA-F]{12,}$")
# Parents under which a bare hex directory name is a container id.
_BARE_ID_PARENTS: Final = frozenset({"docker", "kubepods"})


def _unescape_mountinfo(field: str) -> str:
    """Undo the kernel's octal escaping of space, tab, newline and backslash in mountinfo."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def find_cgroup2_mount(mountinfo: str | Path = _MOUNTINFO) -> Path | None:
    """Return the first cgroup2 mount point listed in ``mountinfo``, or ``None``.

    The location differs between pure v2 hosts (``/sys/fs/cgroup``) and hybrid v1/v2 hosts
    (``/sys/fs/cgroup/unified``), and containers may mount it elsewhere, so it is read from the
    mount table instead of being assumed.
    """
    try:
        text = Path(mountinfo).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return None
    for line in text.splitlines():
        # "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> ..."
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        fstype = right.split(maxsplit=1)[0] if right else ""
        if fstype == "cgroup2":
            return Path(_unescape_mountinfo(fields[4]))
    return None


class CgroupResolver:
    """Resolve cgroup v2 ids to paths relative to the cgroup2 mount, e.g. ``"/system.slice"``.

    The tree is walked lazily: nothing is read until the first lookup, and a cache miss triggers
    a full rescan at most once per ``min_rescan_interval`` seconds so that a flood of events from
    an unknown (e.g. already deleted) cgroup cannot turn into a flood of directory walks. Ids that
    stay unknown are reported as ``"cgroup:<id>"``, which keeps the raw id visible.

    Each rescan replaces the cache, so ids of deleted cgroups do not accumulate forever on hosts
    with container churn; entries that disappeared are kept for one more scan generation so that
    events still in flight for a just-exited container resolve to its real path.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        min_rescan_interval: float = 1.0,
        mountinfo: str | Path = _MOUNTINFO,
    ) -> None:
        """Create a resolver for the cgroup2 tree at ``root``.

        ``root=None`` finds the cgroup2 mount in ``mountinfo``. If there is none (cgroup v1-only
        host) the resolver still works but resolves every id to ``"cgroup:<id>"``, because a
        missing label is better than a collector that refuses to start. ``clock`` is injectable
        so rate limiting can be tested without sleeping.
        """
        if root is None:
            root = find_cgroup2_mount(mountinfo)
            if root is None:
                _log.warning("no cgroup2 mount in %s; cgroup ids will not be resolved", mountinfo)
        self._root: Path | None = None if root is None else Path(root)
        self._clock = clock
        self._min_rescan_interval = min_rescan_interval
        self._last_scan: float | None = None
        self._paths: dict[int, str] = {}
        self._recently_gone: dict[int, str] = {}

    @property
    def root(self) -> Path | None:
        """The cgroup2 mount point being resolved against (``None`` if there is none)."""
        return self._root

    def path(self, cgroup_id: int) -> str:
        """Return the path of ``cgroup_id`` relative to the cgroup2 mount ("/" for the root).

        Falls back to ``"cgroup:<id>"`` when the id is not in the tree even after a (rate
        limited) rescan.
        """
        found = self._lookup(cgroup_id)
        if found is None and self._root is not None and self._may_rescan():
            self._rescan(self._root)
            found = self._lookup(cgroup_id)
        return found if found is not None else f"cgroup:{cgroup_id}"

    @staticmethod
    def container_id(path: str) -> str:
        """Extract a container id from a cgroup ``path``; ``""`` when it is not a container.

        Understands the layouts of the common runtimes under both cgroup drivers: systemd-style
        ``docker-<id>.scope``, ``cri-containerd-<id>.scope``, ``crio-<id>.scope``,
        ``libpod-<id>.scope``, and cgroupfs-style ``/docker/<id>`` and ``/kubepods/.../<id>``.
        Ids are hex, at least 12 digits (full ids are 64), returned lower-case. The deepest
        matching component wins so nested runtimes (docker-in-docker, podman's ``/container``
        sub-cgroup) report the innermost container.
        """
        parts = [p for p in path.split("/") if p]
        for i in range(len(parts) - 1, -1, -1):
            part = parts[i]
            match = _SCOPE_RE.match(part)
            if match:
                return match.group(1).lower()
            if _BARE_ID_RE.match(part) and any(p in _BARE_ID_PARENTS for p in parts[:i]):
                return part.lower()
        return ""

    # -- internals ----------------------------------------------------------------------------

    def _lookup(self, cgroup_id: int) -> str | None:
        found = self._paths.get(cgroup_id)
        return found if found is not None else self._recently_gone.get(cgroup_id)

    def _may_rescan(self) -> bool:
        if self._last_scan is None:
            return True
        return self._clock() - self._last_scan >= self._min_rescan_interval

    def _rescan(self, root: Path) -> None:
        self._last_scan = self._clock()
        fresh = _walk(root)
        self._recently_gone = {k: v for k, v in self._paths.items() if k not in fresh}
        self._paths = fresh


def _walk(root: Path) -> dict[int, str]:
    """Map inode -> mount-relative path for every directory under ``root`` (inclusive).

    Uses ``stat`` rather than ``DirEntry.inode()`` because readdir's d_ino is not guaranteed to
    equal st_ino on every filesystem (e.g. overlayfs); on cgroupfs the extra stat is cheap.
    Cgroups vanish concurrently with the walk, so per-directory errors are skipped, not raised.
    """
    out: dict[int, str] = {}
    try:
        out[os.stat(root).st_ino] = "/"
    except OSError:
        return out
    stack: list[tuple[str, str]] = [(os.fspath(root), "")]
    while stack:
        fs_dir, rel_dir = stack.pop()
        try:
            with os.scandir(fs_dir) as entries:
                for entry in entries:
                    try:
                        if not entry.is_dir(follow_symlinks=False):
                            continue
                        ino = entry.stat(follow_symlinks=False).st_ino
                    except OSError:
                        continue
                    rel = f"{rel_dir}/{entry.name}"
                    out[ino] = rel
                    stack.append((entry.path, rel))
        except OSError:
            continue
    return out
