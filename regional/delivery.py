"""The one delivery wrapper every sink runs behind: queue, batch, timeout, retry.

Like the OpenTelemetry exporter helper (and vector's sink chain), a plain
``Sink.deliver(blocks)`` becomes a component that never blocks its caller::

    put(blocks) -> bounded queue -> batch (size or time) -> deliver under a timeout
                                                         -> retry with backoff / drop

- **Queue.** ``put()`` only appends. When more than ``max_queue_blocks`` blocks are
  waiting, the *oldest* waiting blocks are dropped (fresh data is worth more than old
  data in a monitoring pipeline), counted in ``dropped`` and logged at most once per
  ``log_interval_s``. Blocks being delivered (at most ``batch_max_blocks``) are not
  part of that bound.
- **Batch.** The worker takes up to ``batch_max_blocks`` blocks as soon as that many
  are waiting, or whatever is waiting once the oldest block has waited
  ``batch_max_wait_s``; ``flush()`` and ``stop()`` send without waiting.
- **Deliver.** ``sink.deliver(batch)`` runs under ``asyncio.wait_for(timeout_s)``.
  ``RetriableError`` and timeouts are retried with jittered exponential backoff
  (``backoff_initial_s`` doubling up to ``backoff_max_s``, times a random factor in
  [0.5, 1.5), capped at ``backoff_max_s``), at most ``max_retries`` times (``None``:
  until it succeeds or the queue stops). A retry re-delivers the *same* blocks, so the
  sink's per-block_id idempotency applies. ``PermanentError`` -- and any other
  exception, which is a bug in the sink and logged with its traceback -- drops the
  batch, counted in ``failed``.

Counters are plain attributes, in blocks unless noted: ``delivered``, ``failed``,
``dropped``, ``retried`` (retry attempts of a batch), ``queued`` (property: blocks
waiting or in delivery), ``last_delivery_latency_s`` (duration of the last successful
``deliver`` call) and ``last_end_to_end_latency_s`` (from the oldest block's ``put`` to
its acknowledgement). ``on_drop(blocks, reason)`` is called for every block that will
not be delivered (overflow, permanent failure, retries exhausted, shutdown).

The queue owns the sink's lifecycle: ``start()`` starts the sink (and, with
``health_check``, runs its health check before anything is queued to it) and
``stop()`` stops it; nobody else starts or stops a queued sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable

from stratoscope.regional.frame import Block
from stratoscope.regional.sinks.base import PermanentError, RetriableError, Sink

__all__ = ["DeliveryQueue", "OnDrop"]

log = logging.getLogger(__name__)

OnDrop = Callable[[list[Block], str], None]


class _RateLimitedLog:
    """Logs at most once per interval, reporting how many events it folded."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = -float("inf")
        self._pending = 0

    def __call__(self, n: int, msg: str, *args: object) -> None:
        self._pending += n
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        log.warning(msg + " (%d block(s) since the last report)", *args, self._pending)
        self._last = now
        self._pending = 0


class DeliveryQueue:
    """Bounded, batching, retrying delivery in front of one Sink (see module docstring)."""

    def __init__(
        self,
        sink: Sink,
        *,
        max_queue_blocks: int = 10_000,
        batch_max_blocks: int = 100,
        batch_max_wait_s: float = 1.0,
        timeout_s: float = 30.0,
        max_retries: int | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        on_drop: OnDrop | None = None,
        stop_timeout_s: float | None = None,
        log_interval_s: float = 10.0,
        health_check: bool = False,
        on_done: Callable[[list[Block]], None] | None = None,
    ) -> None:
        if max_queue_blocks < 1:
            raise ValueError(f"max_queue_blocks must be >= 1, got {max_queue_blocks}")
        if batch_max_blocks < 1:
            raise ValueError(f"batch_max_blocks must be >= 1, got {batch_max_blocks}")
        if batch_max_wait_s < 0:
            raise ValueError(f"batch_max_wait_s must be >= 0, got {batch_max_wait_s}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries is not None and max_retries < 0:
            raise ValueError(f"max_retries must be >= 0 or None, got {max_retries}")
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError(
                "need 0 < backoff_initial_s <= backoff_max_s, got "
                f"{backoff_initial_s} and {backoff_max_s}"
            )
        self.sink = sink
        self.max_queue_blocks = max_queue_blocks
        self.batch_max_blocks = batch_max_blocks
        self.batch_max_wait_s = batch_max_wait_s
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.on_drop = on_drop
        #: Called with every batch of blocks the sink has for good (delivered).
        self.on_done = on_done
        #: Whether start() runs the sink's health check (a failing one raises from start()).
        self.health_check = health_check
        #: How long stop() keeps delivering what is queued before it gives up.
        self.stop_timeout_s = timeout_s if stop_timeout_s is None else stop_timeout_s

        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self.retried = 0
        self.last_delivery_latency_s: float | None = None
        self.last_end_to_end_latency_s: float | None = None

        # (sequence number, time.monotonic() of put, block), oldest first.
        self._queue: deque[tuple[int, float, Block]] = deque()
        self._inflight: list[tuple[int, float, Block]] = []
        self._next_seq = 0
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Event()
        self._urgent = 0  # flush() callers waiting: send without waiting for the batch
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_task: asyncio.Task[None] | None = None
        self._drop_log = _RateLimitedLog(log_interval_s)
        self._rng = random.Random()

    @property
    def queued(self) -> int:
        """Blocks not yet delivered nor dropped: waiting plus in delivery."""
        return len(self._queue) + len(self._inflight)

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the sink (and check its health), then the delivery task. Idempotent;
        raises the sink's error (stop() then still stops the sink)."""
        if self._stopping:
            raise RuntimeError(f"delivery queue of sink {self.sink.name!r} is stopped")
        if self._task is not None:
            return
        await self.sink.start()
        if self.health_check:
            await self.sink.health_check()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"delivery-{self.sink.name}"
        )

    @property
    def running(self) -> bool:
        """Whether a delivery task is draining the queue (started and not stopping)."""
        return self._task is not None and not self._stopping

    async def stop(self) -> None:
        """Deliver what is queued for up to ``stop_timeout_s``, drop the rest, stop the sink.

        Idempotent (a second or concurrent call waits for the first); safe without start().
        """
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self._stop())
        await asyncio.shield(self._stop_task)

    async def _stop(self) -> None:
        self._stopping = True
        task = self._task
        if task is not None and task.done() and not task.cancelled() and task.exception():
            log.error(
                "delivery task of sink %s had crashed", self.sink.name, exc_info=task.exception()
            )
        elif task is not None and not task.done():
            try:
                await asyncio.wait_for(self.flush(), self.stop_timeout_s)
            except TimeoutError:
                log.warning(
                    "sink %s: %d block(s) still undelivered after %gs at shutdown",
                    self.sink.name, self.queued, self.stop_timeout_s,
                )
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        leftover = [b for _, _, b in self._inflight] + [b for _, _, b in self._queue]
        self._inflight = []
        self._queue.clear()
        if leftover:
            self.dropped += len(leftover)
            log.warning(
                "sink %s: dropped %d undelivered block(s) at shutdown",
                self.sink.name, len(leftover),
            )
            self._dropped_blocks(leftover, "shutdown")
        self._signal()
        try:
            await self.sink.stop()
        except Exception:
            log.exception("sink %s did not stop cleanly", self.sink.name)

    # --- input -------------------------------------------------------------------

    async def put(self, blocks: Iterable[Block]) -> None:
        """Queue blocks; never waits for the sink. Drops the oldest when full."""
        new = list(blocks)
        if not new:
            return
        if self._stopping:
            self.dropped += len(new)
            self._drop_log(len(new), "sink %s: queue is stopped, dropping blocks", self.sink.name)
            self._dropped_blocks(new, "queue stopped")
            return
        now = time.monotonic()
        for b in new:
            self._queue.append((self._next_seq, now, b))
            self._next_seq += 1
        excess = len(self._queue) - self.max_queue_blocks
        if excess > 0:
            old = [self._queue.popleft()[2] for _ in range(excess)]
            self.dropped += excess
            self._drop_log(
                excess, "sink %s: queue full (%d blocks), dropping the oldest",
                self.sink.name, self.max_queue_blocks,
            )
            self._dropped_blocks(old, "queue full")
        self._wakeup.set()

    async def flush(self) -> None:
        """Wait until every block put so far is delivered, failed or dropped.

        Blocks put while waiting are sent at once too, but not waited for.
        """
        upto = self._next_seq
        if self._done_upto(upto):
            return
        if self._task is None or self._task.done():
            raise RuntimeError(
                f"delivery queue of sink {self.sink.name!r} is not running: "
                f"{self.queued} block(s) cannot be flushed"
            )
        self._urgent += 1
        try:
            while not self._done_upto(upto):
                progress = self._progress
                self._wakeup.set()
                await progress.wait()
        finally:
            self._urgent -= 1

    # --- worker ------------------------------------------------------------------

    def _done_upto(self, seq: int) -> bool:
        """No block with a sequence number below ``seq`` is waiting or in delivery."""
        return (not self._inflight or self._inflight[0][0] >= seq) and (
            not self._queue or self._queue[0][0] >= seq
        )

    def _signal(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    def _dropped_blocks(self, blocks: list[Block], reason: str) -> None:
        if self.on_drop is None:
            return
        try:
            self.on_drop(blocks, reason)
        except Exception:
            log.exception("on_drop callback of sink %s failed", self.sink.name)

    async def _run(self) -> None:
        while True:
            await self._next_batch()
            await self._deliver(self._inflight)
            self._inflight = []
            self._signal()

    async def _next_batch(self) -> None:
        """Move the next batch from the queue to ``_inflight``."""
        while True:
            timeout: float | None = None
            if self._queue:
                if len(self._queue) >= self.batch_max_blocks or self._urgent or self._stopping:
                    break
                timeout = self._queue[0][1] + self.batch_max_wait_s - time.monotonic()
                if timeout <= 0:
                    break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
        n = min(len(self._queue), self.batch_max_blocks)
        self._inflight = [self._queue.popleft() for _ in range(n)]

    def _backoff(self, attempt: int) -> float:
        base = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt - 1))
        return min(self.backoff_max_s, base * self._rng.uniform(0.5, 1.5))

    async def _deliver(self, items: list[tuple[int, float, Block]]) -> None:
        blocks = [b for _, _, b in items]
        attempt = 0
        while True:
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(self.sink.deliver(blocks), self.timeout_s)
            except RetriableError as exc:
                reason = str(exc) or type(exc).__name__
            except TimeoutError:
                reason = f"delivery timed out after {self.timeout_s:g}s"
            except PermanentError as exc:
                self._fail(blocks, f"rejected: {exc}")
                return
            except Exception as exc:
                log.exception("sink %s raised an unexpected error", self.sink.name)
                self._fail(blocks, f"unexpected {type(exc).__name__}: {exc}")
                return
            else:
                now = time.monotonic()
                self.delivered += len(blocks)
                if self.on_done is not None:
                    try:
                        self.on_done(blocks)
                    except Exception:
                        log.exception("on_done callback of sink %s failed", self.sink.name)
                self.last_delivery_latency_s = now - t0
                self.last_end_to_end_latency_s = now - min(t for _, t, _ in items)
                if attempt:
                    log.info(
                        "sink %s: delivered %d block(s) after %d retr%s",
                        self.sink.name, len(blocks), attempt, "y" if attempt == 1 else "ies",
                    )
                return
            attempt += 1
            if self.max_retries is not None and attempt > self.max_retries:
                self._fail(blocks, f"gave up after {attempt} attempt(s): {reason}")
                return
            delay = self._backoff(attempt)
            self.retried += 1
            log.warning(
                "sink %s: delivery of %d block(s) failed (%s); retry %d in %.2fs",
                self.sink.name, len(blocks), reason, attempt, delay,
            )
            await asyncio.sleep(delay)

    def _fail(self, blocks: list[Block], reason: str) -> None:
        self.failed += len(blocks)
        ids = ", ".join(b.block_id for b in blocks[:5]) + (" ..." if len(blocks) > 5 else "")
        log.error(
            "sink %s: dropping %d block(s) [%s]: %s", self.sink.name, len(blocks), ids, reason
        )
        self._dropped_blocks(blocks, reason)
