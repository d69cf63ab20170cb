"""Full kernel maps on the real kernel: nothing is dropped, the overflow is counted.

With a deliberately tiny MAX_SERIES, many processes with distinct comms fill
the aggregate maps; increments that find no room go to the overflow series
(comm and cgroup "other") and are counted on the edge's own /metrics.

The workload calls an unassigned syscall number (every call fails with ENOSYS),
which no other process on the machine makes, so the totals per syscall over all
comms, "other" included, must equal exactly what the workload made, however
many unrelated processes share the maps. The overflow counters are compared
with the "other" series of every syscall: both flip with the maps, so they
match window by window, also for the unrelated processes' increments.
"""

from __future__ import annotations

import mmap
import os
import platform
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from stratoscope.edge.bound import OTHER
from tests.conftest import EdgeRun, run_edge, unique_comm, wait_for

pytestmark = pytest.mark.kernel

#: Unassigned on x86_64 (the table skips 335..423), so only the workload makes it.
UNASSIGNED_NR = 400
CHILDREN = 500
CALLS = 50


def _overflow(run: EdgeRun, map_name: str, lost: bool = False) -> float:
    assert run.collector is not None
    name = "stratoscope_edge_map_overflow_lost_total" if lost else "stratoscope_edge_map_overflow_total"
    value = run.collector.registry.get_sample_value(name, {"program": "syscalls", "map": map_name})
    assert value is not None, f"{name}{{map={map_name!r}}} is not exported"
    return value


def _other(labels: dict[str, Any]) -> bool:
    return labels.get("comm") == OTHER and labels.get("cgroup") == OTHER


@pytest.mark.parametrize("latency", [1, 0], ids=["with-latency", "counts-only"])
def test_full_maps_overflow_to_other_exactly(workload_bin: dict[str, Path], latency: int) -> None:
    if platform.machine() != "x86_64":
        pytest.fail(f"UNASSIGNED_NR is an x86_64 number; pick one for {platform.machine()}")
    prefix = unique_comm("ovf")[:10]  # + up to 3 digits of the child index
    sysname = f"sys_{UNASSIGNED_NR}"
    total = 2 * CHILDREN * CALLS
    with run_edge(
        ["syscalls"], interval=0.1,
        params={"syscalls": {"LATENCY": latency, "MAX_SERIES": 32}},
        # No folding in user space: every "other" series comes from the kernel.
        limits={"series_per_metric": 1_000_000},
    ) as run:
        storm = [str(workload_bin["comm_storm"]), prefix, str(CHILDREN), str(CALLS),
                 str(UNASSIGNED_NR)]
        subprocess.run(storm, check=True)
        # Make the workload straddle a drain: the second half starts only after
        # the collector has emitted a batch since the first half ended.
        seen = len(run.batches)
        deadline = time.monotonic() + 30
        while len(run.batches) == seen:
            assert time.monotonic() < deadline, "no drain within 30 s"
            time.sleep(0.01)
        subprocess.run(storm, check=True)
    assert len(run.batches) >= 2

    def series(metric: str) -> list[tuple[dict[str, Any], int]]:
        return [
            (s["labels"], s["value"]) for b in run.batches for m in b["metrics"]
            if m["name"] == metric for s in m["series"]
        ]

    # Per-syscall totals are exact, and a good part of them went to "other".
    calls = [(lb, v) for lb, v in series("syscalls_total") if lb["syscall"] == sysname]
    assert sum(v for _, v in calls) == total
    in_other = sum(v for lb, v in calls if _other(lb))
    named = sum(v for lb, v in calls if lb["comm"].startswith(prefix))
    assert in_other > 0, "the tiny map never overflowed"
    assert in_other + named == total
    errs = [(lb, v) for lb, v in series("syscall_errors_total") if lb["syscall"] == sysname]
    assert sum(v for lb, v in errs if lb["errno"] == "ENOSYS") == total
    assert sum(v for _, v in errs) == total
    assert sum(v for lb, v in errs if _other(lb)) > 0

    # The exported overflow counters equal what went to "other" (all syscalls).
    assert run.collector is not None
    assert run.collector.registry.get_sample_value(
        "stratoscope_edge_cardinality_folded_series_total",
        {"program": "syscalls", "metric": "syscalls_total"},
    ) in (None, 0.0)
    # With latency, a call with a sample is counted by it (syscalls_total adds the
    # histogram's counts), so the "other" calls are both maps' overflow.
    counted_other = _overflow(run, "counts") + (_overflow(run, "latency") if latency else 0)
    assert counted_other == sum(v for lb, v in series("syscalls_total") if _other(lb))
    assert _overflow(run, "errors") == sum(
        v for lb, v in series("syscall_errors_total") if _other(lb)
    )
    assert _overflow(run, "counts", lost=True) == 0
    assert _overflow(run, "errors", lost=True) == 0

    hists = [
        s for b in run.batches for h in b["histograms"] if h["name"] == "syscall_latency"
        for s in h["series"]
    ]
    if latency:
        mine = [h for h in hists if h["labels"]["syscall"] == sysname]
        assert sum(h["count"] for h in mine) == total
        assert sum(h["count"] for h in mine if _other(h["labels"])) > 0
        assert _overflow(run, "latency") == sum(h["count"] for h in hists if _other(h["labels"]))
        assert _overflow(run, "latency", lost=True) == 0
    else:
        assert hists == []


TCP_METRICS = ("tcp_opens_total", "tcp_closes_total", "tcp_resets_sent_total",
               "tcp_resets_received_total", "tcp_retransmits_total")


def test_full_tcp_map_overflows_to_remote_other_exactly() -> None:
    """Clients from many loopback addresses overflow conns; per-port totals stay exact.

    Nobody else connects to the listener's port, so the totals for that port
    over all remotes ("other" included) are exactly the workload's connections.
    """
    n = 60
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(n)
    port = str(listener.getsockname()[1])
    with run_edge(["tcp"], interval=0.1, params={"tcp": {"MAX_SERIES": 2}},
                  limits={"series_per_metric": 1_000_000}) as run:
        for i in range(n):
            with socket.socket() as c:
                c.bind((f"127.0.0.{2 + i}", 0))  # a distinct remote for the passive side
                c.connect(("127.0.0.1", int(port)))
                conn, _ = listener.accept()
                conn.close()
        # Wait (with a deadline) until every close on both sides was drained.
        deadline = time.monotonic() + 30
        while not all(
            run.counter("tcp_closes_total", port=port, direction=d) == n
            for d in ("active", "passive")
        ):
            assert time.monotonic() < deadline, "closes did not arrive within 30 s"
            time.sleep(0.02)
    listener.close()
    for d in ("active", "passive"):
        assert run.counter("tcp_opens_total", port=port, direction=d) == n
        assert run.counter("tcp_closes_total", port=port, direction=d) == n
    assert run.counter("tcp_opens_total", port=port, direction="passive", remote=OTHER) > 0
    assert run.collector is not None
    reg = run.collector.registry
    labels = {"program": "tcp", "map": "conns"}
    assert reg.get_sample_value("stratoscope_edge_map_overflow_total", labels) == sum(
        run.counter(metric, remote=OTHER) for metric in TCP_METRICS
    )
    assert reg.get_sample_value("stratoscope_edge_map_overflow_lost_total", labels) == 0


def test_full_connection_table_counts_untracked_connections() -> None:
    """With room to track 4 live connections, the rest are counted as untracked: per
    port and direction, closes + untracked = opens, nothing silently dropped."""
    n = 20
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(n)
    port = str(listener.getsockname()[1])
    with run_edge(["tcp"], interval=0.1, params={"tcp": {"MAX_CONNS": 4}},
                  limits={"series_per_metric": 1_000_000}) as run:
        held = []
        for _ in range(n):  # all established at once: the table fills
            c = socket.create_connection(("127.0.0.1", int(port)))
            conn, _ = listener.accept()
            held += [c, conn]
        for sock in held:
            sock.close()

        wait_for("opens = closes + untracked per direction", lambda: all(
            run.counter("tcp_opens_total", port=port, direction=d) == n
            and run.counter("tcp_closes_total", port=port, direction=d)
            + run.counter("tcp_untracked_connections_total", port=port, direction=d) == n
            for d in ("active", "passive")), 30, every_s=0.02)
    listener.close()
    untracked = sum(run.counter("tcp_untracked_connections_total", port=port, direction=d)
                    for d in ("active", "passive"))
    assert 2 * n - 4 <= untracked < 2 * n
    for d in ("active", "passive"):
        closes = run.counter("tcp_closes_total", port=port, direction=d)
        lifetimes = run.histograms("tcp_connection_lifetime", port=port, direction=d)
        assert sum(h["count"] for h in lifetimes) == closes


def test_full_inflight_table_counts_untracked_requests() -> None:
    """With room to track one request in flight, concurrent direct writes find the table
    full: those requests are counted as untracked, the tracked ones complete with a
    latency sample each."""
    from tests.integration.test_edge_programs import _block_device_of

    target = Path("/var/tmp") / f"stratoscope-inflight-{uuid.uuid4().hex}"
    device = _block_device_of(target.parent)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        buf = mmap.mmap(-1, 256 * 1024)  # page-aligned, as O_DIRECT needs
        buf.write(os.urandom(len(buf)))
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
            try:
                n = 0
                while not stop.is_set():
                    os.pwrite(fd, buf, (i * 64 + n % 64) * len(buf))
                    n += 1
            finally:
                os.close(fd)
        except BaseException as exc:
            errors.append(exc)

    with run_edge(["block"], interval=0.2, params={"block": {"MAX_INFLIGHT": 1}},
                  limits={"series_per_metric": 1_000_000}) as run:
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        try:
            wait_for("a request to find the table full", lambda: errors or run.counter(
                "block_untracked_requests_total", device=device, op="write"), 60, every_s=0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
    target.unlink()
    assert not errors, errors
    ops = run.counter("block_ops_total", device=device, op="write")
    assert ops > 0
    assert sum(h["count"] for h in run.histograms("block_latency", device=device, op="write")) == ops


def test_full_parent_table_counts_untracked_tasks() -> None:
    """With room for 16 parents, 50 children alive at once: the forks that find the
    table full are counted, and each child's exec event has its parent's pid or 0
    (unknown), never another."""
    n, room = 50, 16
    with run_edge(["process"], interval=0.2, params={"process": {"MAX_TASKS": room}}) as run:
        children = [subprocess.Popen(["sleep", "60"]) for _ in range(n)]
        try:
            pids = {c.pid for c in children}
            wait_for("every child's exec event", lambda: len(
                {e["pid"] for e in run.events(kind="exec") if e["pid"] in pids}) == n, 60, every_s=0.05)
        finally:
            for c in children:
                c.kill()
                c.wait()
    execs = [e for e in run.events(kind="exec") if e["pid"] in pids]
    assert len(execs) == n
    assert {e["ppid"] for e in execs} <= {os.getpid(), 0}
    unknown = sum(1 for e in execs if e["ppid"] == 0)
    assert unknown >= n - room
    # every fork that found no room was counted (others' forks may be among them)
    assert run.counter("process_untracked_tasks_total", table="parents") >= unknown


def test_full_profile_map_overflows_to_other_kernel_stacks(workload_bin: dict[str, Path]) -> None:
    """With room for one row per window, every further sample lands in "other"."""
    comm = unique_comm("burn")
    with run_edge(["profile"], interval=0.2,
                  params={"profile": {"MAX_SERIES": 1, "SAMPLE_HZ": 99}}) as run:
        proc = subprocess.Popen(
            [str(workload_bin["burn"]), comm, "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"done\n"
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.stdout.close()
    proc.wait(timeout=10)
    other = run.profile_samples(comm=OTHER)
    assert other, "the one-row map never overflowed"
    assert all(s["pid"] == 0 and s["cgroup"] == OTHER and s["user_stack"] is None for s in other)
    assert run.collector is not None
    reg = run.collector.registry
    labels = {"program": "profile", "map": "samples"}
    assert reg.get_sample_value("stratoscope_edge_map_overflow_total", labels) == sum(
        s["count"] for s in other
    )
    assert reg.get_sample_value("stratoscope_edge_map_overflow_lost_total", labels) == 0
