"""`stratoscope demo`: a regional on embedded ClickHouse, this node's edge, then a report."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from stratoscope.regional import report
from stratoscope.regional.app import RunningRegional
from stratoscope.regional.config import RegionalConfig
from stratoscope.regional.sinks.base import SinkError

#: The demo shows every signal, so it names every program (the default set leaves out
#: syscalls and sched: see the README's cost table).
DEMO_PROGRAMS = ("syscalls", "sched", "tcp", "block", "process", "profile")

log = logging.getLogger("stratoscope.demo")


def _workload(seconds: float) -> None:
    """A little of everything, so every section of the report has rows of its own:
    loopback TCP connections, an fsync'd write, a few execs. Repeats every 5 s."""
    deadline = time.monotonic() + seconds - 2
    time.sleep(min(8.0, seconds / 3))  # the edge compiles its programs first
    while time.monotonic() < deadline:
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
        with tempfile.NamedTemporaryFile(dir="/var/tmp") as fh:
            fh.write(os.urandom(4 * 1024 * 1024))
            fh.flush()
            os.fsync(fh.fileno())
        for _ in range(5):
            subprocess.run(["/bin/true"], check=False)
        time.sleep(5)


async def run_demo(config: RegionalConfig, seconds: float) -> int:
    """The regional ``config`` describes (it needs its ClickHouse sink: the report reads
    it), this node's edge for ``seconds``, then the report."""
    console = Console()
    if config.clickhouse is None:
        console.print("[red]the demo reports from ClickHouse: do not disable it")
        return 2
    running = RunningRegional(config)
    try:
        await running.start()  # stops what it started if a part fails
    except (SinkError, OSError) as exc:
        print(f"stratoscope: error: cannot start the regional: {exc}", file=sys.stderr)
        return 1
    since = int(time.time()) // config.resolution_s * config.resolution_s
    console.print(f"[bold]regional[/] on 127.0.0.1:{running.port} → {config.clickhouse.dsn}"
                  + (f" + Kafka {config.kafka.bootstrap}" if config.kafka else ""))
    if running.query_port:
        console.print(f"[bold]read endpoint[/] http://127.0.0.1:{running.query_port} "
                      f"(stratoscope query --list --regional http://127.0.0.1:{running.query_port})")
    console.print(f"[bold]edge[/] on this node for {seconds:.0f} s (all six programs, "
                  "syscall latency and TCP RTT on)…")
    # the edge's spool beside the regional's log (or the store): this demo's own
    state = config.wal_dir.parent if config.wal_dir is not None else Path(tempfile.mkdtemp(prefix="strato-demo-"))
    edge = await asyncio.create_subprocess_exec(
        # loopback, both ends on this machine: no credentials (the regional is insecure too)
        sys.executable, "-m", "stratoscope.cli", "edge", "--regional", f"127.0.0.1:{running.port}",
        "--insecure",
        "--spool-dir", str(state / "edge-spool"),
        # every program, the opt-in ones too (syscalls and sched are not in the default set)
        "--programs", ",".join(DEMO_PROGRAMS), "--param", "syscalls.LATENCY=1", "--param", "tcp.RTT=1",
        "--duration", f"{seconds}s", "--interval", "10s", "--metrics-port", "0",
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    workload = asyncio.create_task(asyncio.to_thread(_workload, seconds))
    rc = await edge.wait()
    await workload
    try:
        await running.drain()  # every window flushed and delivered
        if rc != 0:
            console.print(f"[red]the edge exited with {rc}")
            return rc
        ch = running.sink("clickhouse")
        sections = await report.collect(ch.query, since)
        report.render(sections, console)
        empty = [name for name in report.SECTIONS if not sections[name]]
        if empty:
            console.print(f"[yellow]sections without rows: {', '.join(empty)}")
        return 0
    finally:
        await running.stop()
