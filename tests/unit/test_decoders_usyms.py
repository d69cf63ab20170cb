"""Tests for edge.decoders.usyms: real child processes built with gcc, plus fixture /proc trees."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from stratoscope.edge.decoders.usyms import UNKNOWN, UserSymbols

LIB_SOURCE = r"""
void burn_in_lib(void) {
    volatile unsigned long x = 0;
    for (int i = 0; i < 1000; i++) x += i;
}
"""

PROG_SOURCE = r"""
#include <stdio.h>
#include <unistd.h>

extern void burn_in_lib(void);

void burn_cpu_here(void) {
    volatile unsigned long x = 0;
    for (int i = 0; i < 1000; i++) x += i;
}

int main(void) {
    printf("%p\n", (void *)burn_cpu_here);
    printf("%p\n", (void *)getpid);
    printf("%p\n", (void *)burn_in_lib);
    fflush(stdout);
    burn_cpu_here();
    burn_in_lib();
    sleep(600);
    return 0;
}
"""

CFLAGS = ["-O0", "-fno-omit-frame-pointer"]


@dataclass(frozen=True)
class Binaries:
    dir: Path
    prog: Path  # PIE with .symtab
    stripped: Path  # PIE, strip(1)ed: no .symtab, burn_cpu_here not exported
    dynsym_stripped: Path  # PIE built with -rdynamic, then stripped: burn_cpu_here in .dynsym
    nopie: Path  # fixed-address executable: ELF vaddr != file offset
    lib: Path  # shared object holding burn_in_lib


def run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


@pytest.fixture(scope="module")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> Binaries:
    assert shutil.which("gcc"), "gcc is required to build the test programs"
    assert shutil.which("strip"), "strip is required to build the test programs"
    out = tmp_path_factory.mktemp("usyms-bin")
    (out / "lib.c").write_text(LIB_SOURCE)
    (out / "prog.c").write_text(PROG_SOURCE)
    lib = out / "libburn.so"
    run("gcc", *CFLAGS, "-shared", "-fPIC", "-o", lib, out / "lib.c")
    link = [f"-L{out}", "-lburn", f"-Wl,-rpath,{out}"]
    prog = out / "prog"
    run("gcc", *CFLAGS, "-fPIE", "-pie", "-o", prog, out / "prog.c", *link)
    stripped = out / "prog_stripped"
    shutil.copy(prog, stripped)
    run("strip", stripped)
    dynsym_stripped = out / "prog_dynsym_stripped"
    run("gcc", *CFLAGS, "-fPIE", "-pie", "-rdynamic", "-o", dynsym_stripped, out / "prog.c", *link)
    run("strip", dynsym_stripped)
    nopie = out / "prog_nopie"
    run("gcc", *CFLAGS, "-fno-pie", "-no-pie", "-o", nopie, out / "prog.c", *link)
    return Binaries(out, prog, stripped, dynsym_stripped, nopie, lib)


def elf_symbol(path: Path, name: str) -> tuple[int, int]:
    """(st_value, st_size) of ``name`` in ``path``'s .symtab or .dynsym."""
    with open(path, "rb") as fh:
        elf = ELFFile(fh)
        for section_name in (".symtab", ".dynsym"):
            section = elf.get_section_by_name(section_name)
            if not isinstance(section, SymbolTableSection):
                continue
            for sym in section.get_symbol_by_name(name) or []:
                return sym["st_value"], sym["st_size"]
    raise AssertionError(f"{name} not in {path}")


def has_section(path: Path, name: str) -> bool:
    with open(path, "rb") as fh:
        return ELFFile(fh).get_section_by_name(name) is not None


def exec_segment(path: Path) -> tuple[int, int, int]:
    """(p_offset, p_vaddr, p_filesz) of the executable PT_LOAD segment."""
    with open(path, "rb") as fh:
        for seg in ELFFile(fh).iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_flags"] & 1:
                return seg["p_offset"], seg["p_vaddr"], seg["p_filesz"]
    raise AssertionError(f"no executable segment in {path}")


@dataclass(frozen=True)
class Child:
    pid: int
    burn_cpu_here: int
    getpid: int
    burn_in_lib: int


@contextmanager
def child(binary: Path) -> Iterator[Child]:
    proc = subprocess.Popen([str(binary)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        burn, getpid, lib = (int(line, 16) for line in lines)
        yield Child(proc.pid, burn, getpid, lib)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# -- real processes --------------------------------------------------------------------------


def test_pie_function_resolves(binaries: Binaries) -> None:
    value, size = elf_symbol(binaries.prog, "burn_cpu_here")
    main_value, _ = elf_symbol(binaries.prog, "main")
    resolver = UserSymbols()
    with child(binaries.prog) as c:
        bias = c.burn_cpu_here - value
        assert bias != 0  # really loaded at a randomised base
        assert resolver.resolve(c.pid, c.burn_cpu_here) == "burn_cpu_here"
        assert resolver.resolve(c.pid, c.burn_cpu_here + 4) == "burn_cpu_here"
        assert resolver.resolve(c.pid, c.burn_cpu_here + size - 1) == "burn_cpu_here"
        assert resolver.resolve(c.pid, bias + main_value) == "main"


def test_libc_function_resolves(binaries: Binaries) -> None:
    resolver = UserSymbols()
    with child(binaries.prog) as c:
        assert resolver.resolve(c.pid, c.getpid) == "getpid"
        assert resolver.resolve(c.pid, c.getpid + 1) == "getpid"


def test_shared_object_function_resolves(binaries: Binaries) -> None:
    resolver = UserSymbols()
    with child(binaries.prog) as c:
        assert resolver.resolve(c.pid, c.burn_in_lib) == "burn_in_lib"
        assert resolver.resolve(c.pid, c.burn_in_lib + 8) == "burn_in_lib"


def test_stripped_binary_gives_module_plus_offset(binaries: Binaries) -> None:
    assert not has_section(binaries.stripped, ".symtab")
    value, _ = elf_symbol(binaries.prog, "burn_cpu_here")  # strip keeps the layout
    resolver = UserSymbols()
    with child(binaries.stripped) as c:
        assert resolver.resolve(c.pid, c.burn_cpu_here) == f"prog_stripped+0x{value:x}"
        assert resolver.resolve(c.pid, c.burn_cpu_here + 4) == f"prog_stripped+0x{value + 4:x}"
        # Symbols of other objects are unaffected.
        assert resolver.resolve(c.pid, c.getpid) == "getpid"
        assert resolver.resolve(c.pid, c.burn_in_lib) == "burn_in_lib"


def test_stripped_binary_falls_back_to_dynsym(binaries: Binaries) -> None:
    assert not has_section(binaries.dynsym_stripped, ".symtab")
    assert has_section(binaries.dynsym_stripped, ".dynsym")
    resolver = UserSymbols()
    with child(binaries.dynsym_stripped) as c:
        assert resolver.resolve(c.pid, c.burn_cpu_here) == "burn_cpu_here"


def test_non_pie_executable(binaries: Binaries) -> None:
    value, _ = elf_symbol(binaries.nopie, "burn_cpu_here")
    p_offset, p_vaddr, _ = exec_segment(binaries.nopie)
    assert p_vaddr != p_offset  # exercises the PT_LOAD vaddr adjustment
    resolver = UserSymbols()
    with child(binaries.nopie) as c:
        assert c.burn_cpu_here == value  # fixed address, no load bias
        assert resolver.resolve(c.pid, c.burn_cpu_here) == "burn_cpu_here"
        # In a non-PIE program &burn_in_lib is the canonical PLT stub inside the executable; it
        # has no symbol, and the fallback offset is the link-time address (what addr2line wants),
        # which for a fixed-address executable is the runtime address itself.
        assert resolver.resolve(c.pid, c.burn_in_lib) == f"prog_nopie+0x{c.burn_in_lib:x}"


def test_deleted_binary_resolves_via_map_files(binaries: Binaries, tmp_path: Path) -> None:
    doomed = tmp_path / "prog_doomed"
    shutil.copy(binaries.prog, doomed)
    resolver = UserSymbols()
    with child(doomed) as c:
        doomed.unlink()
        maps = Path(f"/proc/{c.pid}/maps").read_text()
        assert f"{doomed} (deleted)" in maps
        assert resolver.resolve(c.pid, c.burn_cpu_here) == "burn_cpu_here"


def test_unmapped_addresses_and_missing_pids(binaries: Binaries) -> None:
    resolver = UserSymbols()
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    with child(binaries.prog) as c:
        assert resolver.resolve(c.pid, 0) == UNKNOWN == "[unknown]"
        assert resolver.resolve(c.pid, 8) == "[unknown]"
        assert resolver.resolve(c.pid, -1) == "[unknown]"
    assert resolver.resolve(pid_max + 1, 0x400000) == "[unknown]"
    assert resolver.resolve(0, 0x400000) == "[unknown]"
    assert resolver.resolve(-5, 0x400000) == "[unknown]"


def test_cached_maps_outlive_the_process_until_forget(binaries: Binaries) -> None:
    resolver = UserSymbols()
    with child(binaries.prog) as c:
        assert resolver.resolve(c.pid, c.burn_cpu_here) == "burn_cpu_here"
    # Events are often symbolized after the process exited; the cached maps still work.
    assert resolver.resolve(c.pid, c.burn_cpu_here) == "burn_cpu_here"
    resolver.forget(c.pid)
    assert resolver.resolve(c.pid, c.burn_cpu_here) == "[unknown]"
    resolver.forget(c.pid)  # idempotent


# -- fixture /proc trees ---------------------------------------------------------------------

BIAS = 0x7F00_0000_0000


def maps_line(start: int, end: int, offset: int, inode: int, path: str, perms: str = "r-xp") -> str:
    return f"{start:x}-{end:x} {perms} {offset:08x} 08:01 {inode}".ljust(73) + f" {path}\n"


def exec_maps_line(binary: Path, path: str, inode: int | None = None) -> str:
    """A maps line mapping ``binary``'s executable segment at BIAS, as ld.so would."""
    p_offset, p_vaddr, p_filesz = exec_segment(binary)
    start = BIAS + (p_vaddr & ~0xFFF)
    end = start + (((p_vaddr & 0xFFF) + p_filesz + 0xFFF) & ~0xFFF)
    ino = os.stat(binary).st_ino if inode is None else inode
    return maps_line(start, end, p_offset & ~0xFFF, ino, path)


def write_maps(proc: Path, pid: int, *lines: str) -> None:
    (proc / str(pid)).mkdir(parents=True, exist_ok=True)
    (proc / str(pid) / "maps").write_text("".join(lines))


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_container_path_read_through_proc_root(binaries: Binaries, tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    in_container = proc / "4242" / "root" / "opt" / "app" / "server"
    in_container.parent.mkdir(parents=True)
    shutil.copy(binaries.prog, in_container)
    assert not Path("/opt/app/server").exists()
    write_maps(proc, 4242, exec_maps_line(in_container, "/opt/app/server"))
    value, _ = elf_symbol(binaries.prog, "burn_cpu_here")
    resolver = UserSymbols(proc)
    assert resolver.resolve(4242, BIAS + value) == "burn_cpu_here"
    assert resolver.resolve(4242, BIAS + value + 3) == "burn_cpu_here"


def test_host_path_fallback_checks_inode(binaries: Binaries, tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    value, _ = elf_symbol(binaries.prog, "burn_cpu_here")
    p_offset, p_vaddr, _ = exec_segment(binaries.prog)
    file_offset = value - p_vaddr + p_offset
    # No /proc/<pid>/root or map_files in the fixture: the host path is used if the inode matches.
    write_maps(proc, 10, exec_maps_line(binaries.prog, str(binaries.prog)))
    # Same path, different inode (a container's file that shadows a host path): not trusted.
    write_maps(proc, 11, exec_maps_line(binaries.prog, str(binaries.prog), inode=1))
    resolver = UserSymbols(proc)
    assert resolver.resolve(10, BIAS + value) == "burn_cpu_here"
    assert resolver.resolve(11, BIAS + value) == f"prog+0x{file_offset:x}"


def test_pseudo_and_anonymous_mappings(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write_maps(
        proc,
        7,
        maps_line(0x1000, 0x2000, 0, 0, "[heap]", "rw-p"),
        maps_line(0x3000, 0x5000, 0, 0, "", "rwxp"),  # anonymous (JIT) memory
        maps_line(0x7000, 0x8000, 0, 0, "[vdso]"),
        maps_line(0x9000, 0xA000, 0, 12, "anon_inode:[perf_event]", "r--s"),
    )
    resolver = UserSymbols(proc)
    assert resolver.resolve(7, 0x1010) == "[heap]+0x10"
    assert resolver.resolve(7, 0x4000) == "[unknown]"
    assert resolver.resolve(7, 0x7ABC) == "[vdso]+0xabc"
    assert resolver.resolve(7, 0x9001) == "anon_inode:[perf_event]+0x1"
    assert resolver.resolve(7, 0x2000) == "[unknown]"  # end is exclusive
    assert resolver.resolve(7, 0x6000) == "[unknown]"  # gap
    assert resolver.resolve(7, 0xFFFF_FFFF) == "[unknown]"


def test_unreadable_and_non_elf_files(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    not_elf = tmp_path / "notelf.bin"
    not_elf.write_bytes(b"definitely not an ELF file\n" * 500)
    truncated = tmp_path / "libtrunc.so"
    truncated.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(20))
    ino_not_elf = os.stat(not_elf).st_ino
    ino_trunc = os.stat(truncated).st_ino
    write_maps(
        proc,
        9,
        maps_line(0x10000, 0x12000, 0x1000, ino_not_elf, str(not_elf)),
        maps_line(0x20000, 0x21000, 0, ino_trunc, str(truncated)),
        maps_line(0x30000, 0x31000, 0x2000, 99, "/nonexistent/dir/libgone.so"),
        maps_line(0x40000, 0x41000, 0, 98, "/nonexistent/libold.so (deleted)"),
        maps_line(0x50000, 0x51000, 0, 97, "/nonexistent/with space/lib x.so"),
    )
    resolver = UserSymbols(proc)
    # Without readable program headers the offset is the file offset.
    assert resolver.resolve(9, 0x10010) == "notelf.bin+0x1010"
    assert resolver.resolve(9, 0x20010) == "libtrunc.so+0x10"
    assert resolver.resolve(9, 0x30004) == "libgone.so+0x2004"
    assert resolver.resolve(9, 0x40004) == "libold.so+0x4"
    assert resolver.resolve(9, 0x50004) == "lib x.so+0x4"


def test_malformed_maps_lines_are_skipped(binaries: Binaries, tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    value, _ = elf_symbol(binaries.prog, "burn_cpu_here")
    write_maps(
        proc,
        5,
        "garbage\n",
        "zzzz-yyyy r-xp 00000000 08:01 1 /bin/x\n",
        "\n",
        exec_maps_line(binaries.prog, str(binaries.prog)),
    )
    assert UserSymbols(proc).resolve(5, BIAS + value) == "burn_cpu_here"


def test_miss_rereads_maps_at_most_once_per_interval(binaries: Binaries, tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    value, _ = elf_symbol(binaries.prog, "burn_cpu_here")
    write_maps(proc, 3, maps_line(0x1000, 0x2000, 0, 0, "[heap]", "rw-p"))
    clock = FakeClock()
    resolver = UserSymbols(proc, clock=clock)
    assert resolver.resolve(3, BIAS + value) == "[unknown]"
    # The process dlopen()s something: the new mapping is only seen after the interval.
    write_maps(
        proc,
        3,
        maps_line(0x1000, 0x2000, 0, 0, "[heap]", "rw-p"),
        exec_maps_line(binaries.prog, str(binaries.prog)),
    )
    clock.now += 0.5
    assert resolver.resolve(3, BIAS + value) == "[unknown]"
    clock.now += 0.5
    assert resolver.resolve(3, BIAS + value) == "burn_cpu_here"


def test_refresh_rereads_immediately(binaries: Binaries, tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    value, _ = elf_symbol(binaries.prog, "burn_cpu_here")
    write_maps(proc, 3, maps_line(0x1000, 0x2000, 0, 0, "[heap]", "rw-p"))
    resolver = UserSymbols(proc, clock=FakeClock())
    assert resolver.resolve(3, BIAS + value) == "[unknown]"
    write_maps(proc, 3, exec_maps_line(binaries.prog, str(binaries.prog)))
    resolver.refresh(3)
    assert resolver.resolve(3, BIAS + value) == "burn_cpu_here"
    resolver.refresh(999)  # unknown pid: no error


def test_pid_cache_is_lru_bounded(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid in range(1, 11):
        write_maps(proc, pid, maps_line(0x1000, 0x2000, 0, 0, "[heap]", "rw-p"))
    resolver = UserSymbols(proc, max_pids=3)
    for pid in range(1, 11):
        assert resolver.resolve(pid, 0x1001) == "[heap]+0x1"
    assert list(resolver._maps) == [8, 9, 10]
    resolver.resolve(8, 0x1001)  # touch: 8 becomes most recent
    resolver.resolve(1, 0x1001)  # evicts 9, the least recently used
    assert list(resolver._maps) == [10, 8, 1]


def test_elf_cache_is_lru_bounded_and_shared(binaries: Binaries, tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    copies = []
    for i in range(4):
        copy = tmp_path / f"copy{i}"
        shutil.copy(binaries.prog, copy)
        copies.append(copy)
    value, _ = elf_symbol(binaries.prog, "burn_cpu_here")
    resolver = UserSymbols(proc, max_elf_files=2)
    for pid, copy in enumerate(copies, start=100):
        write_maps(proc, pid, exec_maps_line(copy, str(copy)))
        assert resolver.resolve(pid, BIAS + value) == "burn_cpu_here"
    assert len(resolver._elfs) == 2
    # Many processes mapping one file share a single parsed symbol table.
    for pid in range(200, 210):
        write_maps(proc, pid, exec_maps_line(copies[3], str(copies[3])))
        assert resolver.resolve(pid, BIAS + value) == "burn_cpu_here"
    assert len(resolver._elfs) == 2


def test_replaced_file_contents_are_reparsed(binaries: Binaries, tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    target = tmp_path / "app"
    target.write_bytes(bytes(0x4000))
    value, _ = elf_symbol(binaries.prog, "burn_cpu_here")
    write_maps(proc, 77, exec_maps_line(binaries.prog, str(target), inode=os.stat(target).st_ino))
    resolver = UserSymbols(proc)
    first = resolver.resolve(77, BIAS + value)
    assert first.startswith("app+0x")
    target.write_bytes(binaries.prog.read_bytes())  # same inode, new contents and size
    os.utime(target, ns=(0, 1_000_000_000))
    assert resolver.resolve(77, BIAS + value) == "burn_cpu_here"


def test_missing_pid_in_fixture_root(tmp_path: Path) -> None:
    resolver = UserSymbols(tmp_path)
    assert resolver.resolve(123, 0x1000) == "[unknown]"
    assert resolver._maps == {}  # failures are not cached


def test_invalid_cache_sizes() -> None:
    with pytest.raises(ValueError, match="cache sizes must be at least 1"):
        UserSymbols(max_pids=0)
    with pytest.raises(ValueError, match="cache sizes must be at least 1"):
        UserSymbols(max_elf_files=0)
