"""The compiler's mappings are picked out of /proc/PID/maps by library name."""

from __future__ import annotations

from pathlib import Path

from stratoscope.edge.memory import compiler_mappings, release_compiler_pages

MAPS = """\
7f0000000000-7f0000100000 r--p 00000000 fe:01 123 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f0000100000-7f0000400000 r-xp 00100000 fe:01 123 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f0001000000-7f0001200000 r-xp 00000000 fe:01 124 /usr/lib/x86_64-linux-gnu/libclang-cpp.so.14
7f0002000000-7f0002100000 r-xp 00000000 fe:01 125 /usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0
7f0003000000-7f0003100000 rw-p 00000000 00:00 0
7f0004000000-7f0004001000 r-xp 00000000 fe:01 126 /opt/libLLVMish/libc.so.6
"""


def test_only_llvm_and_clang_libraries_are_picked() -> None:
    assert compiler_mappings(MAPS) == [
        (0x7F0000000000, 0x100000, False), (0x7F0000100000, 0x300000, True),
        (0x7F0001000000, 0x200000, True),
    ]


def test_a_process_without_the_compiler_advises_nothing(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f0003000000-7f0003100000 rw-p 00000000 00:00 0\n")
    assert release_compiler_pages(maps) == 0
    assert release_compiler_pages(tmp_path / "missing") == 0
