"""The syscalls program on the real kernel: exact counts, whatever the interval boundaries."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_edge, unique_comm

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("task_storage", [1, 0], ids=["task-storage", "fallback"])
@pytest.mark.parametrize("latency", [1, 0], ids=["with-latency", "counts-only"])
def test_openat_counts_and_enoent_exact(workload_bin: dict[str, Path], latency: int,
                                        task_storage: int) -> None:
    comm = unique_comm("sopen")
    # A 0.3 s interval makes the workload straddle several drains.
    params = {"LATENCY": latency, "TASK_STORAGE": task_storage}
    with run_edge(["syscalls"], interval=0.3, params={"syscalls": params}) as run:
        subprocess.run([str(workload_bin["openat"]), comm, "10000", "5000", "50000"],
                       check=True)
    assert len(run.batches) >= 2
    assert run.counter("syscalls_total", syscall="openat", comm=comm) == 15000
    assert run.counter("syscall_errors_total", syscall="openat", comm=comm) == 5000
    assert run.counter("syscall_errors_total", syscall="openat", comm=comm, errno="ENOENT") == 5000
    hists = run.histograms("syscall_latency", syscall="openat", comm=comm)
    if latency:
        assert sum(h["count"] for h in hists) == 15000
        assert sum(sum(h["buckets"].values()) + h["zero_count"] for h in hists) == 15000
        assert all(int(i) >= 0 for h in hists for i in h["buckets"])  # every call takes > 1 ns
    else:
        assert hists == []


def test_batches_are_contiguous_windows() -> None:
    with run_edge(["syscalls"], interval=0.2) as run:
        subprocess.run(["sleep", "0.7"], check=True)
    seqs = [b["seq"] for b in run.batches]
    assert seqs == list(range(1, len(seqs) + 1))
    for prev, cur in zip(run.batches, run.batches[1:], strict=False):
        assert cur["start_ns"] == prev["end_ns"]
        assert cur["boot_id"] == prev["boot_id"]


def test_a_thread_renamed_by_another_is_counted_under_its_new_name(
    workload_bin: dict[str, Path]
) -> None:
    """The program caches each task's comm; a rename through /proc by another
    thread must still put every later call under the new name."""
    if platform.machine() != "x86_64":
        pytest.fail(f"401 is an unassigned x86_64 number; pick one for {platform.machine()}")
    comm = unique_comm("rnm")
    with run_edge(["syscalls"], interval=0.3, params={"syscalls": {"LATENCY": 1}}) as run:
        subprocess.run([str(workload_bin["rename_thread"]), comm, "3000", "401"], check=True)
    assert run.counter("syscalls_total", syscall="sys_401", comm=comm) == 3000
    assert run.counter("syscall_errors_total", syscall="sys_401", comm=comm, errno="ENOSYS") == 3000
    assert sum(h["count"] for h in run.histograms("syscall_latency", syscall="sys_401",
                                                   comm=comm)) == 3000
