"""Admission of a batch from its identity first, then whole: what the ingest process runs.

A module of its own because it crosses a process boundary: the ingest child imports
this and the gRPC server, not the merge, the delivery queues or the sinks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc

from stratoscope.regional.auth import Refused
from stratoscope.regional.batchcols import BatchCols
from stratoscope.regional.dedup import Deduplicator
from stratoscope.regional.ratelimit import NodeRates, RateSettings
from stratoscope.regional.validate import (
    BatchRejected,
    Limits,
    check_identity,
    open_batch,
    validate,
)
from stratoscope.v1 import batch_pb2 as pb
from stratoscope.v1 import ingest_pb2

__all__ = ["Gate", "RejectionLog", "shown"]

log = logging.getLogger("stratoscope.regional")


def shown(text: str, width: int = 48) -> str:
    """Client-sent text as a log may show it: ASCII-escaped (no newlines, terminal escapes
    or bidirectional marks) and cut to ``width`` characters (a node_id not yet validated
    may be megabytes)."""
    return ascii(text[:width]) + ("..." if len(text) > width else "")


class RejectionLog:
    """Logs rejections at most once per reason per ``every_s``; the lines held back are
    counted into the next one. A client sending invalid batches as fast as it can costs
    the log one line per reason per interval, not one per batch."""

    def __init__(self, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log) -> None:
        self.every_s = every_s
        self.clock = clock
        self.logger = logger
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def rejected(self, reason: str, node_id: str, seq: int, message: str) -> None:
        """``message`` must say nothing the client chose but numbers (BatchRejected's
        texts); ``node_id`` is shown escaped and cut."""
        now = self.clock()
        last = self._last.get(reason)
        if last is not None and now - last < self.every_s:
            self._held[reason] = self._held.get(reason, 0) + 1
            return
        self._last[reason] = now
        held = self._held.pop(reason, 0)
        more = f" ({held} more rejected for {reason} in the last {now - last:.0f}s)" if held and last is not None else ""
        self.logger.warning("rejected batch (%s) from node %s seq %d: %s%s", reason, shown(node_id),
                            seq, message, more)


class Gate:
    """Admission of one batch: identity, de-duplication, backpressure, the node's rate
    limits (regional/ratelimit.py), validation.

    Pure (no metrics, no merge) so that it runs where the gRPC server runs: in the
    ingest process (regional/ingest.py), which imports only this, the server, the
    validation and the hand-over.
    ``backlog`` is the largest sink backlog in blocks, kept current by the owner.
    """

    def __init__(self, limits: Limits | None = None, clock: Callable[[], int] = time.time_ns,
                 max_queued_blocks: int = 50_000,
                 saturated: Callable[[], bool] = lambda: False,
                 rates: RateSettings | None = None) -> None:
        """``saturated``: an extra reason to answer RETRY, asked per batch (e.g. the
        hand-over queue to the merge is full)."""
        self.limits = limits or Limits()
        self.rates = NodeRates(rates)
        self.clock = clock
        self.dedup = Deduplicator()
        self.rejections = RejectionLog()
        self.max_queued_blocks = max_queued_blocks
        self.backlog = 0
        self.saturated = saturated
        #: The merge holds as many points in memory as it may (Regional.max_held_points),
        #: kept current by the owner like ``backlog``.
        self.held_full = False
        #: The owner drains windows and takes no new batch until it is done (RETRY).
        self.closed = False
        #: The write-ahead log is near its size bound (RETRY until sinks catch up).
        self.log_full = False

    def admit(self, batch: pb.Batch, peer: frozenset[str] | None, size: int | None
              ) -> tuple[ingest_pb2.Ack, BatchCols | None, str]:
        """(ack, columns if ACCEPTED, label for metrics: one of validate.REASONS for a
        REJECTED, one of ratelimit.LIMITS for a RETRY of a node over its rate, else "").

        ``peer``: the node names the stream authenticated as (regional/auth.py; None:
        no authentication). A node_id outside them raises auth.Refused
        (PERMISSION_DENIED): the stream ends, the batch stays with its edge."""
        try:  # before anything keys on the identity (the dedup state, the log line)
            check_identity(batch.node_id, batch.boot_id, self.limits)
        except BatchRejected as exc:
            self.rejections.rejected(exc.reason, batch.node_id, batch.seq, str(exc))
            ack = ingest_pb2.Ack(seq=batch.seq, status=ingest_pb2.Ack.REJECTED, reason=str(exc))
            return ack, None, exc.reason
        if peer is not None and batch.node_id not in peer:
            shown_peer = shown(",".join(sorted(peer)))
            self.rejections.rejected("node_mismatch", batch.node_id, batch.seq,
                                     f"node_id is not one this client authenticated as ({shown_peer})")
            raise Refused("node_mismatch", grpc.StatusCode.PERMISSION_DENIED,
                          f"node_id {shown(batch.node_id)} is not one this client authenticated as "
                          f"({shown_peer})")
        ack = ingest_pb2.Ack(boot_id=batch.boot_id, seq=batch.seq)
        # Cheap answers first: a duplicate or a RETRY needs no inflating or validation
        # (an edge told to retry resends the same batch; validating it every time would
        # make an overloaded regional spend its CPU on batches it refuses).
        if self.dedup.seen(batch.node_id, batch.boot_id, batch.seq):
            ack.status = ingest_pb2.Ack.DUPLICATE
            return ack, None, ""
        if self.backlog >= self.max_queued_blocks or self.saturated():
            ack.status = ingest_pb2.Ack.RETRY
            ack.reason = "regional overloaded: sinks are behind"
            return ack, None, ""
        if self.log_full:
            ack.status = ingest_pb2.Ack.RETRY
            ack.reason = "regional overloaded: its write-ahead log is near its size bound"
            return ack, None, ""
        if self.closed:
            ack.status = ingest_pb2.Ack.RETRY
            ack.reason = "regional is draining its windows"
            return ack, None, ""
        if self.held_full:
            ack.status = ingest_pb2.Ack.RETRY
            ack.reason = "regional overloaded: windows in memory are at their limit (max held points or bytes)"
            return ack, None, ""
        over = self.rates.take(batch.node_id, size or batch.ByteSize())
        if over:
            self.rejections.rejected("throttled", batch.node_id, batch.seq,
                                     f"over its rate limit ({over} per second): answered RETRY")
            ack.status = ingest_pb2.Ack.RETRY
            ack.reason = f"this node is over its rate limit ({over} per second)"
            return ack, None, over
        cpu0 = time.thread_time()
        try:
            whole, inflated = open_batch(batch, self.limits)
            cols = validate(whole, self.limits, self.clock(), inflated if inflated >= 0 else size)
        except BatchRejected as exc:
            self.rates.charge_cpu(batch.node_id, time.thread_time() - cpu0)
            self.rejections.rejected(exc.reason, batch.node_id, batch.seq, str(exc))
            ack.status = ingest_pb2.Ack.REJECTED
            ack.reason = str(exc)
            return ack, None, exc.reason
        self.rates.charge_cpu(batch.node_id, time.thread_time() - cpu0)
        self.dedup.add(batch.node_id, batch.boot_id, batch.seq)
        ack.status = ingest_pb2.Ack.ACCEPTED
        return ack, cols, ""
