"""Synthetic edges with exactly known counters: the truth a fault-injection test checks the
stores against.

Each node sends one batch per interval through the edge's real forwarder (edge/forward.py:
its own gRPC stream, acks, resends after a reconnect), with a ``syscalls_total`` counter
for ``read`` and a ``syscall_latency`` histogram whose values vary per batch, and keeps
the sums of what it sent.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

from stratoscope.edge.batch import BatchBuilder
from stratoscope.edge.decode import Histogram
from stratoscope.edge.forward import GrpcForwarder

NS = 1_000_000_000


class SyntheticFleet:
    """``nodes`` synthetic edges in one thread (see the module docstring)."""

    def __init__(self, name: str, nodes: int, targets: list[str], interval_s: float = 1.0,
                 seed: int = 0, **forwarder: Any) -> None:
        self.nodes = [f"{name}-{i:03d}" for i in range(nodes)]
        self.interval_s = interval_s
        self.rng = random.Random(seed)
        self.forwarders = {n: GrpcForwarder(list(targets), backoff_initial_s=0.2, backoff_max_s=2.0,
                                            **forwarder) for n in self.nodes}
        #: per node: the sum of the read counter, histogram counts, and batches sent
        self.reads: Counter[str] = Counter()
        self.hist_count: Counter[str] = Counter()
        self.batches: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="synthetic-fleet", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        seq = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            seq += 1
            end = time.time_ns() // NS * NS
            for node in self.nodes:
                read = self.rng.randint(1, 1000)
                count = self.rng.randint(1, 50)
                b = BatchBuilder(node, "boot-1", seq, end - int(self.interval_s * NS), end, {"fleet": "synthetic"})
                b.add_counters("syscalls_total", "calls", "h", ["syscall", "comm"], {("read", "app"): read})
                b.add_histograms("syscall_latency", "ns", "h", ["syscall", "comm"],
                                 {("read", "app"): Histogram({3: count}, count=count, sum=5 * count)})
                self.forwarders[node].write(b.build())
                self.reads[node] += read
                self.hist_count[node] += count
                self.batches[node] += 1
            next_at += self.interval_s
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self, ack_timeout_s: float = 180) -> dict[str, float]:
        """Stop producing; wait until every batch is acknowledged. Returns the forwarders'
        counts summed (``GrpcForwarder.counts``: acked, duplicates, rejected, dropped.*...)."""
        self._stop.set()
        self._thread.join(30)
        deadline = time.monotonic() + ack_timeout_s
        stats: Counter[str] = Counter()
        for node, f in self.forwarders.items():
            ok = f.close(max(1.0, deadline - time.monotonic()))
            assert ok, f"{node}: {f.unacked} batches never acknowledged"
            stats.update(f.counts())
        stats["dropped"] = sum(v for k, v in stats.items() if k.startswith("dropped."))
        return dict(stats)
