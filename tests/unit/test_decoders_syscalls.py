"""Tests for edge.decoders.syscalls: exact numbers from the Linux 6.1 UAPI tables."""

from __future__ import annotations

import platform

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stratoscope.edge.decoders import syscalls
from stratoscope.edge.decoders._syscall_tables import AARCH64, X86_64
from stratoscope.edge.decoders.syscalls import (
    SUPPORTED_ARCHES,
    normalize_arch,
    syscall_name,
    syscall_number,
)


@pytest.mark.parametrize(
    ("nr", "arch", "name"),
    [
        (0, "x86_64", "read"),
        (1, "x86_64", "write"),
        (39, "x86_64", "getpid"),
        (59, "x86_64", "execve"),
        (110, "x86_64", "getppid"),
        (257, "x86_64", "openat"),
        (262, "x86_64", "newfstatat"),
        (321, "x86_64", "bpf"),
        (334, "x86_64", "rseq"),
        (435, "x86_64", "clone3"),
        (450, "x86_64", "set_mempolicy_home_node"),
        (25, "aarch64", "fcntl"),
        (56, "aarch64", "openat"),
        (62, "aarch64", "lseek"),
        (63, "aarch64", "read"),
        (64, "aarch64", "write"),
        (79, "aarch64", "newfstatat"),
        (80, "aarch64", "fstat"),
        (163, "aarch64", "getrlimit"),
        (172, "aarch64", "getpid"),
        (173, "aarch64", "getppid"),
        (221, "aarch64", "execve"),
        (222, "aarch64", "mmap"),
        (280, "aarch64", "bpf"),
        (435, "aarch64", "clone3"),
        (447, "aarch64", "memfd_secret"),
        (450, "aarch64", "set_mempolicy_home_node"),
    ],
)
def test_known_numbers(nr: int, arch: str, name: str) -> None:
    assert syscall_name(nr, arch) == name
    assert syscall_number(name, arch) == nr


def test_table_shapes_match_generated_headers() -> None:
    # Pin the generated data: 6.1 has 451 slots, x86_64 leaves 335..386 to x32, and the
    # asm-generic 64-bit table omits the 32-bit-only time64 calls (403..423) and the
    # arch-private range 244..259 (unused by arm64).
    assert len(X86_64) == 362
    assert len(AARCH64) == 306
    assert max(X86_64) == max(AARCH64) == 450
    assert not set(range(335, 387)) & set(X86_64)
    assert not set(range(403, 424)) & set(AARCH64)
    assert not set(range(244, 260)) & set(AARCH64)
    assert len(set(X86_64.values())) == len(X86_64)
    assert len(set(AARCH64.values())) == len(AARCH64)


def test_aarch64_has_no_legacy_syscalls() -> None:
    for legacy in ("open", "stat", "fork", "pipe", "poll", "select", "access"):
        with pytest.raises(ValueError, match=legacy):
            syscall_number(legacy, "aarch64")
    assert syscall_number("open", "x86_64") == 2


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("x86_64", "x86_64"),
        ("amd64", "x86_64"),
        ("AMD64", "x86_64"),
        ("aarch64", "aarch64"),
        ("arm64", "aarch64"),
        (" ARM64 ", "aarch64"),
    ],
)
def test_arch_aliases(alias: str, canonical: str) -> None:
    assert normalize_arch(alias) == canonical
    assert syscall_name(257 if canonical == "x86_64" else 56, alias) == "openat"


def test_supported_arches() -> None:
    assert frozenset({"x86_64", "aarch64"}) == SUPPORTED_ARCHES


def test_default_arch_is_this_machine() -> None:
    assert normalize_arch(None) == normalize_arch(platform.machine())
    assert syscall_name(39) == syscall_name(39, platform.machine())


def test_default_arch_follows_platform_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syscalls.platform, "machine", lambda: "aarch64")
    assert syscall_name(56) == "openat"
    assert syscall_number("getppid") == 173
    monkeypatch.setattr(syscalls.platform, "machine", lambda: "x86_64")
    assert syscall_name(56) == "clone"
    assert syscall_number("getppid") == 110


@pytest.mark.parametrize("arch", ["riscv64", "i386", "", "armv7l"])
def test_unknown_arch_raises_naming_it(arch: str) -> None:
    with pytest.raises(ValueError, match=f"unsupported architecture '{arch}'"):
        syscall_name(1, arch)
    with pytest.raises(ValueError, match=f"unsupported architecture '{arch}'"):
        syscall_number("read", arch)


def test_unknown_arch_from_platform_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syscalls.platform, "machine", lambda: "s390x")
    with pytest.raises(ValueError, match="'s390x'"):
        syscall_name(1)


def test_unknown_numbers_are_labelled_not_raised() -> None:
    assert syscall_name(999, "x86_64") == "sys_999"
    assert syscall_name(340, "x86_64") == "sys_340"  # x32 range
    assert syscall_name(250, "aarch64") == "sys_250"  # arch-private range, unused by arm64
    assert syscall_name(-1, "x86_64") == "sys_-1"


def test_syscall_number_accepts_labels() -> None:
    assert syscall_number("sys_openat", "x86_64") == 257
    assert syscall_number("sys_999", "x86_64") == 999
    assert syscall_number("sys_-1", "aarch64") == -1


@pytest.mark.parametrize("bad", ["nosuchcall", "sys_", "sys_nosuch", "sys_12a", "", "sys_--1"])
def test_syscall_number_rejects_unknown_names(bad: str) -> None:
    with pytest.raises(ValueError, match="unknown syscall"):
        syscall_number(bad, "x86_64")


@given(st.sampled_from(sorted(X86_64.items())))
def test_x86_64_name_number_round_trip(item: tuple[int, str]) -> None:
    nr, name = item
    assert syscall_number(syscall_name(nr, "x86_64"), "x86_64") == nr
    assert syscall_name(syscall_number(name, "amd64"), "amd64") == name


@given(st.sampled_from(sorted(AARCH64.items())))
def test_aarch64_name_number_round_trip(item: tuple[int, str]) -> None:
    nr, name = item
    assert syscall_number(syscall_name(nr, "aarch64"), "aarch64") == nr
    assert syscall_name(syscall_number(name, "arm64"), "arm64") == name


@given(st.sampled_from(["x86_64", "aarch64"]), st.integers(min_value=-(2**63), max_value=2**64))
def test_every_label_round_trips(arch: str, nr: int) -> None:
    assert syscall_number(syscall_name(nr, arch), arch) == nr
