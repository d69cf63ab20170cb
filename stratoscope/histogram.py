"""OpenTelemetry exponential histogram math at scale 0, shared by edge and regional.

Bucket index i counts values v with 2^i < v <= 2^(i+1) (upper-inclusive), so
v = 1 is index -1, v = 2 is index 0, v = 3 and 4 are index 1; v = 0 goes to the
zero bucket. The BPF programs compute the same index in the kernel
(bpf/stratoscope.h: slot = index + 2, slot 0 = zero bucket).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

QuantileMethod = Literal["upper", "loglinear"]


def bucket_index(v: int) -> int | None:
    """Index of the bucket holding v (None for the zero bucket)."""
    if v < 0:
        raise ValueError(f"histogram values are non-negative, got {v}")
    if v == 0:
        return None
    if v == 1:
        return -1
    return (v - 1).bit_length() - 1


def kernel_slot(v: int) -> int:
    """The slot bpf/stratoscope.h's strato_slot() computes for v."""
    i = bucket_index(v)
    return 0 if i is None else i + 2


def bucket_bounds(i: int) -> tuple[float, float]:
    """(lower exclusive, upper inclusive) bounds of bucket i."""
    return 2.0**i, 2.0 ** (i + 1)


def histogram_quantile(
    q: float,
    bucket_index: Sequence[int],
    bucket_count: Sequence[int],
    zero_count: int = 0,
    method: QuantileMethod = "upper",
) -> float:
    """Quantile ``q`` of a merged scale-0 histogram (Python reference of histogram_quantile_sql).

    Bucket i holds values in (2^i, 2^(i+1)]; the zero bucket holds 0. The
    bucket is the one holding the k-th smallest sample, k = max(1, ceil(q * total)).
    ``method="upper"`` returns that bucket's upper bound 2^(i+1) (an upper
    estimate: at least a fraction q of the samples are <= it; 0 for the zero
    bucket). ``method="loglinear"`` interpolates inside the bucket on a log2
    scale: 2^(i + f), f = (q*total - samples below the bucket) / bucket count,
    clamped to [0, 1]. NaN for an empty histogram.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} outside [0, 1]")
    if method not in ("upper", "loglinear"):
        raise ValueError(f"unknown method {method!r}")
    pairs = sorted((i, c) for i, c in zip(bucket_index, bucket_count, strict=True) if c)
    total = zero_count + sum(c for _, c in pairs)
    if total == 0:
        return math.nan
    rank = q * total
    k = max(1, math.ceil(rank))
    if zero_count >= k:
        return 0.0
    cum = zero_count
    for i, c in pairs:
        if cum + c >= k:
            if method == "upper":
                return float(2.0 ** (i + 1))
            f = min(1.0, max(0.0, (rank - cum) / c))
            return float(2.0 ** (i + f))
        cum += c
    raise AssertionError("unreachable: k <= total")
