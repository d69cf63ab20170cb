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

from rich.console import Console

from stratoscope.edge.config import parse_duration
from stratoscope.regional import report
from stratoscope.regional.app import RegionalOptions, RunningRegional

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


async def run_demo(opts: RegionalOptions, duration: str) -> int:
    console = Console()
    seconds = parse_duration(duration)
    running = RunningRegional(opts)
    await running.start()
    since = int(time.time()) // opts.resolution_s * opts.resolution_s
    console.print(f"[bold]regional[/] on 127.0.0.1:{running.port} → {opts.clickhouse}"
                  + (f" + Kafka {opts.kafka}" if opts.kafka else ""))
    console.print(f"[bold]edge[/] on this node for {seconds:.0f} s (all six programs)…")
    edge = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stratoscope.cli", "edge", "--regional", f"127.0.0.1:{running.port}",
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
        sections = await report.collect(ch.query, since)  # type: ignore[attr-defined]
        report.render(sections, console)
        empty = [name for name in report.SECTIONS if not sections[name]]
        if empty:
            console.print(f"[yellow]sections without rows: {', '.join(empty)}")
        return 0
    finally:
        await running.stop()
