"""Cardinality bounds: keep the top N series of a metric, fold the rest into "other".

Folding replaces the values of unbounded labels (comm, cgroup, addresses) with
"other" and sums what collides, so totals are preserved exactly while the
number of series stays bounded by the bounded labels' own cardinality.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

OTHER = "other"
V = TypeVar("V")
Labels = tuple[str, ...]


def bound_series(
    series: dict[Labels, V],
    keys: list[str],
    unbounded: set[str],
    limit: int,
    weight: Callable[[V], int],
    merge: Callable[[V, V], V],
) -> tuple[dict[Labels, V], int]:
    """Return (bounded series, number of series folded into "other")."""
    if len(series) <= limit or not unbounded:
        return series, 0
    ranked = sorted(series.items(), key=lambda kv: (-weight(kv[1]), kv[0]))
    keep = max(limit - 1, 0)
    out: dict[Labels, V] = dict(ranked[:keep])
    positions = [i for i, k in enumerate(keys) if k in unbounded]
    folded = 0
    for labels, value in ranked[keep:]:
        other = list(labels)
        for i in positions:
            other[i] = OTHER
        key = tuple(other)
        out[key] = merge(out[key], value) if key in out else value
        folded += 1
    return out, folded
