"""What decoders consult outside the process, in one injectable object.

Tests point it at fixture roots; the collector builds one per process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stratoscope.edge.decoders.cgroups import CgroupResolver


@dataclass
class DecodeContext:
    """The cgroup resolver, the /sys root, the syscall table's arch, and a count of
    values no decoder could read."""

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
