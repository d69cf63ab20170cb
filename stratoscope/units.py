"""Numbers as a person reads them: durations in ns/µs/ms/s, sizes in KiB/MiB, counts with
thousands separators.

One module so the query command, the demo's report and the status view print the same
way: a futex p99 reads ``896 ms``, not ``896,376,998``. Every formatter takes the value in
the unit a column declares (``ns``, ``us``, ``s``, ``bytes``, ...) and never guesses.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

__all__ = ["UNITS", "format_bytes", "format_count", "format_duration_ns", "format_value"]

#: Units a cookbook column may declare (deploy/clickhouse/queries/*.sql, ``-- column:``).
UNITS = ("text", "count", "number", "ns", "us", "ms", "s", "bytes", "timestamp", "percent")

_NS_PER = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}
_DURATION_STEPS = ((1e9, "s"), (1e6, "ms"), (1e3, "µs"), (1.0, "ns"))
_BYTE_STEPS = ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))
MISSING = "-"


def _three_digits(x: float) -> str:
    """x with three significant digits, never in exponent notation (x >= 0)."""
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 99.95:
        return f"{x:.0f}"
    if x >= 9.995:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_duration_ns(ns: float) -> str:
    """``1234`` -> ``1.23 µs``; ``896376998`` -> ``896 ms``; 0 -> ``0 ns``."""
    if _missing(ns):
        return MISSING
    sign = "-" if ns < 0 else ""
    ns = abs(float(ns))
    if ns == 0:
        return "0 ns"
    if math.isinf(ns):
        return f"{sign}inf"
    for factor, name in _DURATION_STEPS:
        if ns >= factor * 0.9995 or name == "ns":
            if name == "ns" and ns == int(ns):
                return f"{sign}{int(ns)} ns"
            return f"{sign}{_three_digits(ns / factor)} {name}"
    raise AssertionError("unreachable")


def format_bytes(n: float) -> str:
    """``512`` -> ``512 B``; ``4194304`` -> ``4.00 MiB`` (binary prefixes)."""
    if _missing(n):
        return MISSING
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    if math.isinf(n):
        return f"{sign}inf"
    for factor, name in _BYTE_STEPS:
        if n >= factor * 0.9995:
            return f"{sign}{_three_digits(n / factor)} {name}"
    return f"{sign}{n:,.0f} B" if n == int(n) else f"{sign}{_three_digits(n)} B"


def format_count(n: float) -> str:
    """Whole numbers with thousands separators; fractions with three significant digits."""
    if _missing(n):
        return MISSING
    if isinstance(n, int) or float(n).is_integer():
        return f"{int(n):,}"
    sign = "-" if n < 0 else ""
    return sign + _three_digits(abs(float(n)))


def format_timestamp(value: Any) -> str:
    """A datetime (naive ones are UTC, as clickhouse-connect returns them) or Unix seconds,
    as ``2026-12-07 05:40:00Z``."""
    if _missing(value):
        return MISSING
    if isinstance(value, datetime):
        dt = value if value.tzinfo else value.replace(tzinfo=UTC)
    else:
        dt = datetime.fromtimestamp(float(value), UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def format_value(value: Any, unit: str) -> str:
    """``value`` in ``unit`` (one of UNITS) as a person reads it."""
    if unit in _NS_PER:
        return MISSING if _missing(value) else format_duration_ns(float(value) * _NS_PER[unit])
    if unit == "bytes":
        return format_bytes(value)
    if unit == "count":
        return format_count(value)
    if unit == "number":
        return MISSING if _missing(value) else (f"{value:,}" if isinstance(value, int) else
                                               format_count(value))
    if unit == "percent":
        return MISSING if _missing(value) else f"{float(value):.1f} %"
    if unit == "timestamp":
        return format_timestamp(value)
    if unit == "text":
        return MISSING if value is None else str(value)
    raise ValueError(f"unknown unit {unit!r} (known: {', '.join(UNITS)})")
