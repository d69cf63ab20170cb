"""Kernel address -> symbol name, for kernel stacks and kprobe/fentry addresses.

BPF stack maps (``bpf_get_stackid``) and ``PT_REGS_IP`` hand user space raw kernel instruction
addresses; ``/proc/kallsyms`` lists every symbol's start address but no sizes, so an address
belongs to the closest symbol at or below it. The file is large (100k+ lines) and static for the
life of a boot, apart from module loads, so it is parsed once into sorted arrays and each lookup
is a binary search.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from stratoscope.heap import release_free_memory

__all__ = ["UNKNOWN", "KernelSymbols"]

UNKNOWN: Final = "[unknown]"

# Absolute symbols (per-cpu offsets, build constants) are not addresses of code; undefined ones
# have no address. Both would poison the "closest symbol below" search.
_SKIP_TYPES: Final = frozenset("aAuU")
_TEXT_TYPES: Final = frozenset("tTwW")


def _preference(sym_type: str, name: str) -> tuple[int, int, int]:
    """Sort key choosing one name among aliases at the same address (lower is better).

    Prefer code over data, global over local, and the least-underscored spelling, because that
    is the name a human would grep the source for (``_stext``/``_text`` alias real functions).
    """
    is_text = sym_type in _TEXT_TYPES
    is_global = sym_type.isupper()
    return (0 if is_text else 1, 0 if is_global else 1, len(name) - len(name.lstrip("_")))


class KernelSymbols:
    """Resolve kernel addresses using a kallsyms-format file (default ``/proc/kallsyms``).

    The file is read lazily on the first :meth:`resolve` and never again; call :meth:`reload`
    after loading modules (or BPF programs, which appear as ``bpf_prog_*`` symbols) if their
    addresses must resolve. With ``kptr_restrict`` in effect every address reads as zero, in
    which case nothing can be resolved and every lookup returns ``"[unknown]"`` rather than
    attributing everything to one arbitrary symbol.
    """

    def __init__(self, path: str | Path = "/proc/kallsyms") -> None:
        """Remember where to read symbols from; no I/O happens until the first lookup."""
        self._path = Path(path)
        # Compact: ~200k symbols as Python ints and strs would cost tens of MB of RSS.
        self._addrs: npt.NDArray[np.uint64] | None = None
        self._name_blob = b""
        self._name_offsets: npt.NDArray[np.uint32] = np.zeros(1, dtype=np.uint32)

    def reload(self) -> None:
        """(Re)read the symbol file, e.g. after modules were loaded.

        A missing or unreadable file yields an empty table (every lookup ``"[unknown]"``): the
        collector should keep running without kernel symbols rather than crash.
        """
        best: dict[int, tuple[tuple[int, int, int], str]] = {}
        try:
            with self._path.open(encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    fields = line.split()
                    if len(fields) < 3 or fields[1] in _SKIP_TYPES:
                        continue
                    try:
                        addr = int(fields[0], 16)
                    except ValueError:
                        continue
                    if addr == 0:
                        continue  # hidden by kptr_restrict, or genuinely not an address
                    pref = _preference(fields[1], fields[2])
                    current = best.get(addr)
                    if current is None or pref < current[0]:
                        best[addr] = (pref, fields[2])
        except OSError:
            best = {}
        ordered = sorted(best.items())
        del best
        encoded = [name.encode() for _, (_, name) in ordered]
        offsets = np.zeros(len(encoded) + 1, dtype=np.uint32)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        self._addrs = np.asarray([addr for addr, _ in ordered], dtype=np.uint64)
        self._name_blob = b"".join(encoded)
        self._name_offsets = offsets
        del ordered, encoded
        release_free_memory()  # the parse's transient objects, back to the OS

    def _loaded(self) -> npt.NDArray[np.uint64]:
        """Sorted symbol addresses, loading the file on first use."""
        if self._addrs is None:
            self.reload()
        assert self._addrs is not None
        return self._addrs

    def __len__(self) -> int:
        """Number of distinct symbol addresses loaded (0 when hidden by kptr_restrict)."""
        return len(self._loaded())

    def resolve(self, addr: int) -> str:
        """Return the name of the symbol containing ``addr``, or ``"[unknown]"``.

        "Containing" means the nearest symbol starting at or below ``addr``; kallsyms carries no
        sizes, so an address past the end of the last function still maps to it. Addresses
        below the first symbol, ``0``, and lookups against a zeroed (restricted) file are
        ``"[unknown]"``.
        """
        addrs = self._loaded()
        if not len(addrs) or addr <= 0:
            return UNKNOWN
        if addr >= 2**64:  # past every address: the last symbol, as for any address past it
            idx = len(addrs) - 1
        else:
            idx = int(np.searchsorted(addrs, np.uint64(addr), side="right")) - 1
        if idx < 0:
            return UNKNOWN
        lo, hi = int(self._name_offsets[idx]), int(self._name_offsets[idx + 1])
        return self._name_blob[lo:hi].decode(errors="replace")
