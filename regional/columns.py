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
    n = len(keys)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Grouping(keys, empty, empty, empty)
    order = np.lexsort(keys.T[::-1]).astype(np.int64)
    k = keys[order]
    change = np.ones(n, dtype=bool)
    if n > 1:
        change[1:] = np.any(k[1:] != k[:-1], axis=1)
    starts = np.flatnonzero(change).astype(np.int64)
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.cumsum(change) - 1
    return Grouping(k[starts], order, starts, inverse)
