"""DeliveryQueue against an in-memory sink: batching, retries, drops, lifecycle."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

import pytest

from stratoscope.regional.delivery import DeliveryQueue
from stratoscope.regional.frame import Block
from stratoscope.regional.sinks.base import PermanentError, RetriableError, Sink
from tests.frames import blank_blocks

# Scripted outcomes of FakeSink.deliver calls, in order (then: success).
STORE_THEN_RETRIABLE = "store-then-retriable"  # written, but the ack is lost
HANG = "hang"  # never returns (until cancelled)


class FakeSink:
    """Idempotent store keyed by block_id, with scripted failures."""

    name = "fake"

    def __init__(self, script: list[object] | None = None) -> None:
        self.script = list(script or [])
        self.store: dict[str, Block] = {}
        self.writes: Counter[str] = Counter()  # times each block reached the store
        self.calls: list[list[str]] = []
        self.call_times: list[float] = []
        self.gate: asyncio.Event | None = None  # when set: deliveries wait for it
        self.starts = 0
        self.stops = 0

    async def start(self) -> None:
        self.starts += 1

    async def stop(self) -> None:
        self.stops += 1

    async def health_check(self) -> None:
        return None

    async def deliver(self, blocks: list[Block]) -> None:
        self.calls.append([b.block_id for b in blocks])
        self.call_times.append(time.monotonic())
        if self.gate is not None:
            await self.gate.wait()
        action = self.script.pop(0) if self.script else None
        if action == HANG:
            await asyncio.sleep(3600)
        if isinstance(action, BaseException):
            raise action
        for b in blocks:
            self.writes[b.block_id] += 1
            self.store.setdefault(b.block_id, b)
        if action == STORE_THEN_RETRIABLE:
            raise RetriableError("connection reset before the ack")


def blocks(*ids: str) -> list[Block]:
    return blank_blocks(*ids)


def ids(n: int, prefix: str = "b") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def make(sink: FakeSink, **kw: object) -> DeliveryQueue:
    opts: dict[str, object] = {
        "max_queue_blocks": 100,
        "batch_max_blocks": 10,
        "batch_max_wait_s": 0.05,
        "timeout_s": 5.0,
        "max_retries": None,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
        "stop_timeout_s": 2.0,
    }
    opts.update(kw)
    return DeliveryQueue(sink, **opts)  # type: ignore[arg-type]


async def until(pred: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def test_fake_sink_satisfies_protocol() -> None:
    assert isinstance(FakeSink(), Sink)


async def test_batches_by_size_without_waiting_for_the_window() -> None:
    sink = FakeSink()
    q = make(sink, batch_max_blocks=3, batch_max_wait_s=30.0)
    await q.start()
    try:
        await q.put(blocks(*ids(7)))
        await until(lambda: len(sink.calls) == 2)
        await asyncio.sleep(0.1)
        # Two full batches went at once; the seventh block waits for its window.
        assert sink.calls == [["b0", "b1", "b2"], ["b3", "b4", "b5"]]
        assert q.queued == 1
        await q.flush()  # flush does not wait for the 30 s window
        assert sink.calls[2:] == [["b6"]]
        assert q.delivered == 7 and q.queued == 0
    finally:
        await q.stop()


async def test_batches_by_time_when_the_batch_is_not_full() -> None:
    sink = FakeSink()
    q = make(sink, batch_max_blocks=100, batch_max_wait_s=0.3)
    await q.start()
    try:
        t0 = time.monotonic()
        await q.put(blocks("a"))
        await asyncio.sleep(0.05)
        await q.put(blocks("b"))
        await asyncio.sleep(0.1)
        assert sink.calls == []  # still inside the window of the oldest block
        await until(lambda: len(sink.calls) == 1)
        assert sink.calls == [["a", "b"]]
        # The window counts from the oldest block's put.
        assert 0.28 <= sink.call_times[0] - t0 < 2.0
        await until(lambda: q.delivered == 2)
        assert q.last_delivery_latency_s is not None and q.last_delivery_latency_s < 1.0
        assert q.last_end_to_end_latency_s is not None
        assert q.last_end_to_end_latency_s >= 0.28
    finally:
        await q.stop()


async def test_retry_then_success_delivers_each_block_once_to_the_idempotent_store() -> None:
    # First attempt: written but the ack is lost; second: refused; third: succeeds.
    sink = FakeSink([STORE_THEN_RETRIABLE, RetriableError("broker unavailable")])
    q = make(sink)
    await q.start()
    try:
        await q.put(blocks("x", "y", "z"))
        await q.flush()
    finally:
        await q.stop()
    # Every attempt re-delivered the SAME blocks ...
    assert sink.calls == [["x", "y", "z"]] * 3
    assert sink.writes == {"x": 2, "y": 2, "z": 2}
    # ... so the idempotent store holds each exactly once.
    assert sorted(sink.store) == ["x", "y", "z"]
    assert (q.delivered, q.retried, q.failed, q.dropped) == (3, 2, 0, 0)


async def test_permanent_error_drops_the_batch_counts_and_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dropped: list[tuple[list[str], str]] = []
    sink = FakeSink([PermanentError("schema rejected by the server")])
    q = make(sink, on_drop=lambda bs, why: dropped.append(([b.block_id for b in bs], why)))
    await q.start()
    try:
        with caplog.at_level(logging.ERROR, logger="stratoscope.regional.delivery"):
            await q.put(blocks("p1", "p2"))
            await q.flush()
        assert len(sink.calls) == 1  # never retried
        assert (q.delivered, q.failed, q.retried) == (0, 2, 0)
        assert dropped == [(["p1", "p2"], "rejected: schema rejected by the server")]
        assert "schema rejected by the server" in caplog.text
        assert "p1, p2" in caplog.text
        # The queue keeps working after a rejected batch.
        await q.put(blocks("p3"))
        await q.flush()
        assert q.delivered == 1 and sorted(sink.store) == ["p3"]
    finally:
        await q.stop()


async def test_timeout_is_retried() -> None:
    sink = FakeSink([HANG])
    q = make(sink, timeout_s=0.1)
    await q.start()
    try:
        t0 = time.monotonic()
        await q.put(blocks("t"))
        await q.flush()
        assert time.monotonic() - t0 >= 0.1
    finally:
        await q.stop()
    assert sink.calls == [["t"], ["t"]]
    assert (q.delivered, q.retried, q.failed) == (1, 1, 0)
    assert sorted(sink.store) == ["t"]


async def test_retries_stop_after_max_retries() -> None:
    dropped: list[str] = []
    sink = FakeSink([RetriableError("down")] * 5)
    q = make(sink, max_retries=2, on_drop=lambda bs, why: dropped.append(why))
    await q.start()
    try:
        await q.put(blocks("r"))
        await q.flush()
    finally:
        await q.stop()
    assert len(sink.calls) == 3  # the attempt plus two retries
    assert (q.delivered, q.retried, q.failed) == (0, 2, 1)
    assert dropped == ["gave up after 3 attempt(s): down"]


async def test_unexpected_exception_is_a_failure_and_the_queue_survives() -> None:
    sink = FakeSink([ValueError("bug in the sink")])
    q = make(sink)
    await q.start()
    try:
        await q.put(blocks("u1"))
        await q.flush()
        await q.put(blocks("u2"))
        await q.flush()
    finally:
        await q.stop()
    assert (q.failed, q.delivered) == (1, 1)
    assert sorted(sink.store) == ["u2"]


async def test_bounded_queue_drops_the_oldest_and_counts_them() -> None:
    dropped: list[tuple[list[str], str]] = []
    sink = FakeSink()
    sink.gate = asyncio.Event()
    q = make(
        sink, max_queue_blocks=3, batch_max_blocks=1, batch_max_wait_s=0.0,
        on_drop=lambda bs, why: dropped.append(([b.block_id for b in bs], why)),
    )
    await q.start()
    try:
        await q.put(blocks("q0"))
        await until(lambda: sink.calls == [["q0"]])  # q0 is in delivery, blocked
        t0 = time.monotonic()
        for i in range(1, 7):
            await q.put(blocks(f"q{i}"))  # never waits for the blocked sink
        assert time.monotonic() - t0 < 0.5
        assert q.dropped == 3
        assert dropped == [(["q1"], "queue full"), (["q2"], "queue full"), (["q3"], "queue full")]
        assert q.queued == 4  # three waiting + one in delivery
        sink.gate.set()
        await q.flush()
    finally:
        await q.stop()
    assert sorted(sink.store) == ["q0", "q4", "q5", "q6"]
    assert (q.delivered, q.dropped, q.failed) == (4, 3, 0)


async def test_one_put_larger_than_the_queue_keeps_the_newest() -> None:
    sink = FakeSink()
    q = make(sink, max_queue_blocks=2)
    await q.put(blocks(*ids(5)))  # before start: queued, bounded all the same
    assert q.dropped == 3 and q.queued == 2
    await q.start()
    try:
        await q.flush()
    finally:
        await q.stop()
    assert sorted(sink.store) == ["b3", "b4"]


async def test_stop_without_start_and_twice_is_safe() -> None:
    sink = FakeSink()
    q = make(sink)
    await q.stop()
    await q.stop()
    assert sink.starts == 0 and sink.stops == 1
    await q.put(blocks("late"))  # after stop: dropped and counted, no exception
    assert q.dropped == 1 and q.queued == 0
    with pytest.raises(RuntimeError, match="stopped"):
        await q.start()


async def test_stop_delivers_what_is_queued_then_stops_the_sink() -> None:
    sink = FakeSink()
    q = make(sink, batch_max_wait_s=30.0)
    await q.start()
    await q.start()  # idempotent
    await q.put(blocks("s1", "s2"))
    await asyncio.gather(q.stop(), q.stop())  # concurrent stops share one shutdown
    await q.stop()
    assert sorted(sink.store) == ["s1", "s2"]
    assert (sink.starts, sink.stops) == (1, 1)
    assert (q.delivered, q.dropped) == (2, 0)


async def test_stop_gives_up_after_its_deadline_and_counts_the_rest_as_dropped() -> None:
    dropped: list[tuple[list[str], str]] = []
    sink = FakeSink([HANG])
    q = make(
        sink, timeout_s=30.0, stop_timeout_s=0.2, batch_max_blocks=1,
        on_drop=lambda bs, why: dropped.append(([b.block_id for b in bs], why)),
    )
    await q.start()
    await q.put(blocks("h1", "h2"))
    await until(lambda: len(sink.calls) == 1)
    t0 = time.monotonic()
    await q.stop()
    assert time.monotonic() - t0 < 2.0
    assert (q.delivered, q.dropped, q.queued) == (0, 2, 0)
    assert dropped == [(["h1", "h2"], "shutdown")]
    assert sink.stops == 1


async def test_flush_without_start_with_queued_blocks_says_why() -> None:
    q = make(FakeSink())
    await q.flush()  # nothing queued: returns at once
    await q.put(blocks("n"))
    with pytest.raises(RuntimeError, match="not running: 1 block"):
        await q.flush()
    await q.stop()
    assert q.dropped == 1


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_queue_blocks must be >= 1, got 0"):
        DeliveryQueue(FakeSink(), max_queue_blocks=0)
    with pytest.raises(ValueError, match="backoff_initial_s <= backoff_max_s"):
        DeliveryQueue(FakeSink(), backoff_initial_s=2.0, backoff_max_s=1.0)
