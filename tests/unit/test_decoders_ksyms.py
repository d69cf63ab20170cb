"""Tests for edge.decoders.ksyms: fixture kallsyms files plus a smoke test on /proc/kallsyms."""

from __future__ import annotations

import bisect
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stratoscope.edge.decoders.ksyms import UNKNOWN, KernelSymbols

FIXTURE = """\
0000000000000000 A fixed_percpu_data
0000000000001000 A cpu_number
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81000100 t local_helper
ffffffff81000200 T schedule
ffffffff81000300 W weak_fn
ffffffff81000400 D some_data
ffffffff81000400 t __local_alias
ffffffff81000500 U undefined_thing
ffffffffc0a00000 t mod_fn\t[mymod]
ffffffffc0a00080 t bpf_prog_6deef7357e7b4530_sd_fw_ingress\t[bpf]
not-hex T broken
short
"""


@pytest.fixture
def ksyms(tmp_path: Path) -> KernelSymbols:
    path = tmp_path / "kallsyms"
    path.write_text(FIXTURE)
    return KernelSymbols(path)


@pytest.mark.parametrize(
    ("addr", "name"),
    [
        (0xFFFFFFFF81000000, "startup_64"),  # aliases: the un-underscored name wins
        (0xFFFFFFFF81000050, "startup_64"),
        (0xFFFFFFFF810000FF, "startup_64"),
        (0xFFFFFFFF81000100, "local_helper"),
        (0xFFFFFFFF81000150, "local_helper"),
        (0xFFFFFFFF81000200, "schedule"),
        (0xFFFFFFFF810002FF, "schedule"),
        (0xFFFFFFFF81000300, "weak_fn"),
        (0xFFFFFFFF81000400, "__local_alias"),  # code beats data at the same address
        (0xFFFFFFFF81000600, "__local_alias"),  # undefined symbols are not boundaries
        (0xFFFFFFFFC0A00000, "mod_fn"),  # module suffix is not part of the name
        (0xFFFFFFFFC0A0007F, "mod_fn"),
        (0xFFFFFFFFC0A00080, "bpf_prog_6deef7357e7b4530_sd_fw_ingress"),
        (0xFFFFFFFFFFFFFFFF, "bpf_prog_6deef7357e7b4530_sd_fw_ingress"),
    ],
)
def test_resolve_fixture(ksyms: KernelSymbols, addr: int, name: str) -> None:
    assert ksyms.resolve(addr) == name


@pytest.mark.parametrize("addr", [0, -1, 1, 0x1000, 0x1800, 0xFFFFFFFF80FFFFFF])
def test_unknown_below_first_symbol(ksyms: KernelSymbols, addr: int) -> None:
    # Absolute symbols (per-cpu offsets) at 0 and 0x1000 must not capture low addresses.
    assert ksyms.resolve(addr) == UNKNOWN == "[unknown]"


def test_len_counts_distinct_addresses(ksyms: KernelSymbols) -> None:
    assert len(ksyms) == 7


def test_kptr_restrict_zeroed_file(tmp_path: Path) -> None:
    path = tmp_path / "kallsyms"
    path.write_text(
        "0000000000000000 T _stext\n"
        "0000000000000000 T schedule\n"
        "0000000000000000 t mod_fn\t[mymod]\n"
    )
    ksyms = KernelSymbols(path)
    assert len(ksyms) == 0
    for addr in (0, 1, 0xFFFFFFFF81000000, 0xFFFFFFFFFFFFFFFF):
        assert ksyms.resolve(addr) == "[unknown]"


def test_missing_file_does_not_raise(tmp_path: Path) -> None:
    ksyms = KernelSymbols(tmp_path / "missing")
    assert ksyms.resolve(0xFFFFFFFF81000000) == "[unknown]"
    assert len(ksyms) == 0


def test_loads_lazily_once_and_reload_picks_up_changes(tmp_path: Path) -> None:
    path = tmp_path / "kallsyms"
    ksyms = KernelSymbols(str(path))  # file need not exist yet: nothing is read here
    path.write_text("ffffffff81000000 T first\n")
    assert ksyms.resolve(0xFFFFFFFF81000010) == "first"
    path.write_text("ffffffff81000000 T second\n")
    assert ksyms.resolve(0xFFFFFFFF81000010) == "first"  # loaded once
    ksyms.reload()
    assert ksyms.resolve(0xFFFFFFFF81000010) == "second"


symbol_tables = st.dictionaries(
    st.integers(min_value=1, max_value=2**64 - 1),
    st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True),
    min_size=1,
    max_size=50,
)


@given(symbol_tables, st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=20))
def test_matches_linear_reference(table: dict[int, str], probes: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kallsyms"
        path.write_text("".join(f"{addr:016x} T {name}\n" for addr, name in table.items()))
        ksyms = KernelSymbols(path)
        starts = sorted(table)
        for probe in [*probes, *starts, *(s - 1 for s in starts), *(s + 1 for s in starts)]:
            below = [a for a in starts if a <= probe]
            expected = table[max(below)] if below and probe > 0 else "[unknown]"
            assert ksyms.resolve(probe) == expected
            assert bisect.bisect_right(starts, probe) == len(below)


def test_real_kallsyms_resolves_schedule() -> None:
    schedule_addr = None
    with open("/proc/kallsyms") as fh:
        for line in fh:
            fields = line.split()
            if fields[2] == "schedule" and len(fields) == 3:
                schedule_addr = int(fields[0], 16)
                break
    assert schedule_addr is not None
    assert schedule_addr != 0, "kallsyms addresses are hidden (kptr_restrict); run as root"
    ksyms = KernelSymbols()
    assert len(ksyms) > 10_000
    assert ksyms.resolve(schedule_addr) == "schedule"
    assert ksyms.resolve(schedule_addr + 1) == "schedule"
