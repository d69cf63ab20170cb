"""Issue 20: merged sums saturate at 2^64-1 instead of wrapping, and are counted.

Each batch is validated to keep its sums under 2^64 (validate.check_values); what the
merge adds up -- a node's batches of one window, the nodes of a roll-up -- is not, so
every uint64 sum there clamps (regional/columns.py, ``saturating_reduceat``), counts the
sums it clamped by stage in the frame, and the regional puts the counts on /metrics
(``stratoscope_regional_counter_saturated_total{stage}``) and in a rate-limited log line.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stratoscope.edge.batch import BatchBuilder
from stratoscope.edge.decode import Histogram, ProfileRow
from stratoscope.regional import merge
from stratoscope.regional.columns import U64_MAX, exact_total, saturating_reduceat
from stratoscope.regional.gate import Gate
from stratoscope.regional.handover import pack
from stratoscope.regional.merge import Aggregator, MergeSettings, Rollup
from stratoscope.regional.service import Regional, SaturationLog
from stratoscope.v1 import ingest_pb2

NS = 1_000_000_000
T0 = 1_800_000_000 * NS  # a minute boundary
NOW = T0 + 120 * NS
BIG = U64_MAX - 1  # a value each batch may send (its sums stay under 2^64)
METRIC = "stratoscope_regional_counter_saturated_total"


def batch(node: str, seq: int, counters: dict[tuple[str, ...], int] | None = None,
          hists: dict[tuple[str, ...], Histogram] | None = None,
          samples: int | None = None) -> Any:
    """One 10 s edge batch of ``node`` in the window starting at T0."""
    b = BatchBuilder(node, "boot", seq, T0 + (seq - 1) * 10 * NS, T0 + seq * 10 * NS, {})
    if counters:
        b.add_counters("bytes_total", "By", "", ["dev"], counters)
    if hists:
        b.add_histograms("io_latency", "ns", "", ["dev"], hists)
    if samples is not None:
        b.add_profile("cpu", 10_000_000, {ProfileRow(7, "app", "/", ("k0",), None): samples})
    return b.build()


def admitted(node: str, seq: int, **kw: Any) -> Any:
    """``batch(...)`` as the regional's gate admits it: validated, then its columns."""
    ack, cols, _ = Gate(clock=lambda: NOW).admit(batch(node, seq, **kw), None, None)
    assert ack.status == ingest_pb2.Ack.ACCEPTED, ack.reason
    return cols


def _rows(frame: Any, node: str, table: str) -> list[int]:
    part = next(i for i, p in enumerate(frame.parts) if frame.strings[p.node] == node)
    return np.flatnonzero(getattr(frame, table).cols["part"] == part).tolist()


def values(frame: Any, node: str, table: str, col: str) -> list[int]:
    """``col`` of ``table``'s rows of ``node`` ("" for the roll-up), in row order."""
    return [int(getattr(frame, table).cols[col][r]) for r in _rows(frame, node, table)]


def buckets(frame: Any, node: str) -> list[dict[int, int]]:
    """The buckets of ``node``'s histogram rows: index -> count."""
    h = frame.histograms
    off, idx, cnt = h.offsets("buckets"), h.values("buckets", "index"), h.values("buckets", "count")
    return [dict(zip(idx[off[r]:off[r + 1]].tolist(), cnt[off[r]:off[r + 1]].tolist(), strict=True))
            for r in _rows(frame, node, "histograms")]


# -- the kernel ------------------------------------------------------------------------


def test_saturating_reduceat_clamps_exactly_the_groups_that_pass_2_64() -> None:
    v = np.array([U64_MAX, 2,  2**63, 2**63 - 1,  2**63, 2**63,  5, 6,  U64_MAX], dtype=np.uint64)
    starts = np.array([0, 2, 4, 6, 8], dtype=np.int64)
    out, clamped = saturating_reduceat(v, starts)
    assert out.tolist() == [U64_MAX, U64_MAX, U64_MAX, 11, U64_MAX]
    assert clamped == 2  # 2^63 + 2^63 - 1 is exactly 2^64-1: reached, not passed
    out, clamped = saturating_reduceat(np.arange(1, 1001, dtype=np.uint64), np.array([0, 500], dtype=np.int64))
    assert (out.tolist(), clamped) == ([125_250, 375_250], 0)


@settings(max_examples=200, derandomize=True, database=None)
@given(st.lists(st.lists(st.one_of(st.integers(0, 1000), st.integers(2**62, U64_MAX)), min_size=1, max_size=6),
                min_size=1, max_size=8))
def test_saturating_sums_are_the_exact_sums_clamped(groups: list[list[int]]) -> None:
    flat = np.array([x for g in groups for x in g], dtype=np.uint64)
    starts = np.cumsum([0] + [len(g) for g in groups[:-1]]).astype(np.int64)
    out, clamped = saturating_reduceat(flat, starts)
    assert out.tolist() == [min(sum(g), U64_MAX) for g in groups]
    assert clamped == sum(sum(g) > U64_MAX for g in groups)
    assert exact_total(flat) == sum(map(sum, groups))


def test_bucket_counts_past_2_64_take_the_exact_path_and_clamp() -> None:
    """numpy's wrapping total of [2^64-1, 2] is 1: under 2^53, so the dense float64 path
    was taken, and the float 2^64 cast back to uint64 is undefined (numpy warns)."""
    series = np.array([0, 0, 1], dtype=np.int64)
    idx = np.array([3, 3, 3], dtype=np.int64)
    cnt = np.array([U64_MAX, 2, 4], dtype=np.uint64)
    sid, bidx, bcnt, clamped = merge._reduce_buckets(series, idx, cnt)
    assert (sid.tolist(), bidx.tolist(), bcnt.tolist(), clamped) == ([0, 1], [3, 3], [U64_MAX, 4], 1)


# -- a node's batches of one window --------------------------------------------------


def test_a_nodes_counters_histograms_and_samples_saturate_within_a_window() -> None:
    agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0, rollups=()))
    big = Histogram({3: BIG}, zero=BIG, count=BIG, sum=BIG)
    two = Histogram({3: 2, 4: 1}, zero=2, count=2, sum=2)
    agg.record(admitted("n1", 1, counters={("sda",): BIG, ("sdb",): 1}, hists={("sda",): big}, samples=BIG))
    agg.record(admitted("n1", 2, counters={("sda",): 2, ("sdb",): 2}, hists={("sda",): two}, samples=2))
    [block] = agg.flush(0, force=True)
    f = block.frame
    assert values(f, "n1", "metrics", "value") == [U64_MAX, 3]
    assert [values(f, "n1", "histograms", c) for c in ("count", "sum", "zero")] == [[U64_MAX]] * 3
    assert buckets(f, "n1") == [{3: U64_MAX, 4: 1}]
    assert f.profiles.cols["samples"].tolist() == [U64_MAX]
    # a counter, a histogram's count, sum, zero count and one bucket, the samples
    assert f.saturated == {"window": 6, "rollup": 0}


def test_sums_clamped_by_folds_while_recording_are_carried_to_the_frame() -> None:
    """With fold_min_rows=1 every record() folds: the first clamp happens there, in the
    merge process; a sum already at 2^64-1 that grows again is clamped (and counted)
    again by the fold that adds to it."""
    agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0, rollups=(), fold_min_rows=1))
    for seq, v in ((1, BIG), (2, 2), (3, 5)):
        agg.record(admitted("n1", seq, counters={("sda",): v}))
    assert [s.saturated for w in agg._open.values() for s in w.shards.values()] == [2]
    [block] = agg.flush(0, force=True)
    assert values(block.frame, "n1", "metrics", "value") == [U64_MAX]
    assert block.frame.saturated == {"window": 2, "rollup": 0}


def test_sums_under_2_64_are_exact_and_count_nothing() -> None:
    agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0, rollups=()))
    agg.record(admitted("n1", 1, counters={("sda",): 2**63}))
    agg.record(admitted("n1", 2, counters={("sda",): 2**63 - 1}))
    [block] = agg.flush(0, force=True)
    assert values(block.frame, "n1", "metrics", "value") == [U64_MAX]
    assert block.frame.saturated == {"window": 0, "rollup": 0}


# -- the roll-up across nodes ---------------------------------------------------------


def test_the_rollup_saturates_where_no_nodes_own_sum_did() -> None:
    agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0,
                                   rollups=(Rollup("bytes_total", ("dev",)), Rollup("io_latency", ("dev",)))))
    h = Histogram({3: BIG}, zero=0, count=BIG, sum=1)
    agg.record(admitted("n1", 1, counters={("sda",): BIG}, hists={("sda",): h}))
    agg.record(admitted("n2", 1, counters={("sda",): 2}, hists={("sda",): Histogram({3: 2}, count=2, sum=1)}))
    blocks = agg.flush(0, force=True)
    assert [b.node for b in blocks] == ["", "n1", "n2"]
    f = blocks[0].frame
    assert (values(f, "n1", "metrics", "value"), values(f, "n2", "metrics", "value")) == ([BIG], [2])
    assert values(f, "", "metrics", "value") == [U64_MAX]
    assert [values(f, "", "histograms", c) for c in ("count", "sum", "zero")] == [[U64_MAX], [2], [0]]
    assert (buckets(f, "n1"), buckets(f, "n2"), buckets(f, "")) == ([{3: BIG}], [{3: 2}], [{3: U64_MAX}])
    # the roll-up's counter, its histogram count and its bucket
    assert f.saturated == {"window": 0, "rollup": 3}


# -- /metrics and the log -------------------------------------------------------------


@pytest.mark.parametrize("in_child", [False, True])
def test_the_regional_counts_saturated_sums_on_metrics(in_child: bool) -> None:
    """Counted by the regional as frames arrive, whether reduced in-process or in a forked
    child (whose own counters nobody would see)."""
    regional = Regional(MergeSettings(resolution_s=60, lateness_s=0, rollups=(Rollup("bytes_total", ("dev",)),)),
                        [], regional_id="r1", frames_in_child=in_child, clock=lambda: NOW)
    for stage in ("window", "rollup"):  # every series there from the start, at 0
        assert regional.registry.get_sample_value(METRIC, {"stage": stage}) == 0.0
    for node, seq, v in (("n1", 1, BIG), ("n1", 2, 2), ("n2", 1, 7)):
        regional.accept_admitted(pack(admitted(node, seq, counters={("sda",): v})), None)
    blocks = asyncio.run(regional.flush(force=True))
    assert len(blocks) == 3
    assert regional.registry.get_sample_value(METRIC, {"stage": "window"}) == 1.0  # n1: BIG + 2
    assert regional.registry.get_sample_value(METRIC, {"stage": "rollup"}) == 1.0  # n1 + n2


def test_the_saturation_log_is_rate_limited_and_says_only_numbers(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    logger = logging.getLogger("test.saturation")
    sat = SaturationLog(every_s=60, clock=lambda: now[0], logger=logger)
    with caplog.at_level(logging.WARNING, logger="test.saturation"):
        sat.saturated(T0, 60, {"window": 2})
        sat.saturated(T0 + 60 * NS, 60, {"rollup": 1})  # held back
        now[0] += 30
        sat.saturated(T0 + 120 * NS, 60, {"window": 1, "rollup": 4})  # held back
        now[0] += 31
        sat.saturated(T0 + 180 * NS, 60, {"window": 3})
    assert [r.getMessage() for r in caplog.records] == [
        "merged sums clamped at 2^64-1 instead of wrapping (window: 2, rollup: 0) in the frame of the "
        "60 s window starting 2027-01-15T08:00:00Z: some node sends counters near 2^64 "
        f"({METRIC})",
        "merged sums clamped at 2^64-1 instead of wrapping (window: 4, rollup: 5) in the frame of the "
        "60 s window starting 2027-01-15T08:03:00Z and 2 earlier frame(s): some node sends counters "
        f"near 2^64 ({METRIC})",
    ]
