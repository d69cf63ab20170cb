"""Numeric columns of a Batch in either of their two encodings (see batch.proto).

Every numeric column ``x`` of the wire contract is a packed repeated field and has
a twin ``x_le``: the same values as raw little-endian fixed-width numbers. Why the
twin: a 2,000-series batch has ~80 columns and ~21,000 values. Parsing them as
packed varints costs upb ~0.37 ms and turning them into numpy arrays another
~0.5 ms, most of it a fixed ~5 us per column, and a regional pays that once in its
ingest process and again in its merge. ``numpy.frombuffer`` over ``x_le`` costs
~1 us a column and nothing per value. The edge writes ``x_le``; readers accept
both (older edges, hand-written tests, other producers), and this module is the
one place that knows how.

The width of ``x_le`` comes from the type of ``x`` in the descriptor, so a column
added to the .proto with its twin needs nothing here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from stratoscope.v1 import batch_pb2 as pb

#: Little-endian dtype of an ``x_le`` twin, by the protobuf type of ``x``.
_WIRE_DTYPES: dict[int, np.dtype[Any]] = {
    FieldDescriptor.TYPE_UINT32: np.dtype("<u4"),
    FieldDescriptor.TYPE_SINT32: np.dtype("<i4"),
    FieldDescriptor.TYPE_INT32: np.dtype("<i4"),
    FieldDescriptor.TYPE_UINT64: np.dtype("<u8"),
    FieldDescriptor.TYPE_FIXED64: np.dtype("<u8"),
    FieldDescriptor.TYPE_SINT64: np.dtype("<i8"),
    FieldDescriptor.TYPE_INT64: np.dtype("<i8"),
    FieldDescriptor.TYPE_DOUBLE: np.dtype("<f8"),
}

#: Below this many values ``np.fromiter`` beats ``np.asarray`` on a packed field
#: (asarray's fixed cost is ~4 us, fromiter's per-value cost ~70 ns).
_SMALL = 32


class ColumnError(ValueError):
    """A column cannot be read; the message names it."""


def _twins(desc: Descriptor) -> dict[str, np.dtype[Any]]:
    out = {}
    for f in desc.fields:
        if f.name.endswith("_le"):
            packed = desc.fields_by_name[f.name[:-3]]
            out[packed.name] = _WIRE_DTYPES[packed.type]
    return out


#: (message name, column) -> dtype of its ``_le`` twin, from the descriptors.
WIRE: dict[str, dict[str, np.dtype[Any]]] = {
    m.DESCRIPTOR.name: _twins(m.DESCRIPTOR)
    for m in (pb.Batch, pb.MetricBlock, pb.HistogramBlock, pb.ProfileBlock, pb.EventBlock)
}


def read(msg: Any, name: str, dtype: npt.DTypeLike) -> npt.NDArray[Any]:
    """Column ``name`` of ``msg`` as an array of ``dtype``, from whichever encoding is set.

    An array read from ``x_le`` of the same dtype is a read-only view of the message's
    bytes. Raises ColumnError if both encodings are set or ``x_le`` is not a whole
    number of values.
    """
    raw: bytes = getattr(msg, name + "_le")
    packed = getattr(msg, name)
    if raw:
        if len(packed):
            raise ColumnError(f"{msg.DESCRIPTOR.name}.{name} is given in both encodings")
        wire = WIRE[msg.DESCRIPTOR.name][name]
        if len(raw) % wire.itemsize:
            raise ColumnError(f"{msg.DESCRIPTOR.name}.{name}_le has {len(raw)} bytes, "
                              f"not a whole number of {wire.itemsize}-byte values")
        values = np.frombuffer(raw, dtype=wire)
        return values if values.dtype == dtype else values.astype(dtype)
    n = len(packed)
    if n < _SMALL:
        return np.fromiter(packed, dtype=dtype, count=n)
    return np.asarray(packed, dtype=dtype)


def _blocks(batch: pb.Batch) -> Iterator[Any]:
    yield batch
    yield from batch.metrics
    yield from batch.histograms
    yield from batch.profiles
    if batch.HasField("events"):
        yield batch.events


def to_raw(batch: pb.Batch) -> pb.Batch:
    """Move every packed column of ``batch`` into its ``_le`` twin (in place; returned)."""
    for msg in _blocks(batch):
        for name, wire in WIRE[msg.DESCRIPTOR.name].items():
            packed = getattr(msg, name)
            if len(packed):
                setattr(msg, name + "_le", np.asarray(packed, dtype=wire).tobytes())
                msg.ClearField(name)
    return batch


def packed_copy(batch: pb.Batch) -> pb.Batch:
    """A copy of ``batch`` with every column packed; ``batch`` itself is left as it is."""
    copy = pb.Batch()
    copy.CopyFrom(batch)
    return to_packed(copy)


def to_packed(batch: pb.Batch) -> pb.Batch:
    """Move every ``_le`` column of ``batch`` into its packed field (in place; returned),
    for code that reads the repeated fields directly. Raises ColumnError like read()."""
    for msg in _blocks(batch):
        for name, wire in WIRE[msg.DESCRIPTOR.name].items():
            if getattr(msg, name + "_le"):
                values = read(msg, name, wire)
                msg.ClearField(name + "_le")
                getattr(msg, name).extend(values.tolist())
    return batch
