"""A store filled by a real edge run, for the query and status tests.

A regional (``stratoscope regional``, embedded chdb, read endpoint on) and an edge
(``stratoscope edge``, every program, this kernel) run as the commands a person runs,
while a known workload runs: a child with a known comm making a known number of
openat calls, a CPU burner with a known function, loopback TCP connections (some of
whose SYNs are dropped by a full accept queue, so they are retransmitted), an fsync'd
file write and the execs of all of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, unique_comm, wait_for

PROGRAMS = ("syscalls", "sched", "tcp", "block", "process", "profile")
#: openat calls of the counted child: this many succeed, this many fail with ENOENT.
OPENAT_OK, OPENAT_ENOENT = 1000, 200


def http_json(url: str, timeout_s: float = 30.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def http_text(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return str(resp.read().decode())
    except (urllib.error.URLError, OSError):
        return None


def cli(*args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``stratoscope ARGS`` as a person runs it (a process of its own)."""
    proc = subprocess.run([sys.executable, "-m", "stratoscope.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})
    if check and proc.returncode != 0:
        pytest.fail(f"stratoscope {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
    return proc


@dataclass
class Store:
    """The running regional and edge, and what the workload did."""

    chdb_dir: Path
    node: str
    regional_metrics: str
    edge_metrics: str
    query_url: str
    regional: subprocess.Popen[bytes]
    edge: subprocess.Popen[bytes] | None
    counted_comm: str = ""
    counted_pid: int = 0
    burn_comm: str = ""
    burn_pid: int = 0
    since: str = "1h"
    logs: dict[str, Path] = field(default_factory=dict)

    def query(self, name: str, **params: Any) -> dict[str, Any]:
        """A cookbook query through the regional's read endpoint, as JSON."""
        qs = "&".join(f"{k}={v}" for k, v in params.items())
        now = int(time.time())
        status, body = http_json(f"{self.query_url}/query/{name}?start={now - 3600}&end={now + 1}"
                                 + (f"&{qs}" if qs else ""))
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    def rows(self, name: str, **params: Any) -> list[dict[str, Any]]:
        body = self.query(name, **params)
        names = [c["name"] for c in body["columns"]]
        return [dict(zip(names, r, strict=True)) for r in body["rows"]]

    def stop_regional(self) -> int:
        """SIGTERM the regional (it stores every window first); its exit code."""
        if self.regional.poll() is None:
            self.regional.send_signal(signal.SIGTERM)
            try:
                return self.regional.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.regional.kill()
                pytest.fail("the regional did not stop within 120 s of SIGTERM")
        return int(self.regional.returncode)


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _edge_batches(store: Store) -> float:
    text = http_text(store.edge_metrics) or ""
    for line in text.splitlines():
        if line.startswith("stratoscope_edge_batches_total "):
            return float(line.split()[1])
    return 0.0


def _attached(store: Store) -> int:
    text = http_text(store.edge_metrics) or ""
    return sum(1 for line in text.splitlines()
               if line.startswith("stratoscope_edge_programs_attached{") and line.endswith(" 1.0"))


def _syn_retransmits() -> int:
    """SYN retransmits of this network namespace so far (TcpExt: TCPSynRetrans)."""
    with open("/proc/net/netstat") as fh:
        lines = [line.split() for line in fh if line.startswith("TcpExt:")]
    names, values = lines[0], lines[1]
    return int(values[names.index("TCPSynRetrans")])


def _tcp_traffic() -> None:
    """Ten accepted loopback connections, and SYNs dropped by a full accept queue: a
    listener with backlog 0 that never accepts holds one connection; the next
    connects' SYNs are dropped and retransmitted after ~1 s."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", port)) as c:
                conn, _ = listener.accept()
                c.sendall(b"ping")
                conn.recv(4)
                conn.close()
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        clients = [socket.socket() for _ in range(4)]
        before = _syn_retransmits()
        try:
            for c in clients:
                c.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    c.connect(("127.0.0.1", port))
            # SYNs of all but the one the queue holds are dropped and resent ~1 s later
            wait_for("the dropped SYNs to be retransmitted",
                     lambda: _syn_retransmits() - before >= len(clients) - 1, 15, every_s=0.1)
        finally:
            for c in clients:
                c.close()


def _disk_write() -> None:
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as fh:
        fh.write(os.urandom(4 * 1024 * 1024))
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def running_store(workload_bin: dict[str, Path], tmp: Path) -> Iterator[Store]:
    if os.geteuid() != 0:
        pytest.fail("these tests load BPF programs and must run as root (see README)")
    ingest, rmetrics, qport, emetrics = (free_port() for _ in range(4))
    node = f"qnode-{uuid.uuid4().hex[:8]}"
    chdb = tmp / "ch"
    logs = {"regional": tmp / "regional.log", "edge": tmp / "edge.log"}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(logs["regional"], "wb") as rlog:
        regional = subprocess.Popen(
            [sys.executable, "-m", "stratoscope.cli", "regional", "--insecure", "--listen", f"127.0.0.1:{ingest}",
             "--metrics-port", str(rmetrics), "--metrics-addr", "127.0.0.1",
             "--query-listen", f"127.0.0.1:{qport}", "--clickhouse", f"chdb://{chdb}",
             "--resolution", "5s", "--lateness", "1s", "--regional-id", "qregional",
             "--wal-dir", str(tmp / "wal")],
            stdout=rlog, stderr=subprocess.STDOUT, env=env)
    store = Store(chdb, node, f"http://127.0.0.1:{rmetrics}/metrics",
                  f"http://127.0.0.1:{emetrics}/metrics", f"http://127.0.0.1:{qport}",
                  regional, None, logs=logs)
    try:
        def regional_up() -> bool:
            if regional.poll() is not None:
                pytest.fail(f"the regional exited {regional.returncode}: "
                            f"{logs['regional'].read_text()[-3000:]}")
            return http_text(f"{store.query_url}/queries") is not None

        wait_for("the regional's read endpoint", regional_up, 120)
        with open(logs["edge"], "wb") as elog:
            store.edge = subprocess.Popen(
                [sys.executable, "-m", "stratoscope.cli", "edge", "--insecure", "--regional", f"127.0.0.1:{ingest}",
                 "--programs", ",".join(PROGRAMS), "--param", "syscalls.LATENCY=1", "--param", "tcp.RTT=1", "--interval", "1s", "--metrics-port", str(emetrics),
                 "--node-id", node],
                stdout=elog, stderr=subprocess.STDOUT, env=env)

        def edge_up() -> int:
            assert store.edge is not None
            if store.edge.poll() is not None:
                pytest.fail(f"the edge exited {store.edge.returncode}: {logs['edge'].read_text()[-3000:]}")
            return _attached(store) == len(PROGRAMS) and _edge_batches(store) >= 1

        wait_for("the edge to attach every program and drain once", edge_up, 300)

        store.counted_comm = unique_comm("qopen")
        child = subprocess.Popen([str(workload_bin["openat"]), store.counted_comm,
                                  str(OPENAT_OK), str(OPENAT_ENOENT)])
        store.counted_pid = child.pid
        assert child.wait(timeout=60) == 0

        store.burn_comm = unique_comm("qburn")
        burn = subprocess.Popen([str(workload_bin["burn"]), store.burn_comm, "2"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        store.burn_pid = burn.pid
        assert burn.stdout is not None and burn.stdin is not None
        ready, _, _ = select.select([burn.stdout], [], [], 60)
        assert ready and burn.stdout.readline() == b"done\n"
        # alive until two more drains: the edge symbolizes its stacks from /proc/PID/maps
        drained = _edge_batches(store)
        wait_for("two drains after the burn", lambda: _edge_batches(store) >= drained + 2, 60)
        burn.stdin.close()
        assert burn.wait(timeout=30) == 0
        burn.stdout.close()

        _tcp_traffic()
        _disk_write()

        def stored() -> bool:
            rows = store.rows("top_syscalls", node=node, comm=store.counted_comm)
            return any(r["syscall"] == "openat" and r["calls"] == OPENAT_OK + OPENAT_ENOENT for r in rows) \
                and bool(store.rows("flamegraph", node=node, pid=store.burn_pid)) \
                and bool(store.rows("slowest_disks", node=node))
        wait_for("the workload's windows in the store", stored, 120, every_s=1.0)
        yield store
    finally:
        _stop(store.edge)
        _stop(regional)
