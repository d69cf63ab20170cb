"""OpenTelemetry exponential histogram math at scale 0, shared by edge and regional.

Bucket index i counts values v with 2^i < v <= 2^(i+1) (upper-inclusive), so
v = 1 is index -1, v = 2 is index 0, v = 3 and 4 are index 1; v = 0 goes to the
zero bucket. The BPF programs compute the same index in the kernel
(bpf/stratoscope.h: slot = index + 2, slot 0 = zero bucket).
"""

from __future__ import annotations

from collections.abc import Mapping


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


def quantile(buckets: Mapping[int, int], zero_count: int, q: float) -> float:
    """Estimate the q-quantile; within a bucket, interpolate log-linearly.

    Returns 0.0 for an empty histogram. Exponential buckets grow by 2x, so
    geometric interpolation is the unbiased choice for log-uniform data.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    total = zero_count + sum(buckets.values())
    if total == 0:
        return 0.0
    rank = q * total
    if rank <= zero_count:
        return 0.0
    seen = float(zero_count)
    for i in sorted(buckets):
        n = buckets[i]
        if n and seen + n >= rank:
            lo, hi = bucket_bounds(i)
            frac = (rank - seen) / n
            return float(lo * (hi / lo) ** frac)
        seen += n
    return bucket_bounds(max(buckets))[1]
