"""Acknowledged blocks through the real ClickHouse engine (chdb): nothing stored twice
whatever the grouping, nothing dropped on errors (regional/delivery.py, issue 19).

- Regrouping: the same frames delivered in one delivery, then grouped otherwise, then by
  a fresh sink (a restart, empty caches): the totals stay exact, because every insert is
  one frame's blocks with a token of exactly those ids.
- A frame with one block that cannot be shaped into rows: that block is in the
  dead-letter directory with its sidecar, counted once; the frame's other blocks are
  stored with exact totals.
- Inserts failing for a while with errors a person fixes (the target table missing,
  too many parts): the queue retries, shows the reason as blocked, drops nothing, and the
  totals are exact once fixed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from stratoscope.regional.delivery import DeliveryQueue
from stratoscope.regional.frame import Block
from stratoscope.regional.sinks.clickhouse import ClickHouseSink
from stratoscope.regional.sinks.deadletter import load_dead_letter
from tests.integration.test_clickhouse_sink import framed_blocks, one, snapshot


async def until(what: str, check: Callable[[], Any], deadline_s: float = 60.0) -> Any:
    """check()'s first truthy value, polled without blocking the event loop; fails
    naming ``what`` at the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline_s:.0f} s waiting for {what} (last: {last!r})")
        await asyncio.sleep(0.02)


@pytest.fixture
def db() -> str:
    return f"ack_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def sink(chdb_dir: str, anchor: Any, db: str, tmp_path: Path) -> AsyncIterator[ClickHouseSink]:
    s = ClickHouseSink(f"chdb://{chdb_dir}", database=db, dead_letter_dir=tmp_path / "dead")
    await s.start()
    yield s
    await s.stop()


def frames_of(blocks: list[Block]) -> list[list[Block]]:
    out: dict[int, list[Block]] = {}
    for b in blocks:
        out.setdefault(id(b.frame), []).append(b)
    return list(out.values())


#: nodes n get scale n + 1: syscalls_total per node 157 * scale
def syscalls(nodes: int) -> int:
    return 157 * sum(range(1, nodes + 1))


async def test_regrouped_deliveries_and_a_restart_store_nothing_twice(
    sink: ClickHouseSink, chdb_dir: str, anchor: Any, db: str, tmp_path: Path
) -> None:
    blocks = framed_blocks(6, 2, "rg")  # 3 frames of 2 nodes
    frames = frames_of(blocks)
    assert [len(f) for f in frames] == [2, 2, 2]
    await sink.deliver(blocks)  # one delivery of every frame
    first = await snapshot(sink)
    assert one(anchor, f"SELECT sum(value) FROM {db}.metrics WHERE metric = 'syscalls_total'") == syscalls(6)

    # the same frames grouped otherwise, by the same sink and by a restarted one
    await sink.deliver(frames[2] + frames[0])
    await sink.deliver(frames[1])
    assert await snapshot(sink) == first
    again = ClickHouseSink(f"chdb://{chdb_dir}", database=db, dead_letter_dir=tmp_path / "dead")
    await again.start()
    try:
        await again.deliver(frames[1] + frames[2])
        await again.deliver(frames[0])
        await again.deliver(list(reversed(blocks)))
        assert await snapshot(again) == first
    finally:
        await again.stop()
    # and through a queue (whole frames per delivery, whatever the batch size)
    third = ClickHouseSink(f"chdb://{chdb_dir}", database=db, dead_letter_dir=tmp_path / "dead")
    done: list[str] = []
    q = DeliveryQueue(third, batch_max_blocks=3, batch_max_wait_s=0.0,
                      on_done=lambda bs: done.extend(b.block_id for b in bs))
    await q.start()
    try:
        for f in frames:
            await q.put(f)
        await q.flush()
        assert await third.query("SELECT sum(value) FROM metrics WHERE metric = 'syscalls_total'") \
            == [(syscalls(6),)]
    finally:
        await q.stop()
    assert sorted(done) == sorted(b.block_id for b in blocks)
    assert one(anchor, f"SELECT sum(value) FROM {db}.metrics WHERE metric = 'syscalls_total'") == syscalls(6)
    assert one(anchor, f"SELECT sum(count) FROM {db}.histograms") == (8 + 4) * sum(range(1, 7))


async def test_a_block_that_cannot_be_shaped_is_dead_lettered_and_the_rest_stored(
    sink: ClickHouseSink, anchor: Any, db: str, tmp_path: Path
) -> None:
    blocks = framed_blocks(3, 3, "dl")  # one frame of 3 nodes, scales 1, 2, 3
    frame = blocks[0].frame
    bad = blocks[1]
    # a label value naming a string the frame does not have (a merge bug, a bad handover)
    rows = frame.rows_of("metrics", [bad.part])
    assert isinstance(rows, slice)
    off = frame.metrics.offsets("labels")
    labels = frame.metrics.ragged["labels"][1]
    labels["values"] = labels["values"].copy()
    labels["values"][int(off[rows.start])] = 10_000_000
    done: list[str] = []
    q = DeliveryQueue(sink, batch_max_wait_s=0.0, on_done=lambda bs: done.extend(b.block_id for b in bs))
    await q.start()
    try:
        await q.put(blocks)
        await q.flush()
    finally:
        await q.stop()
    assert (q.delivered, q.dead_lettered, q.failed, q.left_for_log) == (2, 1, 0, 0)
    assert sorted(done) == sorted(b.block_id for b in blocks)
    assert one(anchor, f"SELECT sum(value) FROM {db}.metrics WHERE metric = 'syscalls_total'") == 157 * (1 + 3)
    assert one(anchor, f"SELECT count() FROM {db}.metrics WHERE metric = 'syscalls_total'"
                       " AND node = {n:String}", n=bad.node) == 0
    (sidecar,) = sorted((tmp_path / "dead").glob("*.json"))
    meta = json.loads(sidecar.read_text())
    assert (meta["sink"], meta["block_id"], meta["node"]) == ("clickhouse", bad.block_id, bad.node)
    assert meta["reason"].startswith("cannot be shaped into rows: IndexError")
    assert meta["rows"]["metrics"] == rows.stop - rows.start
    (kept,) = load_dead_letter(sidecar)
    assert kept.block_id == bad.block_id and len(kept.frame.parts) == 1


async def test_fixable_errors_are_retried_blocked_and_nothing_is_dropped(
    sink: ClickHouseSink, anchor: Any, db: str
) -> None:
    blocks = framed_blocks(4, 2, "fx")  # 2 frames
    frames = frames_of(blocks)
    done: list[str] = []
    q = DeliveryQueue(sink, batch_max_blocks=2, batch_max_wait_s=0.0, max_retries=1,
                      backoff_initial_s=0.05, backoff_max_s=0.2,
                      on_done=lambda bs: done.extend(b.block_id for b in bs))
    await q.start()
    try:
        # 1. the target table is missing (UNKNOWN_TABLE): blocked "missing"
        anchor.command(f"RENAME TABLE {db}.metric_points TO {db}.metric_points_away")
        await q.put(frames[0])
        await until("blocked on the missing table", lambda: q.blocked_reason == "missing")
        assert q.blocked["missing"] == 1 and done == [] and q.failed == 0
        await until("retries past max_retries", lambda: q.retried >= 3)  # max_retries=1 ignored
        assert q.seconds_since_delivery > 0
        anchor.command(f"RENAME TABLE {db}.metric_points_away TO {db}.metric_points")
        await q.flush()
        assert q.blocked_reason is None and q.seconds_since_delivery == 0.0
        assert sorted(done) == sorted(b.block_id for b in frames[0])

        # 2. too many parts: ClickHouse refuses inserts until merges catch up
        anchor.command(f"SYSTEM STOP MERGES {db}.metric_points")
        anchor.command(f"ALTER TABLE {db}.metric_points MODIFY SETTING parts_to_throw_insert = 1")
        await q.put(frames[1])
        await until("blocked on too many parts", lambda: q.blocked_reason == "too_many_parts")
        assert q.failed == 0 and len(done) == 2
        anchor.command(f"ALTER TABLE {db}.metric_points MODIFY SETTING parts_to_throw_insert = 3000")
        anchor.command(f"SYSTEM START MERGES {db}.metric_points")
        await q.flush()
    finally:
        await q.stop()
    assert (q.delivered, q.failed, q.dead_lettered, q.left_for_log, q.dropped) == (4, 0, 0, 0, 0)
    assert sorted(done) == sorted(b.block_id for b in blocks)
    assert q.blocked_reason is None
    assert one(anchor, f"SELECT sum(value) FROM {db}.metrics WHERE metric = 'syscalls_total'") == syscalls(4)
    assert one(anchor, f"SELECT sum(value) FROM {db}.metrics_1h WHERE metric = 'syscalls_total'") == syscalls(4)
    assert one(anchor, f"SELECT sum(count) FROM {db}.histograms") == (8 + 4) * sum(range(1, 5))
