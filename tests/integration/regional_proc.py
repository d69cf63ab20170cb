"""A real regional as a process of its own (``stratoscope regional``), for fault injection:
killed with SIGKILL (its whole process group, as a crashing host or the OOM killer would),
stopped with SIGTERM, restarted on the same store, log and port. Its embedded store is
read afterwards by a process of its own (an embedded store has one owner at a time).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

from stratoscope.edge.batch import batch_to_dict
from tests.conftest import stable_port, wait_for

ROOT = Path(__file__).resolve().parents[2]


class RegionalProcess:
    """``stratoscope regional`` on a fixed port, store and log (see the module docstring)."""

    def __init__(self, workdir: Path, *extra: str, kafka: str | None = None,
                 topic_prefix: str | None = None, secure: bool = False) -> None:
        """``secure``: ``extra`` configures TLS and authentication; otherwise the
        regional runs ``--insecure`` (loopback, synthetic edges without credentials)."""
        self.workdir = workdir
        # kept across restarts: below the ephemeral range, so nothing takes them meanwhile
        self.port = stable_port()
        self.metrics_port = self.port
        while self.metrics_port == self.port:
            self.metrics_port = stable_port()
        self.store = workdir / "store"
        self.wal = workdir / "wal"
        self.argv = [sys.executable, "-m", "stratoscope.cli", "regional", *([] if secure else ["--insecure"]),
                     "--listen", f"127.0.0.1:{self.port}", "--metrics-port", str(self.metrics_port),
                     "--metrics-addr", "127.0.0.1", "--query-listen", "none",
                     "--clickhouse", f"chdb://{self.store}", "--wal-dir", str(self.wal), *extra]
        if kafka:
            self.argv += ["--kafka", kafka, "--kafka-topic-prefix", topic_prefix or "stratoscope"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log = workdir / "regional.log"

    def start(self) -> None:
        """Start it and wait until it takes batches (its ingest port accepts)."""
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        with open(self.log, "ab") as out:
            out.write(f"\n=== start {self.starts} ===\n".encode())
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=ROOT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the regional exited with {self.proc.returncode}: {self.tail()}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for("the regional to listen", listening, 120, every_s=0.1)

    def kill(self) -> None:
        """SIGKILL the whole process group (ingest, sinks, frame child) and reap it."""
        proc = self.proc
        assert proc is not None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        # the children are in the group too: wait until none is left
        wait_for("the regional's children to die", lambda: not _group_alive(proc.pid), 30, every_s=0.1)

    def stop(self, timeout_s: float = 180) -> int:
        """SIGTERM and wait; returns the exit code."""
        proc = self.proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout_s)
        wait_for("the regional's children to exit", lambda: not _group_alive(proc.pid), 30, every_s=0.1)
        return code

    def metrics(self) -> dict[str, float]:
        """Its /metrics, ``name{labels}`` -> value."""
        return read_metrics(self.metrics_port)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def query(self, sql: str) -> list[list[Any]]:
        """Rows of ``sql`` on the stopped regional's embedded store (database stratoscope)."""
        assert self.proc is None or self.proc.poll() is not None, "the store is owned by the regional"
        code = textwrap.dedent(f"""
            import json, sys, clickhouse_connect
            c = clickhouse_connect.get_client(dsn={f"chdb://{self.store}"!r})
            rows = c.query(sys.stdin.read()).result_rows
            print(json.dumps([list(r) for r in rows], default=str))
        """)
        r = subprocess.run([sys.executable, "-c", code], input=sql, capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # zombies of the group count as gone
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def wait_until(deadline: float) -> None:
    """Sleep until a monotonic time (pacing a workload, not waiting for a condition)."""
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def kafka_reads(bootstrap: str, prefix: str) -> tuple[Counter[str], Counter[str]]:
    """From the ``prefix``.metrics topic, de-duplicated by block id as a consumer does:
    per node, the synthetic edges' read counter (comm "app"); per "node/comm", openat calls."""
    from tests.integration.test_regional_e2e import consume_all

    reads: Counter[str] = Counter()
    openat: Counter[str] = Counter()
    for _, batch in asyncio.run(consume_all(bootstrap, f"{prefix}.metrics")):
        d = batch_to_dict(batch)
        for m in d["metrics"]:
            if m["name"] != "syscalls_total":
                continue
            for s in m["series"]:
                if s["labels"].get("syscall") == "read" and s["labels"].get("comm") == "app":
                    reads[d["node_id"]] += s["value"]
                elif s["labels"].get("syscall") == "openat":
                    openat[f'{d["node_id"]}/{s["labels"].get("comm")}'] += s["value"]
    return reads, openat


def read_metrics(port: int) -> dict[str, float]:
    """A /metrics endpoint on this host as served, ``name{labels}`` -> value."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
