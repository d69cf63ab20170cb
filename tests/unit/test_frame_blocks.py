"""Blocks as parts of merged frames, and the ClickHouse sink's per-frame Arrow views."""

from __future__ import annotations

import gc
import pickle

import pytest

from stratoscope.edge.batch import BatchBuilder
from stratoscope.regional.frame import Block, Frame
from stratoscope.regional.merge import Aggregator, MergeSettings
from stratoscope.regional.sinks.clickhouse_arrow import _ViewCache, arrow_tables, frame_strings
from stratoscope.v1 import batch_pb2 as pb
from tests.frames import merged_blocks, merged_frame

NS = 1_000_000_000
T0 = 1_800_000_000 * NS  # a minute boundary


def batch(node: str, seq: int = 1, value: int = 1) -> pb.Batch:
    b = BatchBuilder(node, "boot", seq, T0, T0 + 10 * NS, {"region": "eu"})
    b.add_counters("c_total", "1", "", ["k"], {("a",): value})
    return b.build()


def test_a_block_is_a_part_of_its_frame() -> None:
    blocks = merged_blocks(batch("n1"), batch("n2", value=2), regional_id="r")
    assert [b.node for b in blocks] == ["n1", "n2"]
    frame = blocks[0].frame
    assert all(b.frame is frame for b in blocks)
    assert [b.part for b in blocks] == [0, 1]
    assert [b.block_id for b in blocks] == [p.block_id for p in frame.parts]
    assert {b.resolution_s for b in blocks} == {60}
    assert [b.block_id for b in merged_blocks(batch("n1"), batch("n2", value=2), regional_id="r")] == \
        [b.block_id for b in blocks]


def test_a_block_id_depends_on_its_sources_only() -> None:
    """The same batches give the same ids whichever regional merged them (a failover, a
    replay of the log); other batches, other ids."""
    def ids(regional_id: str, *batches: pb.Batch) -> list[str]:
        agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0, rollups=()), regional_id)
        for b in batches:
            agg.record(b)
        return [blk.block_id for blk in agg.flush(0, force=True)]

    first = ids("r1", batch("n1"), batch("n2", value=2))
    assert ids("r2", batch("n1"), batch("n2", value=2)) == first
    assert ids("r2", batch("n1", value=5), batch("n2", value=2)) == first  # identity, not content
    assert not set(ids("r1", batch("n1", seq=2))) & set(first)


def test_a_block_outside_its_frame_is_refused() -> None:
    frame = merged_blocks(batch("n1"), batch("n2", value=2))[0].frame
    assert frame is not None
    with pytest.raises(IndexError, match="part 2 of a frame of 2 parts"):
        Block(frame, 2)


def test_blocks_pickle_with_one_copy_of_their_frame() -> None:
    blocks = merged_blocks(batch("n1"), batch("n2"))
    again = pickle.loads(pickle.dumps(blocks))
    assert again[0].frame is again[1].frame
    assert [(b.block_id, b.part, b.node) for b in again] == [(b.block_id, b.part, b.node) for b in blocks]


def test_frame_has_no_sink_state() -> None:
    frame = merged_frame(batch("n1"))
    arrow_tables(frame, [0])
    assert not hasattr(frame, "cache")
    assert "cache" not in vars(frame)


def test_arrow_views_are_reused_while_their_frame_lives_and_bounded() -> None:
    cache = _ViewCache(limit=2)
    f1, f2, f3 = (merged_frame(batch(f"n{i}")) for i in range(3))
    v1 = cache(f1)
    assert cache(f1) is v1  # the second shaping of a frame reuses its views
    cache(f2)
    assert len(cache) == 2
    cache(f3)  # over the limit: the least recently used (f1) goes
    assert len(cache) == 2 and cache(f1) is not v1
    # the views do not keep a frame alive, and a dead frame's views answer for no other
    del f1, f2, f3
    gc.collect()
    assert len(cache) == 0
    f4 = merged_frame(batch("n4"))
    assert cache(f4).names is f4.strings


def test_the_sink_module_cache_is_the_one_arrow_tables_uses() -> None:
    frame: Frame = merged_frame(batch("n1"), batch("n2"))
    arrow_tables(frame, [0])
    views = frame_strings(frame)
    arrow_tables(frame, [1])
    assert frame_strings(frame) is views
