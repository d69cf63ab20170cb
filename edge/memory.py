"""Give freed heap memory back to the operating system.

Compiling BPF programs (LLVM) and parsing symbol tables leave large freed
regions in glibc's heap; without a trim they stay in the collector's RSS for
its whole life. Harmless where malloc_trim does not exist (non-glibc).
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


def release_free_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
