"""The one interface every sink implements, and its error classes.

A sink delivers ``Block``s: parts of the merge's ``Frame``s (regional/frame.py), one
node's merged rows of one output window each (node "" is the roll-up across nodes).
``block_id`` is the idempotency key: a sink must be able to take the same block again
(a retry, a restart) without counting it twice.

Errors tell the delivery queue what to do: ``RetriableError`` -- try the same blocks
again later; ``PermanentError`` -- these blocks will never be accepted, drop them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from stratoscope.regional.frame import Block

__all__ = ["PermanentError", "RetriableError", "Sink", "SinkError"]


class SinkError(Exception):
    """Base of sink failures. Sinks raise one of its two subclasses: the delivery queue
    retries ``RetriableError`` and drops the blocks on anything else."""


class RetriableError(SinkError):
    """Delivery may succeed if repeated (timeout, broker unavailable, server overloaded)."""


class PermanentError(SinkError):
    """Delivery will never succeed for this block (rejected schema, invalid data)."""


@runtime_checkable
class Sink(Protocol):
    name: str

    async def start(self) -> None:
        """Connect and prepare (e.g. apply migrations). Idempotent. Raises SinkError."""

    async def stop(self) -> None:
        """Flush and disconnect. Idempotent; safe without start()."""

    async def health_check(self) -> None:
        """Raise SinkError with a readable reason if the sink cannot accept data."""

    async def deliver(self, blocks: list[Block]) -> None:
        """Deliver blocks; must be idempotent per block_id (retries are expected).

        Raises RetriableError or PermanentError.
        """
