"""User-space address -> function name, for user stacks captured by BPF.

``bpf_get_stack(..., BPF_F_USER_STACK)`` records virtual addresses in the sampled process. To
name them we need that process's memory map (``/proc/<pid>/maps``: which file is mapped where,
at which file offset) and the symbol tables of the mapped ELF files. Position-independent
executables and shared objects are loaded at random bases, so an address is first turned into
a file offset, then into the ELF's own virtual address via its ``PT_LOAD`` program headers, and
only then looked up in ``.symtab``/``.dynsym``.

Everything here runs on data we do not control (processes exit mid-lookup, files are replaced,
containers have their own filesystems, binaries can be malformed), so lookups never raise; they
degrade to ``"module+0xoffset"`` or ``"[unknown]"``. Caches are LRU-bounded because the collector
is long-lived and sees an unbounded stream of pids and binaries.
"""

from __future__ import annotations

import bisect
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

__all__ = ["UNKNOWN", "UserSymbols"]

_log = logging.getLogger(__name__)

UNKNOWN: Final = "[unknown]"
_DELETED_SUFFIX: Final = " (deleted)"
# How many preceding symbols to check when the nearest one does not cover the address; handles
# nested/overlapping symbols (e.g. a cold part placed inside a bigger symbol's range).
_OVERLAP_LOOKBACK: Final = 8


@dataclass(frozen=True, slots=True)
class _Mapping:
    """One line of /proc/<pid>/maps."""

    start: int
    end: int
    offset: int
    inode: int
    path: str  # "" for anonymous memory, "[vdso]"-style for kernel pseudo-mappings


@dataclass(frozen=True, slots=True)
class _ProcessMaps:
    """A pid's mappings sorted by start address, plus when they were read."""

    starts: list[int]
    mappings: list[_Mapping]
    loaded_at: float

    def find(self, addr: int) -> _Mapping | None:
        idx = bisect.bisect_right(self.starts, addr) - 1
        if idx < 0:
            return None
        mapping = self.mappings[idx]
        return mapping if addr < mapping.end else None


@dataclass(frozen=True, slots=True)
class _ElfSymbols:
    """The parts of one ELF file needed to symbolize: PT_LOAD layout and function symbols."""

    segments: tuple[tuple[int, int, int], ...]  # (p_offset, p_filesz, p_vaddr)
    # Compact on purpose: a large library has 100k+ symbols, and Python ints and
    # strs per symbol cost tens of MB; numpy columns and one blob cost a few.
    starts: npt.NDArray[np.uint64]
    ends: npt.NDArray[np.uint64]  # exclusive; == start + 1 for size-0 symbols (exact match only)
    name_blob: bytes
    name_offsets: npt.NDArray[np.uint32]  # name j is name_blob[offsets[j]:offsets[j + 1]]

    @staticmethod
    def build(
        segments: tuple[tuple[int, int, int], ...], ordered: list[tuple[int, int, str]]
    ) -> _ElfSymbols:
        """From (start, size, name) sorted by start."""
        encoded = [name.encode() for _, _, name in ordered]
        offsets = np.zeros(len(encoded) + 1, dtype=np.uint32)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return _ElfSymbols(
            segments=segments,
            starts=np.asarray([s for s, _, _ in ordered], dtype=np.uint64),
            ends=np.asarray([s + max(size, 1) for s, size, _ in ordered], dtype=np.uint64),
            name_blob=b"".join(encoded),
            name_offsets=offsets,
        )

    def name(self, j: int) -> str:
        return self.name_blob[self.name_offsets[j] : self.name_offsets[j + 1]].decode(
            errors="replace"
        )

    def vaddr_for_offset(self, file_offset: int) -> int | None:
        """Translate a file offset into the ELF's link-time virtual address."""
        for p_offset, p_filesz, p_vaddr in self.segments:
            if p_offset <= file_offset < p_offset + p_filesz:
                return file_offset - p_offset + p_vaddr
        return None

    def lookup(self, vaddr: int) -> str | None:
        """Name of the function symbol whose [start, end) range holds ``vaddr``."""
        if vaddr < 0:
            return None
        if vaddr >= 2**64:
            idx = len(self.starts) - 1
        else:
            idx = int(np.searchsorted(self.starts, np.uint64(vaddr), side="right")) - 1
        for j in range(idx, max(idx - _OVERLAP_LOOKBACK, -1), -1):
            if vaddr < int(self.ends[j]):
                return self.name(j)
        return None


_EMPTY_ELF: Final = _ElfSymbols.build((), [])


def _symbol_preference(is_local: int, name: str, table_rank: int) -> tuple[int, int, int]:
    """Sort key choosing one name among aliases at one address (lower is better).

    Prefer exported names (``getpid`` over a local ``__GI___getpid``), then the least
    underscored spelling, then ``.symtab`` over ``.dynsym``: the name a person would recognise.
    """
    return (is_local, len(name) - len(name.lstrip("_")), table_rank)


_STT_FUNC, _STT_GNU_IFUNC, _STB_LOCAL = 2, 10, 0


def _function_symbols(
    data: bytes, strtab: bytes, elfclass: int, little_endian: bool
) -> Iterator[tuple[int, int, int, str]]:
    """(value, size, is_local, name) of the defined function symbols of a symbol table.

    Reads the table as one numpy record array: pyelftools parses symbols one by
    one through `construct`, ~175 us each, so a 80k-symbol library took 14 s.
    """
    end = "<" if little_endian else ">"
    if elfclass == 64:
        dtype = np.dtype([("name", end + "u4"), ("info", "u1"), ("other", "u1"),
                          ("shndx", end + "u2"), ("value", end + "u8"), ("size", end + "u8")])
    else:
        dtype = np.dtype([("name", end + "u4"), ("value", end + "u4"), ("size", end + "u4"),
                          ("info", "u1"), ("other", "u1"), ("shndx", end + "u2")])
    n = len(data) // dtype.itemsize
    syms = np.frombuffer(data, dtype=dtype, count=n)
    kind = syms["info"] & 0xF
    keep = ((kind == _STT_FUNC) | (kind == _STT_GNU_IFUNC)) & (syms["shndx"] != 0) & (
        syms["value"] != 0
    ) & (syms["name"] != 0)
    for name_off, value, size, info in zip(
        syms["name"][keep].tolist(), syms["value"][keep].tolist(), syms["size"][keep].tolist(),
        syms["info"][keep].tolist(), strict=True,
    ):
        stop = strtab.find(b"\0", name_off)
        name = strtab[name_off : stop if stop >= 0 else len(strtab)].decode(errors="replace")
        if name:
            yield value, size, int((info >> 4) == _STB_LOCAL), name


def _load_elf(path: str) -> _ElfSymbols:
    """Parse ``path`` into an :class:`_ElfSymbols`; any failure gives an empty table.

    The broad ``except`` is deliberate: pyelftools raises a variety of exception types on
    truncated or hostile files, and one bad binary must not stop symbolization of the rest.
    """
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            segments = tuple(
                sorted(
                    (seg["p_offset"], seg["p_filesz"], seg["p_vaddr"])
                    for seg in elf.iter_segments()
                    if seg["p_type"] == "PT_LOAD"
                )
            )
            best: dict[int, tuple[tuple[int, int, int], str, int]] = {}
            for rank, section_name in enumerate((".symtab", ".dynsym")):
                section = elf.get_section_by_name(section_name)
                if not isinstance(section, SymbolTableSection):
                    continue
                strtab = elf.get_section(section["sh_link"]).data()
                for value, size, bind_local, name in _function_symbols(
                    section.data(), strtab, elf.elfclass, elf.little_endian
                ):
                    pref = _symbol_preference(bind_local, name, rank)
                    current = best.get(value)
                    if current is None:
                        best[value] = (pref, name, size)
                    elif pref < current[0]:
                        best[value] = (pref, name, max(size, current[2]))
                    elif size > current[2]:
                        best[value] = (current[0], current[1], size)
    except Exception as exc:  # broad on purpose, see docstring
        _log.debug("cannot read ELF symbols from %s: %s", path, exc)
        return _EMPTY_ELF
    return _ElfSymbols.build(
        segments, [(start, size, name) for start, (_, name, size) in sorted(best.items())]
    )


def _parse_maps(text: str, loaded_at: float) -> _ProcessMaps:
    """Parse /proc/<pid>/maps text; malformed lines are skipped."""
    mappings: list[_Mapping] = []
    for line in text.splitlines():
        # "start-end perms offset dev inode [path]" -- path may contain spaces.
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        try:
            start_s, end_s = fields[0].split("-", 1)
            mappings.append(
                _Mapping(
                    start=int(start_s, 16),
                    end=int(end_s, 16),
                    offset=int(fields[2], 16),
                    inode=int(fields[4]),
                    path=fields[5].strip() if len(fields) > 5 else "",
                )
            )
        except ValueError:
            continue
    mappings.sort(key=lambda m: m.start)
    return _ProcessMaps([m.start for m in mappings], mappings, loaded_at)


def _module_label(path: str, offset: int) -> str:
    name = os.path.basename(path.removesuffix(_DELETED_SUFFIX)) or path
    return f"{name}+0x{offset:x}"


class UserSymbols:
    """Resolve ``(pid, address)`` pairs from user stacks to function names.

    Caches, both LRU: each pid's parsed maps (``max_pids``), and each ELF file's symbol table
    keyed by (device, inode, size, mtime) rather than path, so one library shared by many
    processes or containers is parsed once and a replaced binary is re-read (``max_elf_files``).
    A pid's maps are re-read when an address falls outside every cached mapping (a new
    ``dlopen``), at most once per ``refresh_interval`` seconds; call :meth:`forget` when a
    process exits so a recycled pid is not resolved with its predecessor's maps.
    """

    def __init__(
        self,
        proc_root: str | Path = "/proc",
        *,
        max_pids: int = 4096,
        max_elf_files: int = 256,
        refresh_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create a resolver reading process information under ``proc_root``.

        ``proc_root`` is configurable so a collector running in a container can point at the
        host's procfs (e.g. ``/host/proc``) and tests can use a fixture tree.
        """
        if max_pids < 1 or max_elf_files < 1:
            raise ValueError("cache sizes must be at least 1")
        self._proc_root = Path(proc_root)
        self._max_pids = max_pids
        self._max_elf_files = max_elf_files
        self._refresh_interval = refresh_interval
        self._clock = clock
        self._maps: OrderedDict[int, _ProcessMaps] = OrderedDict()
        self._elfs: OrderedDict[tuple[int, int, int, int], _ElfSymbols] = OrderedDict()

    def resolve(self, pid: int, addr: int) -> str:
        """Return the function name for ``addr`` in process ``pid``.

        Falls back to ``"<module>+0x<offset>"`` when the address is inside a file mapping but no
        symbol covers it (stripped binary, unreadable file, PLT stub); the offset is the ELF
        virtual address when the file's program headers could be read (what ``addr2line -e
        <module>`` expects) and the file offset otherwise. Kernel pseudo-mappings give e.g.
        ``"[vdso]+0x..."`` relative to the mapping start. ``"[unknown]"`` means no file mapping
        holds the address (anonymous/JIT memory, or the process is gone).
        """
        if pid <= 0 or addr < 0:
            return UNKNOWN
        maps = self._maps_for(pid)
        mapping = maps.find(addr) if maps is not None else None
        if mapping is None and maps is not None and self._stale(maps):
            maps = self._load_maps(pid)
            mapping = maps.find(addr) if maps is not None else None
        if mapping is None or not mapping.path:
            return UNKNOWN
        if not mapping.path.startswith("/"):
            # "[vdso]", "[heap]", "anon_inode:..." -- nothing on disk to read symbols from.
            return f"{mapping.path}+0x{addr - mapping.start:x}"
        file_offset = addr - mapping.start + mapping.offset
        elf = self._elf_for(pid, mapping)
        vaddr = elf.vaddr_for_offset(file_offset) if elf is not None else None
        if elf is None or vaddr is None:
            return _module_label(mapping.path, file_offset)
        name = elf.lookup(vaddr)
        return name if name is not None else _module_label(mapping.path, vaddr)

    def refresh(self, pid: int) -> None:
        """Re-read ``pid``'s maps now, e.g. after an mmap/exec event for it."""
        self._maps.pop(pid, None)
        self._load_maps(pid)

    def forget(self, pid: int) -> None:
        """Drop cached maps for ``pid`` (call on process exit; pids get recycled)."""
        self._maps.pop(pid, None)

    # -- internals ----------------------------------------------------------------------------

    def _stale(self, maps: _ProcessMaps) -> bool:
        return self._clock() - maps.loaded_at >= self._refresh_interval

    def _maps_for(self, pid: int) -> _ProcessMaps | None:
        cached = self._maps.get(pid)
        if cached is not None:
            self._maps.move_to_end(pid)
            return cached
        return self._load_maps(pid)

    def _load_maps(self, pid: int) -> _ProcessMaps | None:
        try:
            text = (self._proc_root / str(pid) / "maps").read_text(
                encoding="utf-8", errors="surrogateescape"
            )
        except OSError:
            # Gone or not ours; not cached so a pid that appears later is still resolvable.
            self._maps.pop(pid, None)
            return None
        maps = _parse_maps(text, self._clock())
        self._maps[pid] = maps
        self._maps.move_to_end(pid)
        while len(self._maps) > self._max_pids:
            self._maps.popitem(last=False)
        return maps

    def _candidate_files(self, pid: int, mapping: _Mapping) -> Iterator[tuple[str, bool]]:
        """Where the mapped file can be opened, best first, with "verify inode" flags.

        1. ``/proc/<pid>/root/<path>``: the path as the process sees it (container mount
           namespaces), trusted as-is (a ptrace read check, like ``maps``: CAP_SYS_PTRACE
           for other users' processes, edge/privileges.py).
        2. ``/proc/<pid>/map_files/<start>-<end>``: the exact mapped file, even if deleted or
           replaced since (needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE, which the edge
           holds only until it drops its capabilities after start-up).
        3. ``<path>`` in our own namespace: only if its inode matches the mapping's, because in
           a container the same path may name an entirely different file on the host.
        """
        deleted = mapping.path.endswith(_DELETED_SUFFIX)
        proc = self._proc_root / str(pid)
        if not deleted:
            yield f"{proc}/root{mapping.path}", False
        yield f"{proc}/map_files/{mapping.start:x}-{mapping.end:x}", False
        if not deleted:
            yield mapping.path, True

    def _elf_for(self, pid: int, mapping: _Mapping) -> _ElfSymbols | None:
        for candidate, verify_inode in self._candidate_files(pid, mapping):
            try:
                st = os.stat(candidate)
            except (OSError, ValueError):  # ValueError: embedded NUL in a hostile path
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if verify_inode and mapping.inode and st.st_ino != mapping.inode:
                continue
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._elfs.get(key)
            if cached is not None:
                self._elfs.move_to_end(key)
                return cached
            parsed = _load_elf(candidate)
            self._elfs[key] = parsed
            while len(self._elfs) > self._max_elf_files:
                self._elfs.popitem(last=False)
            return parsed
        return None
