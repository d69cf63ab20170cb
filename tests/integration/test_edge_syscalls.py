"""The syscalls program on the real kernel: exact counts, whatever the interval boundaries."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_edge, unique_comm

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("latency", [1, 0], ids=["with-latency", "counts-only"])
def test_openat_counts_and_enoent_exact(workload_bin: dict[str, Path], latency: int) -> None:
    comm = unique_comm("sopen")
    # A 0.3 s interval makes the workload straddle several drains.
    with run_edge(["syscalls"], interval=0.3, params={"syscalls": {"LATENCY": latency}}) as run:
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
