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
from stratoscope.regional.sinks.base import (
    BLOCKED_REASONS,
    BlockedError,
    PermanentError,
    RetriableError,
    Sink,
)
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
        self.dead: list[str] = []  # ids "written to the dead-letter directory"
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

    async def deliver(self, blocks: list[Block]) -> list[str] | None:
        self.calls.append([b.block_id for b in blocks])
        self.call_times.append(time.monotonic())
        if self.gate is not None:
            await self.gate.wait()
        action = self.script.pop(0) if self.script else None
        if action == HANG:
            await asyncio.sleep(3600)
        if isinstance(action, BaseException):
            raise action
        dead = list(action) if isinstance(action, tuple) else []  # dead-lettered ids
        for b in blocks:
            if b.block_id in dead:
                self.dead.append(b.block_id)
                continue
            self.writes[b.block_id] += 1
            self.store.setdefault(b.block_id, b)
        if action == STORE_THEN_RETRIABLE:
            raise RetriableError("connection reset before the ack")
        return dead or None


def blocks(*ids: str) -> list[Block]:
    """One block per id, each the one part of a frame of its own."""
    return [b for i in ids for b in blank_blocks(i)]


def frame(*ids: str) -> list[Block]:
    """The blocks of ONE frame, one part per id."""
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


async def test_permanent_error_on_one_frame_fails_it_without_on_done(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dropped: list[tuple[list[str], str]] = []
    done: list[str] = []
    sink = FakeSink([PermanentError("schema rejected by the server")])
    q = make(sink, on_drop=lambda bs, why: dropped.append(([b.block_id for b in bs], why)),
             on_done=lambda bs: done.extend(b.block_id for b in bs))
    await q.start()
    try:
        with caplog.at_level(logging.ERROR, logger="stratoscope.regional.delivery"):
            await q.put(frame("p1", "p2"))
            await q.flush()
        assert len(sink.calls) == 1  # never retried
        assert (q.delivered, q.failed, q.retried, q.dead_lettered) == (0, 2, 0, 0)
        assert dropped == [(["p1", "p2"], "rejected: schema rejected by the server")]
        assert done == []  # left in the regional's log: replayed after a restart
        assert "schema rejected by the server" in caplog.text
        assert "p1, p2" in caplog.text
        # The queue keeps working after a rejected batch.
        await q.put(blocks("p3"))
        await q.flush()
        assert q.delivered == 1 and sorted(sink.store) == ["p3"]
        assert done == ["p3"]
    finally:
        await q.stop()


async def test_permanent_error_on_several_frames_retries_them_frame_by_frame() -> None:
    done: list[str] = []
    sink = FakeSink([PermanentError("one frame is bad"), None, PermanentError("this one")])
    q = make(sink, on_done=lambda bs: done.extend(b.block_id for b in bs))
    await q.start()
    try:
        await q.put(frame("a1", "a2"))
        await q.put(frame("b1"))
        await q.put(frame("c1", "c2"))
        await q.flush()
    finally:
        await q.stop()
    assert sink.calls == [["a1", "a2", "b1", "c1", "c2"], ["a1", "a2"], ["b1"], ["c1", "c2"]]
    assert (q.delivered, q.failed) == (4, 1)  # b1 failed, left for the log
    assert done == ["a1", "a2", "c1", "c2"]


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


async def test_full_queue_makes_put_wait_and_drops_nothing() -> None:
    dropped: list[tuple[list[str], str]] = []
    done: list[str] = []
    sink = FakeSink()
    sink.gate = asyncio.Event()
    q = make(
        sink, max_queue_blocks=3, batch_max_blocks=1, batch_max_wait_s=0.0,
        on_drop=lambda bs, why: dropped.append(([b.block_id for b in bs], why)),
        on_done=lambda bs: done.extend(b.block_id for b in bs),
    )
    await q.start()
    try:
        await q.put(blocks("q0"))
        await until(lambda: sink.calls == [["q0"]])  # q0 is in delivery, held
        await q.put(blocks("q1"))
        await q.put(blocks("q2"))  # three: the bound
        assert (q.queued, q.backpressure_waits) == (3, 0)
        waiting = asyncio.ensure_future(q.put(blocks("q3")))
        await until(lambda: q.backpressure_waits == 1)
        assert not waiting.done() and q.queued == 3  # q3 waits for room
        sink.gate.set()  # the sink takes q0: room for q3
        await waiting
        await q.flush()
    finally:
        await q.stop()
    assert sorted(sink.store) == ["q0", "q1", "q2", "q3"]
    assert done == ["q0", "q1", "q2", "q3"]  # each exactly once
    assert (q.delivered, q.dropped, q.failed, q.left_for_log) == (4, 0, 0, 0)
    assert dropped == []


async def test_a_put_larger_than_the_bound_fits_an_empty_queue() -> None:
    sink = FakeSink()
    q = make(sink, max_queue_blocks=2, batch_max_blocks=2)
    await q.start()
    try:
        await q.put(frame(*ids(5)))  # one frame of five blocks: never split, never refused
        await q.flush()
    finally:
        await q.stop()
    assert sink.calls == [ids(5)]  # the whole frame in one delivery, past batch_max_blocks
    assert (q.delivered, q.dropped, q.backpressure_waits) == (5, 0, 0)


async def test_stop_without_start_and_twice_is_safe() -> None:
    sink = FakeSink()
    q = make(sink)
    await q.stop()
    await q.stop()
    assert sink.starts == 0 and sink.stops == 1
    await q.put(blocks("late"))  # after stop: left for the log, counted, no exception
    assert (q.left_for_log, q.dropped, q.queued) == (1, 0, 0)
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
    assert (q.delivered, q.dropped, q.left_for_log) == (2, 0, 0)


async def test_stop_gives_up_after_its_deadline_and_leaves_the_rest_for_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dropped: list[tuple[list[str], str]] = []
    done: list[str] = []
    sink = FakeSink([None, HANG])
    q = make(
        sink, timeout_s=30.0, stop_timeout_s=0.2, batch_max_blocks=1,
        on_drop=lambda bs, why: dropped.append(([b.block_id for b in bs], why)),
        on_done=lambda bs: done.extend(b.block_id for b in bs),
    )
    await q.start()
    await q.put(blocks("h0", "h1", "h2"))
    await until(lambda: len(sink.calls) == 2)  # h0 delivered, h1 hangs
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="stratoscope.regional.delivery"):
        await q.stop()
    assert time.monotonic() - t0 < 2.0
    assert (q.delivered, q.left_for_log, q.dropped, q.queued) == (1, 2, 0, 0)
    assert done == ["h0"]  # never for h1, h2: the log keeps them
    assert dropped == [(["h1", "h2"], "left for the log at shutdown")]
    assert "2 undelivered block(s) left for the log at shutdown" in caplog.text
    assert sink.stops == 1


async def test_flush_without_start_with_queued_blocks_says_why() -> None:
    q = make(FakeSink())
    await q.flush()  # nothing queued: returns at once
    await q.put(blocks("n"))
    with pytest.raises(RuntimeError, match="not running: 1 block"):
        await q.flush()
    await q.stop()
    assert (q.left_for_log, q.dropped) == (1, 0)


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_queue_blocks must be >= 1, got 0"):
        DeliveryQueue(FakeSink(), max_queue_blocks=0)
    with pytest.raises(ValueError, match="backoff_initial_s <= backoff_max_s"):
        DeliveryQueue(FakeSink(), backoff_initial_s=2.0, backoff_max_s=1.0)


# ---------------------------------------------------------------- acknowledged data


async def test_whole_frames_per_delivery_in_put_order() -> None:
    sink = FakeSink()
    q = make(sink, batch_max_blocks=4, batch_max_wait_s=30.0)
    f1, f2, f3 = frame("a1", "a2", "a3"), frame("b1", "b2"), frame("c1", "c2", "c3", "c4", "c5")
    # b2 comes in a later put than b1, after another frame: still delivered with b1
    await q.put(f1)
    await q.put(f2[:1])
    await q.put(f3)
    await q.put(f2[1:])
    await q.start()
    try:
        await q.flush()
    finally:
        await q.stop()
    # a frame is never split nor joined past batch_max_blocks (4); one larger goes alone
    assert sink.calls == [["a1", "a2", "a3"], ["b1", "b2"], ["c1", "c2", "c3", "c4", "c5"]]
    assert q.delivered == 10


async def test_on_done_once_per_block_for_delivered_and_dead_lettered() -> None:
    done: list[str] = []
    sink = FakeSink([("d2",), STORE_THEN_RETRIABLE])
    q = make(sink, on_done=lambda bs: done.extend(b.block_id for b in bs))
    await q.start()
    try:
        await q.put(frame("d1", "d2", "d3"))  # d2 goes to the dead letters
        await q.flush()
        await q.put(frame("e1"))  # stored, ack lost, retried: done once
        await q.flush()
    finally:
        await q.stop()
    assert sorted(done) == ["d1", "d2", "d3", "e1"] and len(done) == 4
    assert sink.dead == ["d2"]
    assert (q.delivered, q.dead_lettered, q.failed, q.retried) == (3, 1, 0, 1)


async def test_fixable_error_is_retried_forever_with_the_blocked_metric() -> None:
    done: list[str] = []
    sink = FakeSink([BlockedError("Code: 516. AUTHENTICATION_FAILED", "auth")] * 6
                    + [BlockedError("Code: 60. UNKNOWN_TABLE", "missing")])
    sink.gate = asyncio.Event()
    sink.gate.set()
    q = make(sink, max_retries=2, on_done=lambda bs: done.extend(b.block_id for b in bs))
    assert q.blocked == dict.fromkeys(BLOCKED_REASONS, 0)
    await q.start()
    try:
        await q.put(blocks("f1"))
        await until(lambda: q.blocked_reason == "auth")
        assert q.blocked["auth"] == 1 and sum(q.blocked.values()) == 1
        await until(lambda: q.blocked_reason == "missing")  # max_retries=2 does not apply
        assert q.seconds_since_delivery > 0 and done == []
        await q.flush()
    finally:
        await q.stop()
    assert len(sink.calls) == 8 and (q.retried, q.failed, q.delivered) == (7, 0, 1)
    assert q.blocked_reason is None and q.blocked == dict.fromkeys(BLOCKED_REASONS, 0)
    assert done == ["f1"] and q.seconds_since_delivery == 0.0


async def test_transient_errors_show_as_unavailable_until_a_success() -> None:
    sink = FakeSink([RetriableError("connection refused")] * 3)
    sink.gate = asyncio.Event()
    q = make(sink)
    await q.start()
    try:
        await q.put(blocks("u"))
        sink.gate.set()
        await until(lambda: q.retried >= 1)
        assert q.blocked_reason in ("unavailable", None)
        await q.flush()
    finally:
        await q.stop()
    assert (q.retried, q.delivered, q.blocked_reason) == (3, 1, None)


def test_blocked_error_names_a_known_reason_and_pickles() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(BlockedError("read-only", "readonly")))
    assert isinstance(err, BlockedError) and (str(err), err.reason) == ("read-only", "readonly")
    with pytest.raises(ValueError, match="unknown blocked reason 'oops'"):
        BlockedError("x", "oops")
