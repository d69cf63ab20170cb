"""A store filled by a real edge run, for executing the dashboards' SQL.

The real edge (all six BPF programs on this kernel) ships to a real regional whose
ClickHouse sink writes an embedded store; the workloads give every panel data:
CPU-bound threads and a CPU burner in a container's cgroup (scheduler, profiles), a
syscall workload with failures (syscalls), loopback TCP with a reset and a SYN
retransmitted into a full accept queue (network), a write + fsync (block I/O), and
bursts of execs, inside the container, faster than the process program's rate limit
(exec events and events lost).

chdb hosts one engine per process, and the test process keeps the session's store
open (tests/integration/conftest.py), while the regional's sink writes its own store in
a child process. So, once the regional has stopped, a child process reads the
regional's tables out as Arrow and the test process inserts them into a fresh database
of the session's store, created by the same migrations; the hourly roll-ups fill through
their materialized views as they did in the regional's store.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from stratoscope.edge.decoders.cgroups import find_cgroup2_mount
from stratoscope.regional.app import RunningRegional
from stratoscope.regional.config import RegionalConfig
from stratoscope.regional.sinks.clickhouse import apply_migrations
from stratoscope.regional.sinks.config import ClickHouseSettings
from tests.conftest import EdgeRun, run_edge, unique_comm

#: The tables the regional writes (the hourly ones fill through their views on insert).
BASE_TABLES = ("profile_stacks", "series", "metric_points", "histogram_points", "profile_samples",
               "events", "nodes")
PROGRAMS = ["syscalls", "sched", "tcp", "block", "process", "profile"]
#: The process program's event rate limit (tokens per second per CPU) during the run.
EVENTS_PER_SEC = 20

_EXPORT = """
import sys, clickhouse_connect, pyarrow as pa
dsn, db, out = sys.argv[1:4]
c = clickhouse_connect.get_client(dsn=dsn)
for t in sys.argv[4:]:
    table = c.query_arrow(f"SELECT * FROM {db}.{t}")
    with pa.OSFile(f"{out}/{t}.arrow", "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
c.close()
"""


@dataclass
class EdgeStore:
    """What was run, and where its data now is."""

    database: str
    node: str
    region: str
    container: str
    cgroup: str
    exec_comm: str
    burn_comm: str
    openat_comm: str
    started: float
    ended: float
    run: EdgeRun = field(repr=False)


def _container_cgroup() -> tuple[Path, str, str]:
    """A cgroup laid out as the cgroupfs driver lays out a Docker container's."""
    mount = find_cgroup2_mount()
    if mount is None:
        pytest.fail("no cgroup2 hierarchy is mounted; containers cannot be shown", pytrace=False)
    cid = uuid.uuid4().hex + uuid.uuid4().hex  # 64 hex digits, like a container id
    d = mount / "docker" / cid
    d.mkdir(parents=True)
    return d, "/docker/" + cid, cid


def _remove_cgroup(d: Path) -> None:
    for _ in range(100):
        try:
            d.rmdir()
            if not any(d.parent.iterdir()):
                d.parent.rmdir()
            return
        except OSError:
            threading.Event().wait(0.1)


def _in_cgroup(cg: Path, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """Start argv inside the cgroup: the shell moves itself in, then becomes the program."""
    return subprocess.Popen(["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$0" "$@"', *argv], **kw)


def _tcp_traffic() -> None:
    """20 orderly loopback connections with data, one reset, one SYN retransmitted."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(21):
            conn, _ = listener.accept()
            try:
                while conn.recv(4096):
                    conn.sendall(b"y" * 1024)
            except ConnectionResetError:
                pass
            conn.close()

    server = threading.Thread(target=serve)
    server.start()
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", port)) as c:
            for _ in range(5):
                c.sendall(b"x" * 1024)
                c.recv(4096)
            c.shutdown(socket.SHUT_WR)
            c.recv(16)
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # RST
    server.join(timeout=30)
    listener.close()

    # A listener that never accepts, with an accept queue of one: the second
    # connection's SYN is dropped and retransmitted after the initial RTO (1 s).
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fport = full.getsockname()[1]
    first = socket.create_connection(("127.0.0.1", fport))
    second = socket.socket()
    second.setblocking(False)
    second.connect_ex(("127.0.0.1", fport))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _retransmits_of(second) == 0:
        threading.Event().wait(0.1)
    second.close()
    first.close()
    full.close()


def _retransmits_of(s: socket.socket) -> int:
    """tcpi_total_retrans of a socket (struct tcp_info: 8 u8 fields, then u32s, the 24th)."""
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("8B24I", info)[8 + 23])


def _block_io() -> None:
    target = Path("/var/tmp") / f"stratoscope-grafana-{uuid.uuid4().hex}"
    try:
        with open(target, "wb") as fh:
            chunk = os.urandom(1024 * 1024)
            for _ in range(8):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        target.unlink(missing_ok=True)


def _workloads(bins: dict[str, Path], cg: Path, tmp: Path, store: EdgeStore, run: EdgeRun) -> None:
    exe = tmp / store.exec_comm
    shutil.copy("/bin/true", exe)
    spin = _in_cgroup(cg, [str(bins["spin_threads"]), unique_comm("gspin"), "4", "3"])
    burn = _in_cgroup(cg, [str(bins["burn"]), store.burn_comm, "2"], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE)
    opens = _in_cgroup(cg, [str(bins["openat"]), store.openat_comm, "2000", "1000"])
    # Five bursts of 100 execs (each a fork, an exec and an exit: 300 events) against a
    # bucket of EVENTS_PER_SEC tokens per CPU, refilled between the bursts: some events of
    # every burst are stored, most are lost and counted.
    execs = _in_cgroup(cg, ["sh", "-c", "for r in 1 2 3 4 5; do i=0; while [ $i -lt 100 ]; "
                                        f'do "{exe}"; i=$((i+1)); done; sleep 1.1; done'])
    threads = [threading.Thread(target=_tcp_traffic), threading.Thread(target=_block_io)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert burn.stdout is not None and burn.stdin is not None
    assert burn.stdout.readline() == b"done\n"  # burnt; waits on stdin, maps readable
    for p in (spin, opens, execs):
        assert p.wait(timeout=60) == 0
    # Two more drains while the burner is alive: its user stacks are symbolized from its maps.
    drained, deadline = len(run.batches), time.monotonic() + 30
    while len(run.batches) < drained + 2:
        assert time.monotonic() < deadline, "the edge stopped draining"
        threading.Event().wait(0.1)
    burn.stdin.close()
    assert burn.wait(timeout=10) == 0
    burn.stdout.close()


async def _run_regional(config: RegionalConfig, edge: Any) -> Any:
    running = RunningRegional(config)
    await running.start()
    try:
        result = await asyncio.to_thread(edge, running.port)
        await running.drain()
        return result
    finally:
        await running.stop()


def fill_store(anchor: Any, bins: dict[str, Path], tmp: Path) -> EdgeStore:
    """Run the edge and the workloads, then load the regional's tables into ``anchor``'s store."""
    if os.geteuid() != 0:
        pytest.fail("these tests load BPF programs and must run as root (see README)")
    db = f"grafana_{uuid.uuid4().hex[:10]}"
    cg, cg_path, cid = _container_cgroup()
    store = EdgeStore(
        database=db, node=f"gnode-{uuid.uuid4().hex[:6]}", region="test-region-1", container=cid,
        cgroup=cg_path, exec_comm=unique_comm("gexec"), burn_comm=unique_comm("gburn"),
        openat_comm=unique_comm("gopen"), started=time.time(), ended=0.0, run=EdgeRun())
    regional_dir = tmp / "regional-store"
    config = RegionalConfig(
        insecure=True, listen="127.0.0.1:0", metrics_port=0, query_listen=None, resolution=60, lateness=0,
        clickhouse=ClickHouseSettings(dsn=f"chdb://{regional_dir}", database=db), wal_dir=tmp / "wal",
    )

    def edge(port: int) -> EdgeRun:
        with run_edge(PROGRAMS, interval=1.0, forward_to=[f"127.0.0.1:{port}"], node_id=store.node,
                      labels={"region": store.region},
                      params={"process": {"EVENTS_PER_SEC": EVENTS_PER_SEC}, "syscalls": {"LATENCY": 1},
                              "tcp": {"RTT": 1}}) as run:
            _workloads(bins, cg, tmp, store, run)
        return run

    try:
        store.run = asyncio.run(_run_regional(config, edge))
    finally:
        _remove_cgroup(cg)
    store.ended = time.time()
    assert store.run.forward_stats.acked == len(store.run.batches) > 0

    out = tmp / "export"
    out.mkdir()
    subprocess.run([sys.executable, "-c", _EXPORT, f"chdb://{regional_dir}", db, str(out), *BASE_TABLES],
                   check=True, timeout=300)
    anchor.command(f"CREATE DATABASE {db}")
    apply_migrations(anchor, db)
    for t in BASE_TABLES:
        with pa.memory_map(str(out / f"{t}.arrow")) as f:
            table = pa.ipc.open_file(f).read_all()
        if table.num_rows:
            anchor.insert_arrow(t, table, database=db)
    return store
