"""Per-node rate limits at the gate: one noisy node is answered RETRY, the others are not.

Without them, one node (a bug, a replay storm, a hostile client) can take the ingest
process's CPU and keep the regional's held-data bound tripped, and the RETRY that bound
answers goes to every node. With them, a node past its share is answered RETRY (it keeps
its batches in its spool and backs off) and counted, before its batch is inflated or
validated; other nodes are unaffected.

Each node has three token buckets, batches, bytes (as received) and the ingest process's
CPU time its batches took to open and validate, refilled at the configured rate and
holding ``burst_s`` seconds of it: an edge catching up after an
outage sends as fast as its acks allow, and a burst lets a short outage's backlog
through at once. The CPU bucket is charged after the fact (what a batch costs is known
once it is parsed) and may go below zero: a node whose batch took 0.9 s of parsing (a body
that inflates to millions of empty blocks within the inflation bound, docs/SECURITY.md)
is answered RETRY until its bucket refills, so no node takes more than ``cpu_per_s`` of a
core on average, whatever its batches are made of. Buckets are kept for the most recently seen ``max_nodes`` nodes; a
node forgotten starts again with a full bucket (bounded memory whatever the client
sends; with authentication on, node names are bounded by the credentials anyway).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LIMITS", "NodeRates", "RateSettings"]

#: The label values of ``stratoscope_regional_throttled_batches_total``.
LIMITS = ("batches", "bytes", "cpu")


@dataclass(frozen=True)
class RateSettings:
    """Per node; 0 disables a limit."""

    batches_per_s: float = 50.0
    bytes_per_s: float = 32 * 1024 * 1024
    #: seconds of the ingest process's CPU per second (a fraction of one core)
    cpu_per_s: float = 0.1
    burst_s: float = 10.0
    max_nodes: int = 65_536


class _Bucket:
    __slots__ = ("batches", "bytes", "cpu", "t")

    def __init__(self, batches: float, nbytes: float, cpu: float, t: float) -> None:
        self.batches = batches
        self.bytes = nbytes
        self.cpu = cpu
        self.t = t


class NodeRates:
    """Token buckets per node (see the module docstring)."""

    def __init__(self, settings: RateSettings | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or RateSettings()
        self.clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        #: nodes forgotten to stay under max_nodes
        self.evicted = 0

    @property
    def enabled(self) -> bool:
        s = self.settings
        return bool(s.batches_per_s or s.bytes_per_s or s.cpu_per_s)

    def take(self, node: str, size: int) -> str:
        """Charge one batch of ``size`` bytes to ``node``: "" if it may pass, else the
        limit it is over (one of LIMITS; nothing is charged then)."""
        s = self.settings
        if not self.enabled:
            return ""
        now = self.clock()
        b = self._buckets.get(node)
        cap_batches, cap_bytes = s.batches_per_s * s.burst_s, s.bytes_per_s * s.burst_s
        cap_cpu = s.cpu_per_s * s.burst_s
        if b is None:
            b = self._buckets[node] = _Bucket(cap_batches, cap_bytes, cap_cpu, now)
            if len(self._buckets) > s.max_nodes:
                self._buckets.popitem(last=False)
                self.evicted += 1
        else:
            self._buckets.move_to_end(node)
            self._refill(b, now)
        if s.batches_per_s and b.batches < 1:
            return "batches"
        if s.cpu_per_s and b.cpu <= 0:
            return "cpu"
        # a batch larger than the whole burst passes when the bucket is full (else it
        # could never pass): the bucket goes negative and the node waits it out
        if s.bytes_per_s and b.bytes < min(size, cap_bytes):
            return "bytes"
        b.batches -= 1
        b.bytes -= size
        return ""

    def _refill(self, b: _Bucket, now: float) -> None:
        s = self.settings
        dt = max(0.0, now - b.t)
        b.batches = min(s.batches_per_s * s.burst_s, b.batches + dt * s.batches_per_s)
        b.bytes = min(s.bytes_per_s * s.burst_s, b.bytes + dt * s.bytes_per_s)
        b.cpu = min(s.cpu_per_s * s.burst_s, b.cpu + dt * s.cpu_per_s)
        b.t = now

    def charge_cpu(self, node: str, seconds: float) -> None:
        """Charge ``seconds`` of CPU that ``node``'s batch took, after :meth:`take` let it
        pass (the bucket may go below zero: the node then waits until it refills)."""
        if not self.settings.cpu_per_s:
            return
        b = self._buckets.get(node)
        if b is not None:
            self._refill(b, self.clock())
            b.cpu -= seconds

    def __len__(self) -> int:
        return len(self._buckets)
