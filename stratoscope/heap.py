"""Give freed heap memory back to the operating system (glibc's malloc_trim).

Why: glibc keeps freed heap memory for reuse, and its mmap threshold rises after
large frees, so a process that builds and frees large temporary arrays (the edge
parsing symbol tables, the regional's frame child reducing a window frame by
frame) keeps its high-water mark resident. A trim returns the free pages.
Harmless where malloc_trim does not exist (non-glibc).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def prepare() -> bool:
    """Look malloc_trim up now (find_library may run ldconfig: do it before a fork,
    never in a forked child); whether it exists."""
    return _malloc_trim() is not None


def release_free_memory() -> None:
    """Return the heap's free pages to the operating system (malloc_trim(0))."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
