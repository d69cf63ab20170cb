"""Give the compiler's pages back to the operating system.

Compiling BPF programs (LLVM) and parsing symbol tables also leave large freed
regions in glibc's heap: stratoscope/heap.py returns those.

Compiling also pages in ~80 MB of the compiler's own code (libLLVM and
libclang-cpp, file-backed), which stays resident, and counted in the
collector's RSS, although nothing runs it again once the programs are loaded.
``release_compiler_pages`` drops them from the collector's page tables: the
code (r-xp: clean file pages, never written) with MADV_DONTNEED, which works
even while another process maps the same library; everything else of those
libraries with MADV_PAGEOUT (Linux 5.4+), which only reclaims what nothing else
maps and never discards a written page. Either way a page the compiler needs
again simply faults back in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from pathlib import Path

MADV_DONTNEED = 4
MADV_PAGEOUT = 21
#: Shared objects that only the BPF compiler runs.
_COMPILER_LIBS = re.compile(r"/lib(LLVM|clang|clang-cpp)[-.][^/]*$")
_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s+(\S.*)$")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def compiler_mappings(maps_text: str) -> list[tuple[int, int, bool]]:
    """(start, length, is code) of every mapping of a compiler library in a
    /proc/PID/maps text; code is r-xp (read-only, executable, private)."""
    out = []
    for line in maps_text.splitlines():
        m = _MAPS_LINE.match(line)
        if m and _COMPILER_LIBS.search(m.group(4)):
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            out.append((start, end - start, m.group(3) == "r-xp"))
    return out


def release_compiler_pages(maps_path: Path = Path("/proc/self/maps")) -> int:
    """Reclaim the compiler libraries' resident pages; returns the bytes advised.

    Errors (an older kernel without MADV_PAGEOUT, no libc) leave memory as it
    was: this only lowers RSS, nothing depends on it.
    """
    libc = _libc()
    if libc is None:
        return 0
    try:
        regions = compiler_mappings(maps_path.read_text())
    except OSError:
        return 0
    advised = 0
    for start, length, code in regions:
        advice = MADV_DONTNEED if code else MADV_PAGEOUT
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), advice) == 0:
            advised += length
    return advised


