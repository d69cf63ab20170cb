"""The one interface every sink implements, and its error classes.

A *block* is a merged stratoscope.v1.Batch produced by the regional: node_id is
the node ("" for a roll-up across nodes), [start_ns, end_ns) is the output
window, and ``block_id`` is a stable identity derived from the regional's
flush (same content -> same id), used as the idempotency key downstream
(ClickHouse insert_deduplication_token, Kafka header).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from stratoscope.v1 import batch_pb2 as pb

if TYPE_CHECKING:
    from stratoscope.regional.frame import Frame


class Block:
    """One node's merged rows of one window (or the roll-up, node_id "").

    Blocks from the merge are *parts* of a shared columnar ``Frame`` (regional/frame.py):
    sinks that store rows read ``frame`` directly; ``batch`` builds the protobuf on
    demand (not cached: a queued block then holds no per-node copy). A Block can also
    be made from a protobuf alone (read back from Kafka, or in tests).
    """

    __slots__ = ("block_id", "resolution_s", "frame", "part", "_batch")

    def __init__(self, block_id: str, batch: pb.Batch | None = None, resolution_s: int = 60,
                 *, frame: Frame | None = None, part: int = -1) -> None:
        if batch is None and frame is None:
            raise ValueError("a Block needs a batch or a frame")
        self.block_id = block_id
        self.resolution_s = resolution_s
        self.frame = frame
        self.part = part
        self._batch = batch

    @property
    def batch(self) -> pb.Batch:
        if self._batch is not None:
            return self._batch
        assert self.frame is not None
        return self.frame.batch_for(self.part)

    def __repr__(self) -> str:
        return f"Block({self.block_id!r}, resolution_s={self.resolution_s})"


class SinkError(Exception):
    """Base of sink failures."""


class RetriableError(SinkError):
    """Delivery may succeed if repeated (timeout, broker unavailable, server overloaded)."""


class PermanentError(SinkError):
    """Delivery will never succeed for this block (rejected schema, invalid data)."""


@runtime_checkable
class Sink(Protocol):
    name: str

    async def start(self) -> None:
        """Connect and prepare (e.g. apply migrations). Raises SinkError."""

    async def stop(self) -> None:
        """Flush and disconnect. Idempotent; safe without start()."""

    async def health_check(self) -> None:
        """Raise SinkError with a readable reason if the sink cannot accept data."""

    async def deliver(self, blocks: list[Block]) -> None:
        """Deliver blocks; must be idempotent per block_id (retries are expected).

        Raises RetriableError or PermanentError.
        """
