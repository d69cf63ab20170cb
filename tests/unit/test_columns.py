"""The two encodings of a numeric column (stratoscope/columns.py): packed and raw ``_le``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stratoscope.columns import WIRE, ColumnError, read, to_packed, to_raw
from stratoscope.edge.batch import BatchBuilder, EventRow, batch_to_dict
from stratoscope.edge.decode import Histogram, ProfileRow
from stratoscope.regional.batchcols import decode
from stratoscope.regional.validate import BatchRejected, Limits, validate
from stratoscope.v1 import batch_pb2 as pb


def full_batch(seq: int = 1) -> pb.Batch:
    """Every kind of block, with negative stack ids, big counters and signed codes."""
    b = BatchBuilder("node-1", "boot", seq, 10, 20, {"region": "eu"})
    b.add_counters("m_total", "1", "", ["a"], {("x",): 2**64 - 1, ("y",): 3})
    b.add_counters("g", "1", "", [], {(): 7}, kind=pb.GAUGE)
    b.add_histograms("h", "ns", "", ["a"], {("x",): Histogram({-1: 2, 40: 5}, zero=1, count=8, sum=2**40)})
    b.add_profile("cpu", 10_000_000, {
        ProfileRow(10, "app", "/c", ("k1", "k0"), ("u1",)): 4,
        ProfileRow(11, "app", "/c", None, ("u1",)): 1,
    })
    b.add_events([EventRow(5, "exit", 10, 1, "app", "/c", "", -9)], lost=2)
    return b.build()


def test_wire_dtypes_come_from_the_descriptor() -> None:
    assert WIRE["MetricBlock"] == {"label_keys": np.dtype("<u4"), "label_values": np.dtype("<u4"),
                                   "counter_values": np.dtype("<u8"), "gauge_values": np.dtype("<f8")}
    assert WIRE["HistogramBlock"]["bucket_index"] == np.dtype("<i4")  # sint32
    assert WIRE["ProfileBlock"]["kernel_stack"] == np.dtype("<i4")
    assert WIRE["EventBlock"]["time_ns"] == np.dtype("<u8")  # fixed64
    assert WIRE["EventBlock"]["code"] == np.dtype("<i8")  # sint64
    assert set(WIRE["Batch"]) == {"node_label_keys", "node_label_values"}


def test_the_edge_sends_raw_columns_only() -> None:
    b = full_batch()
    h = b.histograms[0]
    assert not len(h.bucket_count) and h.bucket_count_le == np.array([2, 5], "<u8").tobytes()
    assert b.profiles[0].kernel_stack_le == np.array([0, -1], "<i4").tobytes()
    for msg in (b, *b.metrics, *b.histograms, *b.profiles, b.events):
        for name in WIRE[msg.DESCRIPTOR.name]:
            assert not len(getattr(msg, name)), (msg.DESCRIPTOR.name, name)


def test_both_encodings_decode_to_the_same_columns() -> None:
    raw = full_batch()
    packed = to_packed(pb.Batch.FromString(raw.SerializeToString()))
    assert packed.histograms[0].bucket_index == [-1, 40]
    assert not packed.histograms[0].bucket_index_le
    a, b = decode(raw), decode(packed)
    assert a.metrics[0].counter_values.tolist() == [2**64 - 1, 3]
    assert a.events is not None and a.events.code.tolist() == [-9] and a.events.lost == 2
    for x, y in [(a.metrics, b.metrics), (a.histograms, b.histograms), (a.profiles, b.profiles),
                 ([a.events], [b.events])]:
        for cx, cy in zip(x, y, strict=True):
            for field, vx in vars(cx).items():
                vy = getattr(cy, field)
                if isinstance(vx, np.ndarray):
                    assert vx.dtype == vy.dtype and vx.tolist() == vy.tolist(), field
                else:
                    assert vx == vy, field
    assert batch_to_dict(raw) == batch_to_dict(packed)
    assert to_raw(packed).SerializeToString() == raw.SerializeToString()


def test_a_column_in_both_encodings_is_refused() -> None:
    b = full_batch()
    b.metrics[0].counter_values.append(1)
    with pytest.raises(ColumnError, match=r"MetricBlock.counter_values is given in both encodings"):
        read(b.metrics[0], "counter_values", np.uint64)
    with pytest.raises(BatchRejected, match=r"^column: MetricBlock.counter_values"):
        validate(b, Limits(), now_ns=20)


def test_a_raw_column_that_is_not_whole_values_is_refused() -> None:
    b = full_batch()
    b.histograms[0].sum_le += b"\x00\x00\x00"
    with pytest.raises(BatchRejected, match=r"HistogramBlock.sum_le has 11 bytes, not a whole number of 8-byte"):
        validate(b, Limits(), now_ns=20)


def test_a_raw_column_of_the_wrong_length_is_refused_like_a_packed_one() -> None:
    b = full_batch()
    b.histograms[0].count_le = np.array([1, 2], "<u8").tobytes()  # 1 series, 2 counts
    with pytest.raises(BatchRejected, match=r"histograms\[0\]: columns differ in length"):
        validate(b, Limits(), now_ns=20)


def test_raw_columns_are_read_only_views() -> None:
    cols = decode(full_batch())
    with pytest.raises(ValueError, match="read-only"):
        cols.metrics[0].counter_values[0] = 1


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=70))
def test_signed_columns_round_trip_through_either_encoding(values: list[int]) -> None:
    h = pb.HistogramBlock(bucket_index=values)
    assert read(h, "bucket_index", np.int64).tolist() == values
    b = pb.Batch(histograms=[h])
    to_raw(b)
    assert not len(b.histograms[0].bucket_index)
    assert read(b.histograms[0], "bucket_index", np.int64).tolist() == values
    assert list(to_packed(b).histograms[0].bucket_index) == values


def test_the_forwarder_can_send_packed_columns_for_older_regionals() -> None:
    from stratoscope.edge.forward import ConfigError, GrpcForwarder

    with pytest.raises(ConfigError, match="wire columns 'dense'"):
        GrpcForwarder(["127.0.0.1:1"], wire_columns="dense")
    fwd = GrpcForwarder(["127.0.0.1:1"], compression="none", wire_columns="packed")
    try:
        raw = full_batch()
        fwd.write(raw)
        sent = pb.Batch.FromString(fwd.spool.read((raw.boot_id, raw.seq)) or b"")
        assert list(sent.metrics[0].counter_values) == [2**64 - 1, 3] and not sent.metrics[0].counter_values_le
        assert raw.metrics[0].counter_values_le  # the caller's batch is left as it was
    finally:
        fwd.close(0)
