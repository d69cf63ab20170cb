"""The edge's memory, for the systemd unit's MemoryMax: peak and steady RSS, and the BPF
maps and programs the kernel charges to the same cgroup.

Starts `stratoscope edge` (the default program set unless --programs, --interval 10s,
batches to a regional that is not there, so they go through the spool as in production)
and runs a mixed load beside it for --seconds: short processes of several binaries (the
process program and the profiler's symbol caches), loopback TCP connections, written and
fsynced files, and CPU burnt in a few programs (profile samples with user and kernel
stacks). It samples the collector's VmRSS and VmHWM every 0.2 s and, at the end, sums the
``memlock`` of every BPF map and program it holds (/proc/PID/fdinfo). Prints one line per
figure; --json writes them too. Root.

    sudo .venv/bin/python loadtest/edge_memory.py --seconds 300
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

STATUS = re.compile(r"^(VmRSS|VmHWM):\s+(\d+) kB", re.M)
BINARIES = (["/bin/true"], ["ls", "-l", "/usr/bin"], ["cat", "/etc/os-release"],
            ["sh", "-c", "echo x | sort | uniq -c"], ["date"], ["uname", "-a"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of pid, in kB."""
    return {k: int(v) for k, v in STATUS.findall(Path(f"/proc/{pid}/status").read_text())}


def bpf_memlock(pid: int) -> int:
    """Bytes the kernel accounts to the BPF maps and programs pid holds."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        m = re.search(r"^memlock:\s+(\d+)$", text, re.M)
        if m and ("map_type:" in text or "prog_type:" in text):
            total += int(m.group(1))
    return total


def load(stop: threading.Event, workdir: Path) -> None:
    """Processes, loopback TCP, fsynced writes and CPU until stop is set."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    port = server.getsockname()[1]

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    burners = [subprocess.Popen([sys.executable, "-c", "while True: sum(range(10000))"]),
               subprocess.Popen(["sh", "-c", "while :; do :; done"])]
    i = 0
    try:
        while not stop.is_set():
            subprocess.run(BINARIES[i % len(BINARIES)], stdout=subprocess.DEVNULL, check=False)
            with socket.create_connection(("127.0.0.1", port)):
                pass
            with open(workdir / f"f{i % 8}", "wb") as fh:
                fh.write(os.urandom(64 << 10))
                fh.flush()
                os.fsync(fh.fileno())
            i += 1
            stop.wait(0.02)
    finally:
        server.close()
        for b in burners:
            b.kill()
            b.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="how long the load runs")
    ap.add_argument("--programs", help="comma-separated programs (default: the default set)")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("edge_memory.py loads BPF programs: run it as root", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="edge-memory-") as tmp:
        work = Path(tmp)
        cmd = [sys.executable, "-m", "stratoscope.cli", "edge", "--interval", "10s",
               "--regional", f"127.0.0.1:{free_port()}", "--insecure", "--spool-dir", str(work / "spool"),
               "--metrics-port", "0"]
        if args.programs:
            cmd += ["--programs", args.programs]
        edge = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        assert edge.stderr is not None
        samples: list[tuple[float, dict[str, int]]] = []
        attached_at = None
        t0 = time.monotonic()
        done = threading.Event()

        def watch_stderr() -> None:
            nonlocal attached_at
            assert edge.stderr is not None
            for line in edge.stderr:
                if attached_at is None and " attached " in line:
                    attached_at = time.monotonic() - t0
            done.set()

        threading.Thread(target=watch_stderr, daemon=True).start()
        stop = threading.Event()
        loader = threading.Thread(target=load, args=(stop, work), daemon=True)
        loader.start()
        memlock = 0
        try:
            while time.monotonic() - t0 < args.seconds and edge.poll() is None:
                samples.append((time.monotonic() - t0, memory(edge.pid)))
                if attached_at is not None and not memlock:
                    memlock = bpf_memlock(edge.pid)
                time.sleep(0.2)
            if edge.poll() is not None:
                print(f"the edge exited with {edge.returncode}", file=sys.stderr)
                return 1
            memlock = max(memlock, bpf_memlock(edge.pid))
        finally:
            stop.set()
            loader.join()
            if edge.poll() is None:
                edge.send_signal(signal.SIGTERM)
                edge.wait(timeout=120)
    if attached_at is None:
        print("the edge never said it attached", file=sys.stderr)
        return 1
    steady = [s["VmRSS"] for t, s in samples if t >= attached_at + 30]
    out: dict[str, Any] = {
        "seconds": args.seconds,
        "programs": args.programs or "default set",
        "attached_after_s": round(attached_at, 1),
        "peak_rss_mb": round(max(s["VmHWM"] for _, s in samples) / 1024, 1),
        "steady_rss_mb_min": round(min(steady) / 1024, 1) if steady else None,
        "steady_rss_mb_max": round(max(steady) / 1024, 1) if steady else None,
        "bpf_memlock_mb": round(memlock / 2**20, 1),
    }
    for k, v in out.items():
        print(f"{k:<20} {v}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
