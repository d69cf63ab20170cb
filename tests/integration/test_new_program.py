"""A new signal is two files: a program and its description in a programs directory.

Nothing in Python names the program below. The edge discovers it, compiles it
against this kernel, attaches it, drains its maps and ships its metric in a
batch; the regional reads the roll-up the description declares.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stratoscope.edge.config import EdgeConfig
from stratoscope.regional.rollups import Rollup, declared_rollups
from tests.conftest import run_edge, unique_comm

pytestmark = pytest.mark.kernel

CALLS = 7_777

PROGRAM_C = r"""
/* getppid() calls per process name. */
struct key {
    char comm[16];
};

BPF_ARRAY(flip_ctl, u32, 1);
BPF_HASH(calls_0, struct key, u64, 1024);
BPF_HASH(calls_1, struct key, u64, 1024);

TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    u32 zero = 0, *flip = flip_ctl.lookup(&zero);
    if (!flip)
        return 0;
    struct key k = {};
    bpf_get_current_comm(&k.comm, sizeof(k.comm));
    u64 init = 0, *v = *flip ? calls_1.lookup_or_try_init(&k, &init)
                             : calls_0.lookup_or_try_init(&k, &init);
    if (v)
        __sync_fetch_and_add(v, 1);
    return 0;
}
"""

PROGRAM_YAML = """\
program: parentcalls
help: getppid() calls per process name.
source: parentcalls.c
default: false
requires:
  tracepoints: ["syscalls:sys_enter_getppid"]
maps:
  - name: calls
    kind: counters
    key:
      - {name: comm, type: "char[16]", decoder: string}
    values:
      - {metric: getppid_calls_total, help: "getppid() calls.", unit: calls, rollup: []}
"""

# Exactly CALLS getppid() calls under a comm set after start-up, so nothing the
# interpreter does while starting is counted under it.
CHILD = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME
for _ in range(int(sys.argv[2])):
    libc.syscall(110)  # SYS_getppid on x86_64, bypassing any libc cache
"""


def test_a_program_added_as_two_files_ships_its_metric(tmp_path: Path) -> None:
    programs = tmp_path / "programs"
    programs.mkdir()
    (programs / "parentcalls.c").write_text(PROGRAM_C)
    (programs / "parentcalls.yaml").write_text(PROGRAM_YAML)

    # Discovered, but off by default as its description says.
    assert "parentcalls" not in EdgeConfig(bpf_dir=programs).programs
    assert declared_rollups(programs) == (Rollup("getppid_calls_total", ()),)

    comm = unique_comm("ppid")
    with run_edge(["parentcalls"], interval=0.5, bpf_dir=programs) as run:
        subprocess.run([sys.executable, "-c", CHILD, comm, str(CALLS)], check=True)
    assert run.counter("getppid_calls_total", comm=comm) == CALLS
    described = {m["name"]: m for b in run.batches for m in b["metrics"]}
    assert described["getppid_calls_total"]["kind"] == "counter"
    assert described["getppid_calls_total"]["unit"] == "calls"


FALLBACK_C = "#if FANCY\n#error this build needs a feature the kernel lacks\n#endif\n" + PROGRAM_C
FALLBACK_YAML = (PROGRAM_YAML.replace("program: parentcalls", "program: fancycalls")
                 .replace("source: parentcalls.c", "source: fancycalls.c")
                 + "params:\n  FANCY: {default: 1, help: \"1: the build that needs the feature\"}\n"
                 + "fallback:\n  needs: \"the feature\"\n  params: {FANCY: 0}\n")


def test_a_program_that_fails_to_load_runs_its_fallback_build(tmp_path: Path) -> None:
    """The first build fails (as on a kernel without a feature it needs): the edge loads
    the description's fallback build, says so on /metrics, and counts exactly; a
    parameter the user set is never replaced by the fallback's."""
    from stratoscope.edge.errors import LoadError

    programs = tmp_path / "programs"
    programs.mkdir()
    (programs / "fancycalls.c").write_text(FALLBACK_C)
    (programs / "fancycalls.yaml").write_text(FALLBACK_YAML)

    comm = unique_comm("fbk")
    with run_edge(["fancycalls"], interval=0.5, bpf_dir=programs) as run:
        subprocess.run([sys.executable, "-c", CHILD, comm, str(CALLS)], check=True)
        registry = run.collector.metrics.registry
        assert registry.get_sample_value("stratoscope_edge_program_fallback",
                                         {"program": "fancycalls"}) == 1
    assert run.counter("getppid_calls_total", comm=comm) == CALLS

    with pytest.raises(LoadError, match="failed to compile"), run_edge(
            ["fancycalls"], interval=0.5, bpf_dir=programs, params={"fancycalls": {"FANCY": 1}}):
        pass
