"""The one interface every sink implements, and its error classes.

A sink delivers ``Block``s: parts of the merge's ``Frame``s (regional/frame.py), one
node's merged rows of one output window each (node "" is the roll-up across nodes).
``block_id`` is the idempotency key: a sink must be able to take the same block again
(a retry, a restart, a replay of the regional's log) without counting it twice.

Every block a sink is given is *acknowledged data* (the regional's log keeps it until
every sink is done with it), so no error may make it vanish. Errors tell the delivery
queue what to do:

- ``RetriableError`` -- try the same blocks again later (timeout, broker unavailable,
  server overloaded).
- ``BlockedError`` (a ``RetriableError``) -- the backend refuses every write until a
  person fixes something (credentials, a read-only store, a missing table or topic,
  too many parts, a full disk). Retried forever; ``reason`` is one of
  ``BLOCKED_REASONS`` (the label of ``stratoscope_regional_sink_blocked``).
- ``PermanentError`` -- these blocks will never be accepted and the sink could not
  tell which of them is at fault. A sink that can isolate a bad block writes it to its
  dead-letter directory (regional/sinks/deadletter.py) instead and returns its id
  from ``deliver``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from stratoscope.regional.frame import Block

__all__ = [
    "BLOCKED_REASONS", "BlockedError", "PermanentError", "RetriableError", "Sink", "SinkError",
]

#: Why a sink's queue is not delivering: the fixed label values of
#: ``stratoscope_regional_sink_blocked{sink,reason}``. The first five need a person
#: (``auth``: credentials or grants; ``readonly``: a read-only store or user;
#: ``missing``: a table, database or topic that does not exist; ``too_many_parts``:
#: ClickHouse refuses inserts until merges catch up; ``disk_full``); ``unavailable``:
#: the backend does not answer or fails transiently (any other RetriableError, a timeout).
BLOCKED_REASONS = ("auth", "readonly", "missing", "too_many_parts", "disk_full", "unavailable")


class SinkError(Exception):
    """Base of sink failures. Sinks raise one of its subclasses."""


class RetriableError(SinkError):
    """Delivery may succeed if repeated (timeout, broker unavailable, server overloaded)."""


class BlockedError(RetriableError):
    """The backend refuses every write until a person fixes something; retried forever."""

    def __init__(self, message: str, reason: str) -> None:
        if reason not in BLOCKED_REASONS:
            raise ValueError(f"unknown blocked reason {reason!r} (one of {', '.join(BLOCKED_REASONS)})")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[BlockedError], tuple[str, str]]:
        return (BlockedError, (str(self), self.reason))


class PermanentError(SinkError):
    """Delivery will never succeed for these blocks (rejected schema, invalid data)."""


@runtime_checkable
class Sink(Protocol):
    name: str

    async def start(self) -> None:
        """Connect and prepare (e.g. apply migrations). Idempotent. Raises SinkError."""

    async def stop(self) -> None:
        """Flush and disconnect. Idempotent; safe without start()."""

    async def health_check(self) -> None:
        """Raise SinkError with a readable reason if the sink cannot accept data."""

    async def deliver(self, blocks: list[Block]) -> Sequence[str] | None:
        """Deliver blocks; must be idempotent per block_id (retries are expected).

        Returns the ids of the blocks it wrote to its dead-letter directory instead
        (they can never be stored; every other block was), or None / empty when every
        block was stored. Raises RetriableError (BlockedError) or PermanentError, in
        which case no block of the call counts as done.
        """
