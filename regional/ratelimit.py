"""Per-node rate limits at the gate: one noisy node is answered RETRY, the others are not.

Without them, one node (a bug, a replay storm, a hostile client) can take the ingest
process's CPU and keep the regional's held-data bound tripped, and the RETRY that bound
answers goes to every node. With them, a node past its share is answered RETRY (it keeps
its batches in its spool and backs off) and counted, before its batch is inflated or
validated; other nodes are unaffected.

Each node has two token buckets, batches and bytes (as received), refilled at the
configured rate and holding ``burst_s`` seconds of it: an edge catching up after an
outage sends as fast as its acks allow, and a burst lets a short outage's backlog
through at once. Buckets are kept for the most recently seen ``max_nodes`` nodes; a
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
LIMITS = ("batches", "bytes")


@dataclass(frozen=True)
class RateSettings:
    """Per node; 0 disables a limit."""

    batches_per_s: float = 50.0
    bytes_per_s: float = 32 * 1024 * 1024
    burst_s: float = 10.0
    max_nodes: int = 65_536


class _Bucket:
    __slots__ = ("batches", "bytes", "t")

    def __init__(self, batches: float, nbytes: float, t: float) -> None:
        self.batches = batches
        self.bytes = nbytes
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
        return bool(self.settings.batches_per_s or self.settings.bytes_per_s)

    def take(self, node: str, size: int) -> str:
        """Charge one batch of ``size`` bytes to ``node``: "" if it may pass, else the
        limit it is over (one of LIMITS; nothing is charged then)."""
        s = self.settings
        if not self.enabled:
            return ""
        now = self.clock()
        b = self._buckets.get(node)
        cap_batches, cap_bytes = s.batches_per_s * s.burst_s, s.bytes_per_s * s.burst_s
        if b is None:
            b = self._buckets[node] = _Bucket(cap_batches, cap_bytes, now)
            if len(self._buckets) > s.max_nodes:
                self._buckets.popitem(last=False)
                self.evicted += 1
        else:
            self._buckets.move_to_end(node)
            dt = max(0.0, now - b.t)
            b.batches = min(cap_batches, b.batches + dt * s.batches_per_s)
            b.bytes = min(cap_bytes, b.bytes + dt * s.bytes_per_s)
            b.t = now
        if s.batches_per_s and b.batches < 1:
            return "batches"
        # a batch larger than the whole burst passes when the bucket is full (else it
        # could never pass): the bucket goes negative and the node waits it out
        if s.bytes_per_s and b.bytes < min(size, cap_bytes):
            return "bytes"
        b.batches -= 1
        b.bytes -= size
        return ""

    def __len__(self) -> int:
        return len(self._buckets)
