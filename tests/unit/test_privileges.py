"""edge/privileges.py's pure parts: what to keep, and reading /proc status files. (The drop
itself runs in tests/integration/test_edge_privileges.py, in processes of its own.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from stratoscope.edge.privileges import CAPABILITIES, names, plan, thread_capabilities

ALL = (1 << 41) - 1
UNIT = sum(1 << CAPABILITIES[c] for c in ("CAP_BPF", "CAP_PERFMON", "CAP_SYSLOG", "CAP_SETPCAP"))
PTRACE_LINE = (
    "profile: other processes' user stacks show as [unknown]: reading their /proc/PID/maps "
    "needs CAP_SYS_PTRACE, which this edge was not given (grant it to name them; the edge then "
    "keeps it)")


@pytest.mark.parametrize(("permitted", "user_stacks", "needs_bpf", "kept", "lines"), [
    (ALL, True, False, ["CAP_SYS_PTRACE"], []),  # root with the profiler
    (ALL, False, False, [], []),  # root without it
    (UNIT, True, False, [], [PTRACE_LINE]),  # the systemd unit
    (UNIT | 1 << CAPABILITIES["CAP_SYS_PTRACE"], True, False, ["CAP_SYS_PTRACE"], []),
    (UNIT, False, True, ["CAP_BPF"], []),  # before 5.19, unprivileged BPF disabled
    # before 5.8 (no CAP_BPF): CAP_SYS_ADMIN loaded the programs and reads the maps
    (1 << CAPABILITIES["CAP_SYS_ADMIN"] | 1 << CAPABILITIES["CAP_PERFMON"], False, True,
     ["CAP_SYS_ADMIN"], []),
])
def test_plan_keeps_what_the_rest_of_the_life_needs(
    permitted: int, user_stacks: bool, needs_bpf: bool, kept: list[str], lines: list[str],
) -> None:
    keep, off = plan(permitted, user_stacks=user_stacks, map_access_needs_cap_bpf=needs_bpf)
    assert (names(keep), off) == (kept, lines)


def test_names_in_number_order_unknown_bits_by_number() -> None:
    assert names(0) == []
    assert names(1 << 39 | 1 << 38 | 1 << 0 | 1 << 45) == ["CAP_CHOWN", "CAP_PERFMON", "CAP_BPF",
                                                           "cap_45"]
    assert names(ALL) == sorted(CAPABILITIES, key=CAPABILITIES.__getitem__)


def test_thread_capabilities_reads_a_status_file(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text(
        "Name:\tpython\nUmask:\t0022\nCapInh:\t0000000000000000\nCapPrm:\t0000000000080000\n"
        "CapEff:\t0000000000080000\nCapBnd:\t000000c000080000\nCapAmb:\t0000000000000000\n"
        "NoNewPrivs:\t1\nSeccomp:\t0\n")
    t = thread_capabilities(status)
    assert (names(t.effective), names(t.permitted), t.inheritable, names(t.bounding), t.ambient,
            t.no_new_privs) == (["CAP_SYS_PTRACE"], ["CAP_SYS_PTRACE"], 0,
                                ["CAP_SYS_PTRACE", "CAP_PERFMON", "CAP_BPF"], 0, True)
