"""stratoscope/units.py: table tests of the exact text, properties over the whole range."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stratoscope.units import format_bytes, format_count, format_duration_ns, format_value


@pytest.mark.parametrize(("ns", "text"), [
    (0, "0 ns"),
    (1, "1 ns"),
    (999, "999 ns"),
    (1000, "1.00 µs"),
    (1234, "1.23 µs"),
    (12_345, "12.3 µs"),
    (999_999, "1.00 ms"),
    (896_376_998, "896 ms"),
    (1_500_000_000, "1.50 s"),
    (3_600_000_000_000, "3,600 s"),
    (-2_000, "-2.00 µs"),
    (float("nan"), "-"),
    (None, "-"),
    (0.5, "0.50 ns"),
])
def test_durations(ns: float, text: str) -> None:
    assert format_duration_ns(ns) == text


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"),
    (512, "512 B"),
    (1023, "1,023 B"),
    (1024, "1.00 KiB"),
    (4 * 1024 * 1024, "4.00 MiB"),
    (1536 * 1024 * 1024, "1.50 GiB"),
    (3 << 40, "3.00 TiB"),
    (None, "-"),
])
def test_bytes(n: float, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize(("value", "unit", "text"), [
    (896_376_998, "ns", "896 ms"),
    (250, "us", "250 µs"),
    (1500, "us", "1.50 ms"),
    (2.5, "s", "2.50 s"),
    (1_234_567, "count", "1,234,567"),
    (12.0, "count", "12"),
    (0.126, "count", "0.13"),
    (42, "number", "42"),
    (12.5, "percent", "12.5 %"),
    ("futex", "text", "futex"),
    (None, "text", "-"),
    (0, "timestamp", "1970-01-01 00:00:00Z"),
    (datetime(2026, 12, 7, 5, 40), "timestamp", "2026-12-07 05:40:00Z"),
    (datetime(2026, 12, 7, 5, 40, tzinfo=UTC), "timestamp", "2026-12-07 05:40:00Z"),
])
def test_values_by_declared_unit(value: object, unit: str, text: str) -> None:
    assert format_value(value, unit) == text


def test_unknown_unit_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown unit 'furlongs'"):
        format_value(1, "furlongs")


_DUR = re.compile(r"^(-?)([0-9,]+(?:\.[0-9]+)?) (ns|µs|ms|s)$")
_SIZE = re.compile(r"^([0-9,]+(?:\.[0-9]+)?) (B|KiB|MiB|GiB|TiB)$")


@given(st.floats(min_value=1, max_value=1e15, allow_nan=False))
def test_durations_read_back_within_half_a_percent(ns: float) -> None:
    text = format_duration_ns(ns)
    m = _DUR.match(text)
    assert m, text
    back = float(m[2].replace(",", "")) * {"ns": 1, "µs": 1e3, "ms": 1e6, "s": 1e9}[m[3]]
    assert math.isclose(back, ns, rel_tol=0.005), (ns, text)
    number = m[2].replace(",", "").replace(".", "").lstrip("0")
    assert len(number) <= 3 or "," in m[2], text  # three significant digits below 1000


@given(st.integers(min_value=0, max_value=1 << 50))
def test_sizes_read_back_within_half_a_percent(n: int) -> None:
    text = format_bytes(n)
    m = _SIZE.match(text)
    assert m, text
    back = float(m[1].replace(",", "")) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20,
                                           "GiB": 1 << 30, "TiB": 1 << 40}[m[2]]
    assert math.isclose(back, n, rel_tol=0.005, abs_tol=0.5), (n, text)


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_counts_are_exact(n: int) -> None:
    assert int(format_count(n).replace(",", "")) == n
