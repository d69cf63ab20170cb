"""Least privilege, for real: `stratoscope edge` runs as a subprocess (a drop in the pytest
process would take its capabilities too), and once it emits batches every one of its
threads holds exactly the capabilities edge/privileges.py says it keeps, with no_new_privs
set, while its data stay exact.

Two ways to start it: with the credentials deploy/systemd/stratoscope-edge.service gives
(a user that is not root, the unit's ambient and bounding capabilities, no_new_privs;
tracefs readable by the user's group, as the unit's ExecStartPre does), and as root with
every capability (what the tests and the demo do). The unit's LimitMEMLOCK=infinity is not
reproduced: this kernel charges BPF memory to the cgroup instead, and root here may not
raise the limit.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stratoscope.edge.privileges import CAPABILITIES, names, thread_capabilities
from tests.conftest import free_port, unique_comm, wait_for

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
EDGE_UNIT = ROOT / "deploy/systemd/stratoscope-edge.service"
STRATOSCOPE = [sys.executable, "-m", "stratoscope.cli"]
TRACEFS = Path("/sys/kernel/tracing")
#: Runs of a binary with a unique name, each one exec and one exit with code 1.
RUNS = 40


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} (util-linux) is needed to start the edge with given credentials")
    return path


def _unit_setting(key: str) -> str:
    (line,) = [ln for ln in EDGE_UNIT.read_text().splitlines() if ln.startswith(f"{key}=")]
    return line.partition("=")[2]


def _unused_id() -> int:
    """A uid that is also a gid, neither known to this machine: the edge's own user."""
    for n in range(61_000, 62_000):
        try:
            pwd.getpwuid(n)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(n)
            continue
        except KeyError:
            return n
    pytest.fail("no unused uid/gid between 61000 and 62000")


@contextmanager
def _tracefs_group(gid: int) -> Iterator[None]:
    """tracefs readable by ``gid`` (what the unit's ExecStartPre does), then as it was."""
    before = TRACEFS.stat()
    subprocess.run(["mount", "-t", "tracefs", "-o", f"remount,gid={gid},mode=0750", "nodev",
                    str(TRACEFS)], check=True, timeout=60)
    try:
        yield
    finally:
        subprocess.run(["mount", "-t", "tracefs", "-o",
                        f"remount,gid={before.st_gid},mode={stat.S_IMODE(before.st_mode):04o}",
                        "nodev", str(TRACEFS)], check=True, timeout=60)


@dataclass
class Edge:
    proc: subprocess.Popen[str]
    out: Path
    metrics_port: int
    #: Everything the edge wrote to stderr, once it exited.
    stderr: str = ""

    def batches(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        # Only whole lines: the edge may be writing the last one while we read.
        return [json.loads(ln) for ln in self.out.read_text().split("\n")[:-1]]

    def counter(self, metric: str, **labels: str) -> int:
        return sum(s["value"] for b in self.batches() for m in b["metrics"] if m["name"] == metric
                   for s in m["series"] if all(s["labels"].get(k) == v for k, v in labels.items()))

    def samples(self, **fields: Any) -> list[dict[str, Any]]:
        return [s for b in self.batches() for p in b["profiles"] for s in p["samples"]
                if all(s[k] == v for k, v in fields.items())]

    def threads(self) -> dict[str, Any]:
        """Every thread's capability sets, by thread id."""
        out = {}
        for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
            try:
                out[tid] = thread_capabilities(Path(f"/proc/{self.proc.pid}/task/{tid}/status"))
            except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
                continue
        return out

    def open_files(self) -> set[str]:
        """What the edge's descriptors point to (one closed while we look is left out)."""
        out = set()
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                out.add(os.readlink(f"/proc/{self.proc.pid}/fd/{fd}"))
            except FileNotFoundError:  # closed while we looked
                continue
        return out

    def charged_peak(self) -> int:
        """Bytes the unit's cgroup would have held at most: peak RSS, and the BPF maps and
        programs the kernel charges to it as well (their fdinfo's memlock)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        hwm = re.search(r"^VmHWM:\s+(\d+) kB$", status, re.M)
        assert hwm is not None, status
        bpf = 0
        for fd in os.listdir(f"/proc/{self.proc.pid}/fdinfo"):
            try:
                info = Path(f"/proc/{self.proc.pid}/fdinfo/{fd}").read_text()
            except FileNotFoundError:
                continue
            memlock = re.search(r"^memlock:\s+(\d+)$", info, re.M)
            if memlock and ("map_type:" in info or "prog_type:" in info):
                bpf += int(memlock.group(1))
        return int(hwm.group(1)) * 1024 + bpf

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return str(urllib.request.urlopen(url, timeout=5).read().decode())


@contextmanager
def _edge(prefix: list[str], workdir: Path) -> Iterator[Edge]:
    """The default program set, batches every second to a JSON-lines file and (through
    the spool) to a regional that is not there, so the forwarder's threads run too."""
    (workdir / "edge.yaml").write_text("bpf_stats: true\n")
    port = free_port()
    edge = Edge(subprocess.Popen(
        [*prefix, *STRATOSCOPE, "edge", "--config", str(workdir / "edge.yaml"), "--interval", "1s",
         "--output", f"jsonl:{workdir / 'out.jsonl'}", "--regional", f"127.0.0.1:{free_port()}",
         "--insecure",
         "--spool-dir", str(workdir / "spool"), "--metrics-port", str(port)],
        stderr=subprocess.PIPE, text=True, cwd=workdir,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ), workdir / "out.jsonl", port)
    try:
        wait_for("the edge's first batch", lambda: edge.proc.poll() is not None or edge.batches(),
                 180)
        assert edge.proc.poll() is None, edge.proc.communicate(timeout=60)[1]
        yield edge
    finally:
        if edge.proc.poll() is None:
            edge.proc.send_signal(signal.SIGTERM)
        edge.stderr = edge.proc.communicate(timeout=120)[1]


@contextmanager
def _burner(burn: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process that burnt 1 s of CPU in a named function through a clock syscall and now
    waits on stdin, so its maps stay readable, until the block ends."""
    proc = subprocess.Popen([str(burn), unique_comm("burn"), "1"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"done\n"
        yield proc
    finally:
        proc.stdin.close()
        proc.stdout.close()
        try:
            proc.wait(timeout=30)
        finally:
            proc.kill()


def _workload(edge: Edge, burner: subprocess.Popen[bytes], workdir: Path) -> tuple[str, str]:
    """RUNS execs of a binary with a unique name, each exiting 1, and runs of dd under
    another unique name (reading /dev/zero: nearly all its time in the kernel) until the
    edge has sampled its kernel stacks; waits until the edge's batches hold the execs and
    the burner's samples. Returns the two names."""
    comm, kernel = unique_comm("priv"), unique_comm("kern")
    shutil.copy("/bin/false", workdir / comm)
    shutil.copy(shutil.which("dd") or "/bin/dd", workdir / kernel)
    for _ in range(RUNS):
        assert subprocess.run([str(workdir / comm)], check=False).returncode == 1

    def kernel_samples() -> bool:
        subprocess.run([str(workdir / kernel), "if=/dev/zero", "of=/dev/null", "bs=1M",
                        "count=2000"], check=True, capture_output=True)
        return any(s["kernel_stack"] for s in edge.samples(comm=kernel))

    wait_for(f"kernel stacks of {kernel}", kernel_samples, 60, every_s=0)
    wait_for(f"{RUNS} exits of {comm}", lambda: edge.counter(
        "process_events_total", event="exit", comm=comm, exit_code="1") >= RUNS, 60)
    wait_for("the burner's samples", lambda: sum(s["count"] for s in edge.samples(
        pid=burner.pid)) >= 10, 60)
    return comm, kernel


def _assert_exact(edge: Edge, comm: str) -> None:
    assert edge.counter("process_events_total", event="exec", comm=comm) == RUNS
    assert edge.counter("process_events_total", event="exit", comm=comm, exit_code="1") == RUNS
    assert edge.counter("process_events_total", event="exit", comm=comm) == RUNS


def _assert_kernel_stacks_named(samples: list[dict[str, Any]]) -> None:
    """kallsyms was read at start-up: after the drop, kernel frames still have names."""
    kernel = [f for s in samples for f in s["kernel_stack"] or []]
    assert kernel, samples[:3]
    assert all(re.fullmatch(r"[A-Za-z_.$][\w.$]*", f) for f in kernel), kernel[:20]


def _assert_threads(edge: Edge, keep: int, bounding: int | None = None) -> None:
    """Every thread holds ``keep`` (effective, permitted) and ``bounding`` (default: keep),
    nothing inheritable or ambient, and no_new_privs."""
    threads = edge.threads()
    # main, forwarder, forwarder-doubt, /metrics and gRPC's own: all started after the drop
    assert len(threads) >= 4, threads
    bounding = keep if bounding is None else bounding
    for tid, t in threads.items():
        got = (names(t.effective), names(t.permitted), names(t.inheritable), names(t.bounding),
               names(t.ambient), t.no_new_privs)
        assert got == (names(keep), names(keep), [], names(bounding), [], True), tid


@pytest.mark.timeout(600)
def test_edge_with_the_units_credentials_keeps_no_capability(
    workload_bin: dict[str, Path],
) -> None:
    caps = _unit_setting("AmbientCapabilities").split()
    assert _unit_setting("CapabilityBoundingSet").split() == caps
    assert _unit_setting("NoNewPrivileges") == "yes"
    assert _unit_setting("LimitMEMLOCK") == "infinity"
    assert "CAP_SYS_PTRACE" not in caps and "CAP_SYS_ADMIN" not in caps
    setpriv = ",".join("+" + c.lower().removeprefix("cap_") for c in caps)
    ident = _unused_id()
    workdir = Path(tempfile.mkdtemp(prefix="strato-priv-"))
    os.chown(workdir, ident, ident)
    prefix = [_tool("setpriv"), f"--reuid={ident}", f"--regid={ident}", "--clear-groups",
              f"--inh-caps=-all,{setpriv}", f"--ambient-caps=-all,{setpriv}",
              f"--bounding-set=-all,{setpriv}", "--no-new-privs"]
    try:
        with _tracefs_group(ident), _edge(prefix, workdir) as edge, \
                _burner(workload_bin["burn"]) as burner:
            _assert_threads(edge, 0)
            comm, kernel = _workload(edge, burner, workdir)
            _assert_threads(edge, 0)
            memory_max = _unit_setting("MemoryMax")
            assert re.fullmatch(r"\d+M", memory_max), memory_max
            assert edge.charged_peak() < int(memory_max[:-1]) << 20
        assert edge.proc.returncode == 0, edge.stderr
        _assert_exact(edge, comm)
        _assert_kernel_stacks_named(edge.samples(comm=kernel))
        samples = edge.samples(pid=burner.pid)
        # Not the edge's user and more capabilities than it: without CAP_SYS_PTRACE its maps
        # are closed to the edge, as the start-up line says.
        assert {f for s in samples for f in s["user_stack"] or []} == {"[unknown]"}
    finally:
        shutil.rmtree(workdir)
    err = edge.stderr
    assert "Traceback" not in err, err
    assert err.count("capabilities after start-up: none; no_new_privs set") == 1, err
    assert err.count("other processes' user stacks show as [unknown]: reading their "
                     "/proc/PID/maps needs CAP_SYS_PTRACE") == 1, err
    assert err.count("bpf_stats: per-program run time is off: turning BPF statistics on "
                     "needs CAP_SYS_ADMIN at start-up") == 1, err
    assert "kernel stacks show as [unknown]" not in err, err
    assert "bounding set left as it was" not in err, err


@pytest.mark.timeout(600)
def test_edge_started_as_root_keeps_only_cap_sys_ptrace(
    workload_bin: dict[str, Path], tmp_path: Path,
) -> None:
    with _edge([], tmp_path) as edge, _burner(workload_bin["burn"]) as burner:
        keep = 1 << CAPABILITIES["CAP_SYS_PTRACE"]
        _assert_threads(edge, keep)
        # bpf_stats: the statistics' descriptor is held, and the kernel counts.
        assert "anon_inode:bpf-stats" in edge.open_files()
        wait_for("BPF run counts on /metrics", lambda: re.search(
            r'^stratoscope_edge_bpf_run_count_total\{program="profile"\} [1-9]', edge.metrics(),
            re.M), 30)
        comm, kernel = _workload(edge, burner, tmp_path)
        _assert_threads(edge, keep)
    assert edge.proc.returncode == 0, edge.stderr
    _assert_exact(edge, comm)
    _assert_kernel_stacks_named(edge.samples(comm=kernel))
    samples = edge.samples(pid=burner.pid)
    # CAP_SYS_PTRACE, kept for this: another process's user stack named after the drop.
    total = sum(s["count"] for s in samples)
    named = sum(s["count"] for s in samples if "stratoscope_burn_cpu" in (s["user_stack"] or []))
    assert named / total > 0.8, samples[:3]
    err = edge.stderr
    assert "Traceback" not in err, err
    assert err.count("capabilities after start-up: CAP_SYS_PTRACE; no_new_privs set") == 1, err
    assert "show as [unknown]" not in err and "run time is off" not in err, err


@pytest.mark.timeout(600)
def test_edge_without_cap_syslog_and_cap_setpcap_says_what_is_off(tmp_path: Path) -> None:
    """Only CAP_BPF and CAP_PERFMON (root's uid, so tracefs stays readable): the edge runs,
    drops both, and says in one line each that kernel stacks are unnamed (kallsyms hid its
    addresses) and that the bounding set stays (no CAP_SETPCAP to empty it)."""
    kallsyms_open = Path("/proc/sys/kernel/kptr_restrict").read_text().strip() == "0" and int(
        Path("/proc/sys/kernel/perf_event_paranoid").read_text()) <= 1
    assert not kallsyms_open, "this machine shows kallsyms to anyone: the test cannot tell"
    start_up = (1 << CAPABILITIES["CAP_BPF"]) | (1 << CAPABILITIES["CAP_PERFMON"])
    with _edge([_tool("setpriv"), "--inh-caps=-all", "--bounding-set=-all,+bpf,+perfmon"],
               tmp_path) as edge:
        _assert_threads(edge, 0, bounding=start_up)
        wait_for("a kernel stack", lambda: any(s["kernel_stack"] for s in edge.samples()), 60)
        assert {f for s in edge.samples() for f in s["kernel_stack"] or []} == {"[unknown]"}
    assert edge.proc.returncode == 0, edge.stderr
    err = edge.stderr
    assert "Traceback" not in err, err
    assert err.count("profile: kernel stacks show as [unknown]: /proc/kallsyms hid its "
                     "addresses") == 1, err
    assert err.count("capability bounding set left as it was: emptying it needs CAP_SETPCAP "
                     "at start-up") == 1, err
    assert err.count("capabilities after start-up: none; no_new_privs set") == 1, err


def test_a_drop_with_a_second_thread_running_is_refused_and_changes_nothing() -> None:
    code = (
        "import threading, sys\n"
        "from pathlib import Path\n"
        "from stratoscope.edge.privileges import PrivilegeError, drop\n"
        "stop = threading.Event()\n"
        "threading.Thread(target=stop.wait, name='other').start()\n"
        "def caps():\n"
        "    return [ln for ln in Path('/proc/self/status').read_text().splitlines()\n"
        "            if ln.startswith(('Cap', 'NoNewPrivs'))]\n"
        "before = caps()\n"
        "try:\n"
        "    drop(0)\n"
        "except PrivilegeError as exc:\n"
        "    print(exc)\n"
        "stop.set()\n"
        "sys.exit(0 if caps() == before and len(before) == 6 else 3)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    # Python names its threads in the kernel from 3.14 on; before, both are "python".
    assert re.fullmatch(
        r"cannot drop capabilities: 2 threads already run \(python, (python|other)\); "
        r"capabilities are per thread, so they must be dropped before any thread starts",
        r.stdout.strip()), r.stdout
