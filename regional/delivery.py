"""The one delivery wrapper every sink runs behind: queue, batch, timeout, retry.

Like the OpenTelemetry exporter helper (and vector's sink chain), a plain
``Sink.deliver(blocks)`` becomes a component in front of the sink::

    await put(blocks) -> bounded queue (backpressure) -> whole frames per batch
        -> deliver under a timeout -> retry with backoff -> on_done(blocks)

Every block put here is *acknowledged data*: the regional's write-ahead log keeps the
batches it came from until every sink's queue has called ``on_done`` for every block
derived from them. So the queue never drops a block:

- **Queue, backpressure.** ``put()`` waits (while the queue runs) until the blocks fit
  under ``max_queue_blocks`` (a put into an empty queue always fits, however large).
  Blocks being delivered count toward the bound. ``backpressure_waits`` counts the puts
  that had to wait.
- **Batch: whole frames.** The worker takes the oldest waiting block's frame -- every
  waiting block of that frame -- and then further whole frames while the batch stays
  within ``batch_max_blocks`` (one frame larger than that goes alone). It does so as
  soon as ``batch_max_blocks`` blocks are waiting, or once the oldest block has waited
  ``batch_max_wait_s``; ``flush()`` and ``stop()`` send without waiting. A frame's blocks
  are never split across deliveries, so a sink whose idempotency key covers a frame
  (ClickHouse's insert token) sees the same groups on a retry and on a replay.
- **Deliver.** ``sink.deliver(batch)`` runs under ``asyncio.wait_for(timeout_s)``.
  ``RetriableError`` and timeouts are retried with jittered exponential backoff
  (``backoff_initial_s`` doubling up to ``backoff_max_s``, times a random factor in
  [0.5, 1.5), capped at ``backoff_max_s``), at most ``max_retries`` times (``None``:
  until it succeeds or the queue stops); a ``BlockedError`` (the backend needs a
  person: credentials, read-only, missing table, too many parts, full disk) is retried
  forever whatever ``max_retries`` says. A retry re-delivers the *same* blocks.
  While a delivery fails, ``blocked_reason`` is one of ``BLOCKED_REASONS`` (cleared by
  the next success). ``deliver`` returns the ids of blocks the sink wrote to its
  dead-letter directory (data it can never store): they are counted in
  ``dead_lettered`` and are done like the delivered ones.
- **Done.** ``on_done(blocks)`` is called once per block put, when the block no longer
  needs keeping: delivered or dead-lettered.
- **Failures.** A ``PermanentError`` -- or any other exception, a bug in the sink,
  logged with its traceback -- on a batch of several frames is retried frame by frame;
  a single frame that still fails, and a batch whose ``max_retries`` ran out, are
  counted in ``failed`` and logged with their block ids, and ``on_done`` is NOT called
  for them: they stay in the regional's log and come back after a restart.
- **Stop.** ``stop()`` delivers what it can within ``stop_timeout_s`` and then stops
  without calling ``on_done`` for the rest: counted in ``left_for_log`` (they are
  replayed from the log after a restart), not dropped.

Counters are plain attributes, in blocks unless noted: ``delivered``, ``dead_lettered``,
``failed``, ``left_for_log``, ``dropped`` (always 0 now: kept for the metric),
``retried`` (retry attempts of a batch), ``backpressure_waits`` (puts), ``queued``
(property: blocks waiting or in delivery), ``blocked_reason``, ``seconds_since_delivery``
(property: 0 when nothing waits, else the time since the last successful delivery or
since the oldest waiting block was put, whichever is later), ``last_delivery_latency_s``
and ``last_end_to_end_latency_s``. ``on_drop(blocks, reason)`` is still called for every
block this queue will not deliver (failed, or left for the log at stop).

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
from stratoscope.regional.sinks.base import (
    BLOCKED_REASONS,
    BlockedError,
    PermanentError,
    RetriableError,
    Sink,
)

__all__ = ["BLOCKED_REASONS", "DeliveryQueue", "OnDone", "OnDrop"]

log = logging.getLogger(__name__)

OnDrop = Callable[[list[Block], str], None]
OnDone = Callable[[list[Block]], None]

#: (sequence number, time.monotonic() of put, block)
_Item = tuple[int, float, Block]


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


def _frames(items: list[_Item]) -> list[list[_Item]]:
    """``items`` grouped by frame, in order of each frame's first item."""
    groups: dict[int, list[_Item]] = {}
    for it in items:
        groups.setdefault(id(it[2].frame), []).append(it)
    return list(groups.values())


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
        on_done: OnDone | None = None,
        stop_timeout_s: float | None = None,
        log_interval_s: float = 10.0,
        health_check: bool = False,
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
        #: Called with the blocks that need no keeping any more (delivered or dead-lettered).
        self.on_done = on_done
        #: Whether start() runs the sink's health check (a failing one raises from start()).
        self.health_check = health_check
        #: How long stop() keeps delivering what is queued before it gives up.
        self.stop_timeout_s = timeout_s if stop_timeout_s is None else stop_timeout_s

        self.delivered = 0
        self.dead_lettered = 0
        self.failed = 0
        self.dropped = 0  # nothing is dropped any more; kept for the exported metric
        self.left_for_log = 0
        self.retried = 0
        self.backpressure_waits = 0
        #: Why deliveries are failing right now (one of BLOCKED_REASONS), None while they succeed.
        self.blocked_reason: str | None = None
        self.last_delivery_latency_s: float | None = None
        self.last_end_to_end_latency_s: float | None = None
        self._last_success = time.monotonic()

        self._queue: deque[_Item] = deque()
        self._inflight: list[_Item] = []
        self._next_seq = 0
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Event()
        self._urgent = 0  # flush() callers waiting: send without waiting for the batch
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_task: asyncio.Task[None] | None = None
        self._left_log = _RateLimitedLog(log_interval_s)
        self._rng = random.Random()

    @property
    def queued(self) -> int:
        """Blocks not yet done: waiting plus in delivery."""
        return len(self._queue) + len(self._inflight)

    @property
    def blocked(self) -> dict[str, int]:
        """1 for the reason deliveries fail now, 0 for every other of BLOCKED_REASONS."""
        return {r: int(r == self.blocked_reason) for r in BLOCKED_REASONS}

    @property
    def seconds_since_delivery(self) -> float:
        """0 when nothing waits; else how long blocks have waited without a successful
        delivery: since the last success or the oldest waiting block's put, the later."""
        heads = [t for _, t, _ in self._inflight] + ([self._queue[0][1]] if self._queue else [])
        if not heads:
            return 0.0
        return max(0.0, time.monotonic() - max(self._last_success, min(heads)))

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
        self._last_success = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"delivery-{self.sink.name}"
        )

    @property
    def running(self) -> bool:
        """Whether a delivery task is draining the queue (started and not stopping)."""
        return self._task is not None and not self._stopping

    async def stop(self) -> None:
        """Deliver what is queued for up to ``stop_timeout_s``, leave the rest for the
        log (no ``on_done``), stop the sink.

        Idempotent (a second or concurrent call waits for the first); safe without start().
        """
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self._stop())
        await asyncio.shield(self._stop_task)

    async def _stop(self) -> None:
        self._stopping = True
        self._signal()  # puts waiting for room stop waiting
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
            self.left_for_log += len(leftover)
            log.warning(
                "sink %s: %d undelivered block(s) left for the log at shutdown "
                "(replayed after a restart)", self.sink.name, len(leftover),
            )
            self._dropped_blocks(leftover, "left for the log at shutdown")
        self._signal()
        try:
            await self.sink.stop()
        except Exception:
            log.exception("sink %s did not stop cleanly", self.sink.name)

    # --- input -------------------------------------------------------------------

    def _full(self, n: int) -> bool:
        return bool(self.queued) and self.queued + n > self.max_queue_blocks

    async def put(self, blocks: Iterable[Block]) -> None:
        """Queue blocks, waiting while the queue runs and they do not fit under
        ``max_queue_blocks``. Put the blocks of one frame in one call.

        Into a stopped queue nothing is put: the blocks are counted in ``left_for_log``
        (the log replays them after a restart) and ``on_done`` is not called.
        """
        new = list(blocks)
        if not new:
            return
        if self.running and self._full(len(new)):
            self.backpressure_waits += 1
            while self.running and self._full(len(new)):
                await self._progress.wait()
        if self._stopping:
            self.left_for_log += len(new)
            self._left_log(len(new), "sink %s: queue is stopped, blocks left for the log",
                           self.sink.name)
            self._dropped_blocks(new, "queue stopped: left for the log")
            return
        now = time.monotonic()
        for b in new:
            self._queue.append((self._next_seq, now, b))
            self._next_seq += 1
        self._wakeup.set()

    async def flush(self) -> None:
        """Wait until every block put so far is delivered, dead-lettered or failed.

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
        return all(s >= seq for s, _, _ in self._inflight) and (
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

    def _done(self, blocks: list[Block]) -> None:
        if self.on_done is None:
            return
        try:
            self.on_done(blocks)
        except Exception:
            log.exception("on_done callback of sink %s failed", self.sink.name)

    async def _run(self) -> None:
        while True:
            await self._next_batch()
            await self._deliver(list(self._inflight))
            self._inflight = []
            self._signal()

    async def _next_batch(self) -> None:
        """Move the next batch -- whole frames -- from the queue to ``_inflight``."""
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
        taken: list[_Item] = []
        for group in _frames(list(self._queue)):
            if taken and len(taken) + len(group) > self.batch_max_blocks:
                break
            taken.extend(group)
        if len(taken) == len(self._queue):
            self._queue.clear()
        else:
            chosen = {s for s, _, _ in taken}
            self._queue = deque(it for it in self._queue if it[0] not in chosen)
        self._inflight = sorted(taken, key=lambda it: it[0])

    def _backoff(self, attempt: int) -> float:
        base = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt - 1))
        return min(self.backoff_max_s, base * self._rng.uniform(0.5, 1.5))

    async def _deliver(self, items: list[_Item]) -> None:
        blocks = [b for _, _, b in items]
        attempt = 0
        while True:
            t0 = time.monotonic()
            blocked = "unavailable"
            try:
                dead = await asyncio.wait_for(self.sink.deliver(blocks), self.timeout_s)
            except BlockedError as exc:
                reason = str(exc) or type(exc).__name__
                blocked = exc.reason
            except RetriableError as exc:
                reason = str(exc) or type(exc).__name__
            except TimeoutError:
                reason = f"delivery timed out after {self.timeout_s:g}s"
            except PermanentError as exc:
                await self._permanent(items, f"rejected: {exc}")
                return
            except Exception as exc:
                log.exception("sink %s raised an unexpected error", self.sink.name)
                await self._permanent(items, f"unexpected {type(exc).__name__}: {exc}")
                return
            else:
                self._success(items, dead or (), time.monotonic() - t0, attempt)
                return
            attempt += 1
            self.blocked_reason = blocked
            if (blocked == "unavailable" and self.max_retries is not None
                    and attempt > self.max_retries):
                self._fail(blocks, f"gave up after {attempt} attempt(s): {reason}")
                return
            delay = self._backoff(attempt)
            self.retried += 1
            log.warning(
                "sink %s: delivery of %d block(s) failed (%s%s); retry %d in %.2fs",
                self.sink.name, len(blocks), reason,
                "" if blocked == "unavailable" else f"; blocked: {blocked}, needs fixing",
                attempt, delay,
            )
            await asyncio.sleep(delay)

    def _success(self, items: list[_Item], dead: Iterable[str], took_s: float, attempt: int) -> None:
        blocks = [b for _, _, b in items]
        dead_ids = set(dead)
        n_dead = sum(1 for b in blocks if b.block_id in dead_ids)
        now = time.monotonic()
        self.delivered += len(blocks) - n_dead
        self.dead_lettered += n_dead
        self.blocked_reason = None
        self._last_success = now
        self.last_delivery_latency_s = took_s
        self.last_end_to_end_latency_s = now - min(t for _, t, _ in items)
        if attempt:
            log.info(
                "sink %s: delivered %d block(s) after %d retr%s",
                self.sink.name, len(blocks), attempt, "y" if attempt == 1 else "ies",
            )
        self._done(blocks)

    async def _permanent(self, items: list[_Item], reason: str) -> None:
        """A permanent failure of ``items``: frame by frame if several, else failed."""
        groups = _frames(items)
        if len(groups) > 1:
            log.warning("sink %s: delivery of %d frames failed (%s); delivering them one by one",
                        self.sink.name, len(groups), reason)
            for group in groups:
                await self._deliver(group)
            return
        self._fail([b for _, _, b in items], reason)

    def _fail(self, blocks: list[Block], reason: str) -> None:
        self.failed += len(blocks)
        ids = ", ".join(b.block_id for b in blocks[:5]) + (" ..." if len(blocks) > 5 else "")
        log.error(
            "sink %s: giving up on %d block(s) [%s], left for the log (no on_done): %s",
            self.sink.name, len(blocks), ids, reason,
        )
        self._dropped_blocks(blocks, reason)
