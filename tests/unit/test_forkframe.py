"""Windows reduced in a forked child give exactly the blocks of an in-process reduction."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from stratoscope.edge.decode import Histogram
from stratoscope.regional.forkframe import FRAME_CHILD_NICE, ChildFailed, stream_in_fork
from stratoscope.regional.gate import Gate
from stratoscope.regional.handover import pack
from stratoscope.regional.merge import Aggregator, MergeSettings, Rollup
from stratoscope.regional.service import Regional
from tests.unit.test_merge import NS, T0, edge_batch, hist_totals, totals

T = TypeVar("T")
R = TypeVar("R")

SETTINGS = MergeSettings(resolution_s=60, lateness_s=0,
                         rollups=(Rollup("syscalls_total", ("syscall",)),))


def run_in_fork(fn: Callable[[T], R], arg: T) -> R:
    """``fn(arg)`` computed in a forked child: the one item of a stream."""
    (result,) = stream_in_fork(lambda a: [fn(a)], arg)
    return result


def admit(regional: Regional, gate: Gate, batch: Any) -> int:
    """What a batch goes through in a running regional: the ingest process's gate, the
    hand-over of its columns, the merge; returns the ack status."""
    ack, cols, label = gate.admit(batch, None, None)
    if cols is None:
        regional.count(ack.status, label, None, None)
    else:
        regional.accept_admitted(pack(cols), None)
    return ack.status


def recorded(settings: MergeSettings = SETTINGS) -> Aggregator:
    agg = Aggregator(settings, "r1")
    for n, node in enumerate(["n1", "n2", "n3"], 1):
        for k in range(6):
            agg.record(edge_batch(node, k + 1, k * 10, {("read", "app"): n * 100 + k, ("write", "app"): n},
                                  {("read", "app"): Histogram({3: n, 9: k}, zero=1, count=n + k + 1, sum=7)}))
    return agg


def test_child_reduction_equals_in_process_reduction() -> None:
    here = recorded().flush(0, force=True)
    agg = recorded()
    child = run_in_fork(agg.emit, agg.take_due(0, force=True))
    assert [b.block_id for b in child] == [b.block_id for b in here]
    assert totals(child, "syscalls_total") == totals(here, "syscalls_total")
    assert totals(child, "syscalls_total")[("", (("syscall", "read"),))] == 6 * 600 + 3 * 15
    assert hist_totals(child, "syscall_latency") == hist_totals(here, "syscall_latency")


def test_a_failing_child_is_reported() -> None:
    parent = os.getpid()

    def fails_in_child(x: int) -> int:
        if os.getpid() != parent:
            raise RuntimeError("boom")
        return x

    with pytest.raises(ChildFailed, match="exited with 1"):
        run_in_fork(fails_in_child, 1)


def test_windows_split_into_node_chunks_add_up_to_the_whole() -> None:
    whole = recorded().flush(0, force=True)
    agg = recorded(dataclasses.replace(SETTINGS, frame_nodes=1))
    chunks = list(agg.emit_chunks(agg.take_due(0, force=True)))
    assert len(chunks) == 3  # one frame per node, each with its own roll-up partial
    split = [b for c in chunks for b in c]
    assert totals(split, "syscalls_total") == {
        **{k: v for k, v in totals(whole, "syscalls_total").items() if k[0]},
        # the roll-up arrives as one additive partial per chunk: readers SUM
        ("", (("syscall", "read"),)): 6 * 600 + 3 * 15, ("", (("syscall", "write"),)): 36,
    }
    assert hist_totals(split, "syscall_latency") == hist_totals(whole, "syscall_latency")
    assert len({b.block_id for b in split}) == len(split)


def test_regional_resumes_in_process_after_the_child_died_part_way(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = MergeSettings(resolution_s=60, lateness_s=0, rollups=(), frame_nodes=1)
    regional = Regional(settings, [], regional_id="r1", frames_in_child=True, clock=lambda: T0 + 120 * NS)
    gate = Gate(clock=lambda: T0 + 120 * NS)
    for i, node in enumerate(["n1", "n2", "n3"], 1):
        for k in range(2):
            assert admit(regional, gate, edge_batch(node, k + 1, k * 10, {("read", "app"): i})) == 1
    parent = os.getpid()
    chunks = regional.aggregator.emit_chunks

    def dies_after_one_frame(due: list, skip: int = 0) -> Iterator[list]:  # type: ignore[type-arg]
        for n, blocks in enumerate(chunks(due, skip), 1):
            yield blocks
            if os.getpid() != parent and n == 1:
                os._exit(3)  # a real child dying after it delivered one frame

    monkeypatch.setattr(regional.aggregator, "emit_chunks", dies_after_one_frame)
    blocks = asyncio.run(regional.flush(force=True))
    assert totals(blocks, "syscalls_total") == {
        ("n1", (("comm", "app"), ("syscall", "read"))): 2,
        ("n2", (("comm", "app"), ("syscall", "read"))): 4,
        ("n3", (("comm", "app"), ("syscall", "read"))): 6,
    }
    assert len(blocks) == 3  # nothing doubled: the first frame came from the child only
    assert regional.registry.get_sample_value("stratoscope_regional_frame_fallbacks_total") == 1.0


def test_the_child_runs_at_a_lower_priority() -> None:
    here = os.nice(0)
    assert list(stream_in_fork(lambda _: [os.nice(0)], None, nice=FRAME_CHILD_NICE)) == [
        min(19, here + FRAME_CHILD_NICE)]
    assert os.nice(0) == here  # the parent's priority is untouched


def test_a_signal_for_the_child_does_not_reach_the_parent() -> None:
    got: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda sig, _frame: got.append(sig))
    try:
        with pytest.raises(ChildFailed, match="exited with -15"):
            run_in_fork(lambda _: os.kill(os.getpid(), signal.SIGTERM), None)
        assert got == []
    finally:
        signal.signal(signal.SIGTERM, old)


async def test_a_flush_waits_for_room_in_a_sink_queue_instead_of_dropping_acked_blocks() -> None:
    """A window whose blocks do not fit the sink's queue waits for the sink to deliver:
    nothing is dropped, every block arrives once."""
    from stratoscope.regional.delivery import DeliveryQueue
    from stratoscope.regional.frame import Block

    class SlowSink:
        name = "slow"

        def __init__(self) -> None:
            self.gate = asyncio.Event()
            self.got: list[str] = []

        async def start(self) -> None:
            pass

        async def stop(self) -> None:
            pass

        async def health_check(self) -> None:
            pass

        async def deliver(self, blocks: list[Block]) -> None:
            await self.gate.wait()
            self.got += [b.block_id for b in blocks]

    sink = SlowSink()
    q = DeliveryQueue(sink, max_queue_blocks=3, batch_max_blocks=2, batch_max_wait_s=0)
    settings = MergeSettings(resolution_s=60, lateness_s=0, rollups=(), frame_nodes=2)
    regional = Regional(settings, [q])
    for i in range(5):
        regional.aggregator.record(edge_batch(f"n{i}", 1, 0, {("read", "x"): i + 1}))
    await q.start()
    try:
        flush = asyncio.create_task(regional.flush(force=True))
        await asyncio.sleep(0.3)
        assert not flush.done() and q.queued <= 3  # frames of 2, 2, 1 blocks: the third waits
        sink.gate.set()
        blocks = await asyncio.wait_for(flush, 10)
        await q.flush()
    finally:
        await q.stop()
    assert q.dropped == 0 and len(blocks) == 5
    assert sorted(sink.got) == sorted(b.block_id for b in blocks)
