"""The one interface every sink implements, and its error classes.

A *block* is a merged stratoscope.v1.Batch produced by the regional: node_id is
the node ("" for a roll-up across nodes), [start_ns, end_ns) is the output
window, and ``block_id`` is a stable identity derived from the regional's
flush (same content -> same id), used as the idempotency key downstream
(ClickHouse insert_deduplication_token, Kafka header).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from stratoscope.v1 import batch_pb2 as pb


@dataclass(frozen=True)
class Block:
    block_id: str
    batch: pb.Batch
    #: Output resolution in seconds (e.g. 60): where the block's rows are stored.
    resolution_s: int


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
