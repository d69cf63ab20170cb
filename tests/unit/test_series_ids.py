"""Series identity in the ClickHouse sink: the pure parts (no ClickHouse here; the
agreement with ClickHouse's SQL is tests/integration/test_clickhouse_sink.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from stratoscope.regional.sinks.clickhouse_arrow import (
    SERIES_P,
    SERIES_SEED,
    _distinct_pairs,
    series_id,
)


def test_series_id_is_order_free_and_tells_keys_from_values() -> None:
    assert series_id({}) == SERIES_SEED
    assert series_id({"a": "1", "b": "2"}) == series_id({"b": "2", "a": "1"})
    assert series_id({"a": "1", "b": "2"}) != series_id({"a": "2", "b": "1"})
    assert series_id({"a": "b"}) != series_id({"b": "a"})
    assert series_id({"a": ""}) != series_id({})


def pairs_of(metric: np.ndarray, sids: np.ndarray, rows: np.ndarray) -> list[tuple[int, int]]:
    return sorted(zip(metric[rows].tolist(), sids[rows].tolist(), strict=True))


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 6)), max_size=200))
def test_distinct_pairs_one_row_per_pair(raw: list[tuple[int, int]]) -> None:
    metric = np.array([m for m, _ in raw], dtype=np.int64)
    sids = np.array([s * 0x1000_0000_0001 for _, s in raw], dtype=np.uint64)
    rows = _distinct_pairs(metric, sids)
    assert pairs_of(metric, sids, rows) == sorted(set(zip(metric.tolist(), sids.tolist(), strict=True)))


def test_distinct_pairs_exact_when_mixed_keys_collide() -> None:
    # (m1, s1) and (m2, s2) with the same 64-bit mix: both must survive
    m1, m2, s1 = 3, 7, 0x0123_4567_89AB_CDEF
    u64 = (1 << 64) - 1
    s2 = s1 ^ ((m1 * SERIES_P) & u64) ^ ((m2 * SERIES_P) & u64)
    metric = np.array([m1, m2, m1, m2, 5], dtype=np.int64)
    sids = np.array([s1, s2, s1, s2, 9], dtype=np.uint64)
    rows = _distinct_pairs(metric, sids)
    assert pairs_of(metric, sids, rows) == sorted({(m1, s1), (m2, s2), (5, 9)})
