"""The ingest process's admission with a write-ahead log (regional/ingest.py). An edge
whose ack deadline ended its stream resends on a new one the batches it left in doubt;
a resend of a batch still being logged is answered when the log answers: DUPLICATE only
once the batch is in the log, RETRY (which frees it for another regional) only once it
never will be."""

from __future__ import annotations

import asyncio
import queue
import time
from typing import Any

from stratoscope.edge.batch import BatchBuilder
from stratoscope.regional.ingest import Admission
from stratoscope.regional.validate import Limits
from stratoscope.v1 import batch_pb2 as pb
from stratoscope.v1 import ingest_pb2

NS = 1_000_000_000


class HeldWriter:
    """A log writer that answers only when the test says (``answer``), like one whose
    disk call has not returned yet."""

    def __init__(self) -> None:
        self.pending: list[tuple[tuple[str, str, int], Any]] = []

    def append(self, record: bytes, ident: tuple[str, str, int], done: Any) -> None:
        self.pending.append((ident, done))

    def answer(self, pos: int | None) -> None:
        _, done = self.pending.pop(0)
        done(pos)


def _batch(seq: int) -> pb.Batch:
    end = time.time_ns() // NS * NS
    b = BatchBuilder("node-a", "boot-1", seq, end - NS, end, {})
    b.add_counters("syscalls_total", "calls", "h", ["syscall"], {("read",): 7})
    return b.build()


async def _settled() -> None:
    for _ in range(3):  # the writer's answer reaches the loop by call_soon_threadsafe
        await asyncio.sleep(0)


async def test_a_resend_of_a_batch_being_logged_waits_for_the_log() -> None:
    writer = HeldWriter()
    adm = Admission(Limits(), 10_000, queue.SimpleQueue(), writer)  # type: ignore[arg-type]
    batch = _batch(1)
    wire = batch.SerializeToString()
    first = asyncio.ensure_future(adm.accept(batch, None, wire))
    await _settled()
    assert len(writer.pending) == 1
    first.cancel()  # the edge's stream ended: the batch is still being logged
    resend = asyncio.ensure_future(adm.accept(batch, None, wire))
    await _settled()
    assert not resend.done()  # neither DUPLICATE (not durable) nor RETRY (it may still be)
    writer.answer(None)  # the log could not take it
    again = await resend
    assert (again.status, again.reason) == (ingest_pb2.Ack.RETRY, "the regional cannot write its log")
    taken = asyncio.ensure_future(adm.accept(batch, None, wire))  # a resend is taken anew
    await _settled()
    assert len(writer.pending) == 1 and not taken.done()
    writer.answer(42)
    assert (await taken).status == ingest_pb2.Ack.ACCEPTED
    assert (await adm.accept(batch, None, wire)).status == ingest_pb2.Ack.DUPLICATE


async def test_a_resend_of_a_batch_that_gets_logged_is_a_duplicate() -> None:
    writer = HeldWriter()
    adm = Admission(Limits(), 10_000, queue.SimpleQueue(), writer)  # type: ignore[arg-type]
    batch = _batch(2)
    wire = batch.SerializeToString()
    first = asyncio.ensure_future(adm.accept(batch, None, wire))
    await _settled()
    first.cancel()
    resend = asyncio.ensure_future(adm.accept(batch, None, wire))
    await _settled()
    writer.answer(7)
    assert (await resend).status == ingest_pb2.Ack.DUPLICATE
    assert (await adm.accept(batch, None, wire)).status == ingest_pb2.Ack.DUPLICATE
    assert adm.logging == {}
