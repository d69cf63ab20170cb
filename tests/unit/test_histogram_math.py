"""Bucket math: OTel scale-0, upper-inclusive, same as the kernel's slots."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stratoscope.edge.decode import Histogram
from stratoscope.histogram import bucket_bounds, bucket_index, histogram_quantile, kernel_slot


@pytest.mark.parametrize(
    ("v", "index"),
    [(1, -1), (2, 0), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (1024, 9), (1025, 10)],
)
def test_documented_examples(v: int, index: int) -> None:
    assert bucket_index(v) == index


def test_zero_goes_to_zero_bucket() -> None:
    assert bucket_index(0) is None
    assert kernel_slot(0) == 0


@given(st.integers(min_value=1, max_value=2**64 - 1))
def test_value_lies_in_its_bucket(v: int) -> None:
    i = bucket_index(v)
    assert i is not None
    lo, hi = bucket_bounds(i)
    assert lo < v <= hi or (v > 2**53 and math.isclose(v, hi))


def _strato_log2(v: int) -> int:
    """A line-by-line port of strato_log2() in bpf/stratoscope.h."""
    r = int(v > 0xFFFFFFFF) << 5
    v >>= r
    for bits, limit in ((4, 0xFFFF), (3, 0xFF), (2, 0xF), (1, 0x3)):
        shift = int(v > limit) << bits
        v >>= shift
        r |= shift
    return r | (v >> 1)


def _strato_slot(v: int) -> int:
    if v == 0:
        return 0
    if v == 1:
        return 1
    return _strato_log2(v - 1) + 2


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_kernel_slot_matches_bpf_code(v: int) -> None:
    assert _strato_slot(v) == kernel_slot(v)


@given(st.lists(st.integers(min_value=0, max_value=2**40), max_size=200))
def test_histogram_from_slots_counts_every_value_once(values: list[int]) -> None:
    h = Histogram()
    for v in values:
        h.add_slot(kernel_slot(v), 1, v)
    assert h.count == len(values)
    assert h.sum == sum(values)
    assert h.zero == values.count(0)
    for i, n in h.buckets.items():
        assert n == sum(1 for v in values if v and bucket_index(v) == i)


def quantile(buckets: dict[int, int], zero: int, q: float) -> float:
    return histogram_quantile(q, list(buckets), list(buckets.values()), zero, "loglinear")


def test_quantile_exact_cases() -> None:
    assert math.isnan(quantile({}, 0, 0.99))
    assert quantile({}, 10, 0.5) == 0.0
    # 100 values all in bucket 9 (512, 1024]: every quantile lies inside it.
    assert 512 <= quantile({9: 100}, 0, 0.5) <= 1024
    assert quantile({9: 100}, 0, 1.0) == 1024
    # Half in bucket 0, half in bucket 10: the median is the top of bucket 0.
    assert quantile({0: 50, 10: 50}, 0, 0.5) == 2.0
    with pytest.raises(ValueError):
        quantile({0: 1}, 0, 1.5)
