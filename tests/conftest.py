"""Shared fixtures: compiled workloads and an in-process edge collector run."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from stratoscope.edge.batch import batch_to_dict
from stratoscope.edge.collector import Collector
from stratoscope.edge.config import EdgeConfig

WORKLOADS = Path(__file__).parent / "workloads"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stable_port(span: int = 1) -> int:
    """A free loopback port (and the ``span - 1`` after it) below the kernel's ephemeral
    range, for a server that is stopped and started again on the same port: while it is
    down, no other process's bind to port 0 (the ephemeral range) can take it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(10_000, low - span)
        socks = []
        try:
            for p in range(port, port + span):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no free port below the ephemeral range")


def wait_for(what: str, check: Callable[[], Any], deadline_s: float, every_s: float = 0.5) -> Any:
    """check()'s first truthy value; fails naming ``what`` (and the last value) at the deadline."""
    end = time.monotonic() + deadline_s
    last: Any = None
    while time.monotonic() < end:
        last = check()
        if last:
            return last
        time.sleep(every_s)
    pytest.fail(f"timed out after {deadline_s:.0f} s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="session")
def workload_bin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The C workloads, compiled once (frame pointers kept for the profiler)."""
    out = tmp_path_factory.mktemp("bin")
    bins: dict[str, Path] = {}
    for src in sorted(WORKLOADS.glob("*.c")):
        exe = out / src.stem
        subprocess.run(
            ["gcc", "-O1", "-g", "-fno-omit-frame-pointer", "-o", str(exe), str(src), "-lpthread"],
            check=True,
        )
        bins[src.stem] = exe
    return bins


def unique_comm(prefix: str) -> str:
    """A comm (at most 15 bytes) no other process on the machine has."""
    return f"{prefix}{uuid.uuid4().hex[: 15 - len(prefix)]}"


class EdgeRun:
    """Batches (as resolved dicts) produced by a collector running in a thread."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self.collector: Collector | None = None
        self.forward_stats: Any = None
        #: the forwarder's counts at the end (GrpcForwarder.counts: dropped.<reason>, ...)
        self.forward_counts: dict[str, float] = {}

    def counter(self, metric: str, **labels: str) -> int:
        return sum(
            s["value"]
            for b in self.batches
            for m in b["metrics"]
            if m["name"] == metric
            for s in m["series"]
            if all(s["labels"].get(k) == v for k, v in labels.items())
        )

    def histograms(self, metric: str, **labels: str) -> list[dict[str, Any]]:
        return [
            s
            for b in self.batches
            for h in b["histograms"]
            if h["name"] == metric
            for s in h["series"]
            if all(s["labels"].get(k) == v for k, v in labels.items())
        ]

    def events(self, **fields: Any) -> list[dict[str, Any]]:
        return [
            e for b in self.batches for e in b["events"]
            if all(e.get(k) == v for k, v in fields.items())
        ]

    def profile_samples(self, **fields: Any) -> list[dict[str, Any]]:
        return [
            s for b in self.batches for p in b["profiles"] for s in p["samples"]
            if all(s.get(k) == v for k, v in fields.items())
        ]


@contextmanager
def run_edge(
    programs: list[str], interval: float = 1.0, forward_to: list[str] | None = None,
    forward_close_s: float = 30, **cfg: Any
) -> Iterator[EdgeRun]:
    """Run a real collector (real BPF programs) around the body; final drain on exit.

    With forward_to, batches also go to those regionals over gRPC, and the exit
    waits until the regional acknowledged every one.
    """
    if os.geteuid() != 0:
        pytest.fail("these tests load BPF programs and must run as root (see README)")
    config = EdgeConfig(
        programs=programs, programs_explicit=True, interval=interval, metrics_port=0, **cfg
    )
    run = EdgeRun()
    forward = None
    if forward_to:
        from stratoscope.edge.outputs import ForwardOutput

        forward = ForwardOutput(forward_to, close_timeout_s=forward_close_s)
    collector = Collector(config)
    collector.start()
    run.collector = collector
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            def emit(b: Any) -> None:
                run.batches.append(batch_to_dict(b))
                if forward is not None:
                    forward.write(b)

            collector.run(emit, stop)
        except BaseException as exc:  # surfaced in the test thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="edge", daemon=True)
    thread.start()
    try:
        yield run
    finally:
        stop.set()
        thread.join(timeout=120)
        if thread.is_alive():  # its final drain never came: say so, not a short count
            errors.append(AssertionError("the edge's final drain did not finish within 120 s"))
        collector.stop()
        if forward is not None:
            forward.close()
            run.forward_stats = forward.forwarder.stats
            run.forward_counts = forward.forwarder.counts()
    if errors:
        raise errors[0]


def kafka_bootstrap() -> str:
    """The test broker's address; a missing broker fails the test (never skips).

    Called inside tests, not in a fixture, so a missing broker is a FAILED test
    rather than a setup ERROR.
    """
    value = os.environ.get("KAFKA_BOOTSTRAP", "").strip()
    if not value:
        pytest.fail(
            "KAFKA_BOOTSTRAP is not set: run `scripts/kafka.sh start` and export the "
            "KAFKA_BOOTSTRAP=... line it prints (scripts/test.sh does both)",
            pytrace=False,
        )
    return value
