"""Each signal family on the real kernel, with workloads whose truth is known."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stratoscope.edge.bound import OTHER
from stratoscope.edge.decoders.cgroups import find_cgroup2_mount
from tests.conftest import run_edge, unique_comm

pytestmark = pytest.mark.kernel


@pytest.fixture
def test_cgroup() -> Iterator[tuple[Path, str]]:
    """A fresh cgroup v2 directory: (absolute dir, path relative to the mount)."""
    mount = find_cgroup2_mount()
    if mount is None:
        pytest.fail("no cgroup2 hierarchy is mounted; the cgroup label cannot be tested")
    d = mount / f"stratoscope-test-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    try:
        yield d, "/" + d.name
    finally:
        for _ in range(50):
            try:
                d.rmdir()
                break
            except OSError:
                threading.Event().wait(0.1)


def test_runqueue_latency_for_cpu_bound_threads_in_their_cgroup(
    workload_bin: dict[str, Path], test_cgroup: tuple[Path, str]
) -> None:
    cg_dir, cg_path = test_cgroup
    comm = unique_comm("spin")
    with run_edge(["sched"], interval=1.0) as run:
        # The shell moves itself into the cgroup, then becomes the workload.
        cpu_ns = int(subprocess.run(
            ["sh", "-c", f'echo $$ > {cg_dir}/cgroup.procs && exec "$0" "$@"',
             str(workload_bin["spin_threads"]), comm, "4", "2"],
            check=True, capture_output=True, text=True,
        ).stdout)
    hists = run.histograms("sched_runqueue_latency", cgroup=cg_path, comm=comm)
    assert hists, "no run-queue latency recorded for the workload's cgroup"
    # Four spinning threads on two cores wait for a CPU for whole time slices.
    at_least_1ms = sum(
        n for h in hists for idx, n in h["buckets"].items() if 2 ** int(idx) >= 1_000_000
    )
    assert at_least_1ms > 0
    assert run.counter("sched_involuntary_switches_total", cgroup=cg_path, comm=comm) > 0
    oncpu = run.counter("sched_oncpu_ns_total", cgroup=cg_path, comm=comm)
    # The process's own CPU time, less what it ran before naming itself (exec,
    # the loader: well under 50 ms), plus its exit after it read the clock,
    # however loaded the machine is.
    assert cpu_ns - 50e6 <= oncpu <= cpu_ns * 1.02 + 5e6, (oncpu, cpu_ns)


def _serve(listener: socket.socket, n: int) -> None:
    for _ in range(n):
        conn, _ = listener.accept()
        with contextlib.suppress(ConnectionResetError):  # the aborted connection
            conn.recv(16)
        conn.close()


@pytest.mark.parametrize("rtt", [0, 1])
def test_tcp_opens_closes_lifetimes_and_reset(rtt: int) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    with run_edge(["tcp"], interval=0.5, params={"tcp": {"RTT": rtt}}) as run:
        server = threading.Thread(target=_serve, args=(listener, 51))
        server.start()
        for _ in range(50):
            with socket.create_connection(("127.0.0.1", port)) as c:
                c.sendall(b"x")
                c.recv(16)  # wait for the server's close
        # One more connection, aborted with an RST (SO_LINGER 0).
        c = socket.create_connection(("127.0.0.1", port))
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        server.join(timeout=10)
        threading.Event().wait(0.2)
    listener.close()
    p = str(port)
    assert run.counter("tcp_opens_total", port=p, direction="active") == 51
    assert run.counter("tcp_opens_total", port=p, direction="passive") == 51
    # Each of the 50 orderly connections closes on both sides.
    assert run.counter("tcp_closes_total", port=p, direction="active") == 51
    assert run.counter("tcp_closes_total", port=p, direction="passive") == 51
    assert run.counter("tcp_resets_sent_total", port=p, direction="active") == 1
    assert run.counter("tcp_resets_received_total", port=p, direction="passive") == 1
    assert run.counter("tcp_opens_total", port=p, remote="127.0.0.1") == 102
    lifetimes = run.histograms("tcp_connection_lifetime", port=p, direction="active")
    assert sum(h["count"] for h in lifetimes) == 51
    # Segments on loopback: smoothed RTTs by remote address, IPv4 read from the record;
    # none without RTT=1 (tcp_probe is then not compiled, so not attached).
    srtt = run.histograms("tcp_srtt", remote="127.0.0.1", family="ipv4")
    if not rtt:
        assert run.histograms("tcp_srtt") == []
        return
    assert sum(h["count"] for h in srtt) > 0
    assert all(s["labels"]["remote"] in ("127.0.0.1", OTHER)
               for s in run.histograms("tcp_srtt", family="ipv4"))


def _block_device_of(path: Path) -> str:
    st = os.stat(path)
    sysdir = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
    if (sysdir / "partition").exists():
        sysdir = sysdir.parent
    return sysdir.name


def test_block_write_bytes_after_fsync(tmp_path: Path) -> None:
    target = Path("/var/tmp") / f"stratoscope-block-{uuid.uuid4().hex}"
    device = _block_device_of(target.parent)
    size = 64 * 1024 * 1024
    with run_edge(["block"], interval=1.0) as run:
        with open(target, "wb") as fh:
            chunk = os.urandom(1024 * 1024)
            for _ in range(64):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        # fsync returned, so every request completed; the drains that carry them may
        # come late on a busy machine: wait for them, with a deadline.
        deadline = time.monotonic() + 60
        while (run.counter("block_bytes_total", device=device, op="write") < size
               and time.monotonic() < deadline):
            threading.Event().wait(0.2)
    target.unlink()
    written = run.counter("block_bytes_total", device=device, op="write")
    assert written >= size, f"{written} bytes written to {device}, expected >= {size}"
    assert run.counter("block_ops_total", device=device, op="write") > 0
    lat = run.histograms("block_latency", device=device, op="write")
    assert sum(h["count"] for h in lat) == run.counter("block_ops_total", device=device, op="write")


def test_exec_and_exit_events_for_100_runs_of_true() -> None:
    with run_edge(["process"], interval=0.5) as run:
        for _ in range(100):
            subprocess.run(["/bin/true"], check=True)
    execs = [e for e in run.events(kind="exec") if e["detail"] == "/bin/true"]
    assert len(execs) == 100
    exec_pids = {e["pid"] for e in execs}
    exits = [e for e in run.events(kind="exit", comm="true") if e["pid"] in exec_pids]
    assert len(exits) == 100
    assert {e["code"] for e in exits} == {0}
    assert all(e["ppid"] == os.getpid() for e in execs)
    now = time.time_ns()
    assert all(now - 120 * 10**9 < e["time_ns"] <= now for e in execs)  # wall clock
    assert run.counter("process_events_total", event="exec", comm="true") == 100
    assert run.counter("process_events_total", event="exit", comm="true", exit_code="0") == 100


def test_exit_code_and_signal_death_are_reported() -> None:
    with run_edge(["process"], interval=0.5) as run:
        subprocess.run(["sh", "-c", "exit 7"], check=False)
        p = subprocess.Popen(["sleep", "30"])
        threading.Event().wait(0.2)
        p.kill()
        p.wait()
    assert [e["code"] for e in run.events(kind="exit", comm="sh") if e["ppid"] == os.getpid()] == [7]
    assert [e["code"] for e in run.events(kind="exit", pid=p.pid)] == [-1]


def test_profile_attributes_samples_to_the_burning_function(workload_bin: dict[str, Path]) -> None:
    comm = unique_comm("burn")
    with run_edge(["profile"], interval=1.0) as run:
        proc = subprocess.Popen(
            [str(workload_bin["burn"]), comm, "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"done\n"
        # The process now waits on stdin, so its maps are readable at the final drain.
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.stdout.close()
    proc.wait(timeout=10)
    samples = run.profile_samples(pid=proc.pid)
    total = sum(s["count"] for s in samples)
    in_burn = sum(
        s["count"] for s in samples if "stratoscope_burn_cpu" in (s["user_stack"] or [])
    )
    assert total >= 19  # 2 s of CPU time at 19 Hz: ~38 samples expected
    assert in_burn / total > 0.8, (in_burn, total, samples[:3])
    assert all(s["comm"] == comm for s in samples if s["count"])
