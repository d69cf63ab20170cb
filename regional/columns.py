"""Group-by-sum over whole numpy columns: the regional's merge kernel.

Keys are uint32 matrices (one row per point, one column per label including
the node); rows with equal keys are summed with np.add.reduceat, which stays
exact for uint64 (no float round trip as np.bincount would do).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

U32 = npt.NDArray[np.uint32]
U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]


@dataclass
class Grouping:
    """Unique keys (sorted, column 0 most significant) and how rows map to them."""

    keys: U32
    order: I64
    starts: I64
    inverse: I64

    def sum(self, values: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        if len(values) == 0:
            return values
        return np.add.reduceat(values[self.order], self.starts)

    def max(self, values: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        if len(values) == 0:
            return values
        return np.maximum.reduceat(values[self.order], self.starts)


def group(keys: U32) -> Grouping:
    """Group equal rows of a uint32 key matrix; keys come out sorted (column 0 first).

    The columns are bit-packed into as few uint64 words as their largest values
    allow (window string ids are small: four labels usually fit one word), so the
    sort is one argsort of a 1-D column -- exact, and ~4x faster than a lexsort
    pass per column plus comparing whole rows.
    """
    n = len(keys)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Grouping(keys, empty, empty, empty)
    words = pack_columns(keys)
    if len(words) == 1:
        order = np.argsort(words[0]).astype(np.int64)
    else:
        order = np.lexsort(words[::-1]).astype(np.int64)
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for w in words:
        sw = w[order]
        change[1:] |= sw[1:] != sw[:-1]
    starts = np.flatnonzero(change).astype(np.int64)
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.cumsum(change) - 1
    return Grouping(np.take(keys, order[starts], axis=0), order, starts, inverse)


def pack_columns(keys: U32) -> list[npt.NDArray[np.uint64]]:
    """The rows of a uint32 matrix as big-endian bit-packed uint64 words (exact)."""
    words: list[npt.NDArray[np.uint64]] = []
    cur: npt.NDArray[np.uint64] | None = None
    used = 0
    for j in range(keys.shape[1]):
        col = keys[:, j]
        width = max(1, int(col.max()).bit_length())
        c = col.astype(np.uint64)
        if cur is None:
            cur, used = c, width
        elif used + width <= 64:
            cur = (cur << np.uint64(width)) | c
            used += width
        else:
            words.append(cur)
            cur, used = c, width
    assert cur is not None
    words.append(cur)
    return words


# -- hashing and ragged columns ------------------------------------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: U64) -> U64:
    """splitmix64's finalizer over a whole column (a bijection on uint64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def hash_rows(columns: list[npt.NDArray[np.generic]], seed: int) -> U64:
    """A 64-bit hash per row of several integer columns (order-sensitive)."""
    with np.errstate(over="ignore"):
        h = np.full(len(columns[0]), np.uint64(seed) * _GOLDEN + np.uint64(1), dtype=np.uint64)
        for c in columns:
            h = mix64(h ^ (c.astype(np.uint64) + _GOLDEN + (h << np.uint64(6)) + (h >> np.uint64(2))))
        return h


def hash_ragged(offsets: I64, values: U32) -> tuple[U64, U64]:
    """Two independent 64-bit hashes per variable-length row ``values[offsets[i]:offsets[i+1]]``.

    Position-dependent, so [a, b] and [b, a] differ. Used for stack identity inside
    one window: 128 bits make a collision among a window's stacks ~2^-90 likely.
    """
    n = len(offsets) - 1
    lens = np.diff(offsets)
    h1 = np.zeros(n, dtype=np.uint64)
    h2 = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        if len(values):
            pos = np.arange(len(values), dtype=np.uint64) - np.repeat(offsets[:-1], lens).astype(np.uint64)
            x = values.astype(np.uint64) * _GOLDEN + pos * _M1
            nonempty = lens > 0
            starts = offsets[:-1][nonempty]
            h1[nonempty] = np.add.reduceat(mix64(x + np.uint64(1)), starts)
            h2[nonempty] = np.add.reduceat(mix64(x ^ _M2), starts)
        tail = lens.astype(np.uint64) * _M2
        return mix64(h1 ^ (tail + np.uint64(1))), mix64(h2 ^ (tail + np.uint64(2)))


def ragged_index(offsets: I64, rows: I64) -> tuple[I64, I64]:
    """For rows ``rows`` of a ragged column: their new offsets and the value indices."""
    lens = np.diff(offsets)[rows]
    new_off = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=new_off[1:])
    starts = offsets[:-1][rows]
    idx = np.arange(new_off[-1], dtype=np.int64) - np.repeat(new_off[:-1] - starts, lens)
    return new_off, idx


def group_hashes(h1: U64, h2: U64) -> tuple[I64, I64, I64]:
    """Group rows by a 128-bit hash: (order, starts, inverse) like Grouping."""
    n = len(h1)
    if n == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, e
    order = np.lexsort((h2, h1)).astype(np.int64)
    a, b = h1[order], h2[order]
    change = np.ones(n, dtype=bool)
    change[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    starts = np.flatnonzero(change).astype(np.int64)
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.cumsum(change) - 1
    return order, starts, inverse
