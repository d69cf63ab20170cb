"""The ingest process's hand-over of an admitted batch (regional/handover.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stratoscope.columns import to_packed
from stratoscope.edge.batch import BatchBuilder
from stratoscope.regional.batchcols import BatchCols, decode
from stratoscope.regional.handover import pack, unpack
from stratoscope.regional.merge import Aggregator, MergeSettings
from tests.frames import block_batch
from tests.unit.test_columns import full_batch


def assert_same(a: Any, b: Any) -> None:
    """Dataclasses compared field by field; arrays by dtype and values."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b)
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def test_every_kind_of_block_comes_back_exactly() -> None:
    cols = decode(full_batch())
    back = unpack(pack(cols))
    assert_same(cols, back)
    assert back.events is not None and back.events.lost == 2
    # views of the buffer, like columns decoded from x_le: nothing downstream writes them
    assert not back.metrics[0].counter_values.flags.writeable


def test_packed_repeated_fields_and_odd_lengths_come_back_exactly() -> None:
    b = BatchBuilder("n", "boot", 3, 10, 20, {})
    b.add_counters("m", "1", "", ["a", "b", "c"], {("x", "y", "z"): 1})  # 3 uint32: 12 bytes
    cols = decode(to_packed(b.build()))  # arrays from repeated fields, not views of bytes
    assert cols.events is None
    assert_same(cols, unpack(pack(cols)))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(max_size=8), min_size=1, max_size=30))
@example(["a\0b"])
@example(["\0"])
def test_any_string_table_comes_back_exactly(extra: list[str]) -> None:
    """Strings travel NUL-joined; a table whose strings hold NUL themselves still round-trips."""
    cols = decode(full_batch())
    cols = dataclasses.replace(cols, strings=cols.strings + extra)
    assert unpack(pack(cols)).strings == cols.strings


def test_merging_unpacked_columns_equals_merging_decoded_ones() -> None:
    def blocks(convert: Any) -> list[Any]:
        agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0))
        for seq in (1, 2):
            cols: BatchCols = decode(full_batch(seq))
            agg.record(convert(cols))
        return agg.flush(0, force=True)

    here = blocks(lambda c: c)
    there = blocks(lambda c: unpack(pack(c)))
    assert [b.block_id for b in here] == [b.block_id for b in there]
    assert [block_batch(b).SerializeToString() for b in here] == [block_batch(b).SerializeToString() for b in there]


def test_a_buffer_shorter_than_its_layout_is_refused() -> None:
    """Eight bytes of the array region missing: the arrays would be cut short silently."""
    wire = pack(decode(full_batch()))
    with pytest.raises(ValueError, match="layout"):
        unpack(wire[8:])
