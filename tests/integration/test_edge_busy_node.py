"""A busy node on the real kernel: exact at default settings, exact past capacity.

The workload (tests/workloads/busy_node.c) keeps 1,000 processes with distinct
comms alive at once, each making 30 kinds of system calls, and counts every
system call it makes itself; the collector's totals are compared with those
counts. At default map sizes nothing may overflow: every series is named. With
a tiny map, the workload uses 30 unassigned syscall numbers that no other
process makes, so their totals over all comms ("other" included) must equal the
workload's, and the exported overflow counters must equal what went to "other".
Both runs lift the edge's own top-N bound (a setting that folds series in user
space, totals kept), so every series seen is the kernel's.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import pytest

from stratoscope.edge.bound import OTHER
from stratoscope.edge.decoders.syscalls import syscall_name
from tests.conftest import EdgeRun, run_edge, unique_comm

pytestmark = pytest.mark.kernel

CHILDREN = 1000
ROUNDS = 20
PROBE_OK = 3000
PROBE_MISSING = 1000
#: 30 unassigned x86_64 numbers (the table skips 335..423) for the tiny-map test.
NOSYS_BASE = 340


def _busy(bin_: Path, prefix: str, probe: str, ok: int, missing: int,
          nosys_base: int = 0) -> dict[str, int]:
    argv = [str(bin_), prefix, str(CHILDREN), str(ROUNDS), probe, str(ok), str(missing)]
    if nosys_base:
        argv.append(str(nosys_base))
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=300).stdout
    made: dict[str, int] = {}
    for line in out.splitlines():
        nr, count = line.split()
        made[syscall_name(int(nr))] = int(count)
    return made


def _series(run: EdgeRun, metric: str) -> list[tuple[dict[str, Any], int]]:
    return [
        (s["labels"], s["value"]) for b in run.batches for m in b["metrics"]
        if m["name"] == metric for s in m["series"]
    ]


def _hist_counts(run: EdgeRun) -> list[tuple[dict[str, Any], int]]:
    return [
        (s["labels"], s["count"]) for b in run.batches for h in b["histograms"]
        if h["name"] == "syscall_latency" for s in h["series"]
    ]


def _by_syscall(rows: list[tuple[dict[str, Any], int]], keep: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for labels, v in rows:
        if keep(labels):
            out[labels["syscall"]] = out.get(labels["syscall"], 0) + v
    return out


def _overflow(run: EdgeRun, map_name: str, lost: bool = False) -> float:
    assert run.collector is not None
    name = "stratoscope_edge_map_overflow_lost_total" if lost else "stratoscope_edge_map_overflow_total"
    value = run.collector.registry.get_sample_value(name, {"program": "syscalls", "map": map_name})
    assert value is not None, f"{name}{{map={map_name!r}}} is not exported"
    return value


def test_busy_node_exact_at_default_settings(workload_bin: dict[str, Path]) -> None:
    prefix = unique_comm("bz")[:9]  # + up to 3 digits of the child index, or "p"
    probe = f"{prefix}p"
    # default sizes, with the latency histograms (opt-in) that take four map entries a series
    with run_edge(["syscalls"], interval=0.5, params={"syscalls": {"LATENCY": 1}},
                  limits={"series_per_metric": 1_000_000}) as run:
        made = _busy(workload_bin["busy_node"], prefix, probe, PROBE_OK, PROBE_MISSING)
    assert len(run.batches) >= 2
    assert len(made) >= 30
    mine = lambda lb: lb["comm"].startswith(prefix)  # noqa: E731

    # The probe: exactly its openat calls, its errors, one latency sample each.
    assert run.counter("syscalls_total", syscall="openat", comm=probe) == PROBE_OK + PROBE_MISSING
    assert run.counter("syscall_errors_total", syscall="openat", comm=probe) == PROBE_MISSING
    assert run.counter("syscall_errors_total", syscall="openat", comm=probe,
                       errno="ENOENT") == PROBE_MISSING
    assert sum(h["count"] for h in run.histograms(
        "syscall_latency", syscall="openat", comm=probe)) == PROBE_OK + PROBE_MISSING

    # Every process of the workload has its own series, none went to "other".
    assert {lb["comm"] for lb, _ in _series(run, "syscalls_total") if mine(lb)} == {
        probe, *(f"{prefix}{i}" for i in range(CHILDREN))}
    assert _by_syscall(_series(run, "syscalls_total"), mine) == made
    assert _by_syscall(_series(run, "syscall_errors_total"), mine) == {
        "close": CHILDREN * ROUNDS, "openat": PROBE_MISSING}
    # Every call of the workload entered after the program attached: one sample each.
    assert _by_syscall(_hist_counts(run), mine) == made
    for m in ("counts", "errors", "latency"):
        assert _overflow(run, m) == 0, f"map {m} overflowed at default settings"
        assert _overflow(run, m, lost=True) == 0


def test_busy_node_tiny_maps_exact_totals_and_overflow(workload_bin: dict[str, Path]) -> None:
    if platform.machine() != "x86_64":
        pytest.fail(f"NOSYS_BASE is an x86_64 range; pick one for {platform.machine()}")
    prefix = unique_comm("bt")[:9]
    with run_edge(["syscalls"], interval=0.5, params={"syscalls": {"MAX_SERIES": 64, "LATENCY": 1}},
                  # No folding in user space: every "other" series comes from the kernel.
                  limits={"series_per_metric": 1_000_000}) as run:
        made = _busy(workload_bin["busy_node"], prefix, f"{prefix}p", 0, 0, NOSYS_BASE)
    nosys = {syscall_name(nr) for nr in range(NOSYS_BASE, NOSYS_BASE + 30)}
    expected = {name: n for name, n in made.items() if name in nosys}
    assert expected == dict.fromkeys(nosys, CHILDREN * ROUNDS)
    is_other = lambda lb: lb["comm"] == OTHER and lb["cgroup"] == OTHER  # noqa: E731
    ours = lambda lb: lb["syscall"] in nosys  # noqa: E731

    calls = _series(run, "syscalls_total")
    assert _by_syscall(calls, ours) == expected
    assert sum(v for lb, v in calls if ours(lb) and is_other(lb)) > 0, "the tiny map never overflowed"
    errors = _series(run, "syscall_errors_total")
    assert _by_syscall(errors, lambda lb: ours(lb) and lb["errno"] == "ENOSYS") == expected
    assert _by_syscall(errors, ours) == expected
    hists = _hist_counts(run)
    assert _by_syscall(hists, ours) == expected

    # The exported overflow counters equal the increments in "other" (every syscall).
    # A call with a latency sample is counted by the sample (syscalls_total adds
    # the histogram's counts), so its "other" series holds both maps' overflow.
    assert _overflow(run, "counts") + _overflow(run, "latency") == sum(
        v for lb, v in calls if is_other(lb))
    assert _overflow(run, "errors") == sum(v for lb, v in errors if is_other(lb))
    assert _overflow(run, "latency") == sum(v for lb, v in hists if is_other(lb))
    for m in ("counts", "errors", "latency"):
        assert _overflow(run, m, lost=True) == 0
