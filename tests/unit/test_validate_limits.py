"""Issue 20, scope 2: nothing a client sends can hurt others. Each rule of the Gate and of
validate() that bounds what one batch may cost, with the exact reason it answers."""

from __future__ import annotations

import pytest

from stratoscope.edge.batch import BatchBuilder
from stratoscope.regional.gate import Gate
from stratoscope.regional.validate import NS, BatchRejected, Limits, validate
from stratoscope.v1 import batch_pb2 as pb
from stratoscope.v1 import ingest_pb2
from stratoscope.wire import seal

NOW = 1_800_000_000 * NS


def batch(node: str = "node-1", boot: str = "boot", seq: int = 1) -> pb.Batch:
    b = BatchBuilder(node, boot, seq, NOW - 10 * NS, NOW, {"region": "eu"})
    b.add_counters("syscalls_total", "calls", "h", ["syscall"], {("read",): 5, ("write",): 2})
    return b.build()


def gate() -> Gate:
    return Gate(clock=lambda: NOW)


def rejected(b: pb.Batch, limits: Limits | None = None) -> str:
    with pytest.raises(BatchRejected) as exc:
        validate(b, limits or Limits(), NOW)
    return str(exc.value)


def test_an_ordinary_batch_passes() -> None:
    ack, cols, label = gate().admit(batch(), None, None)
    assert (ack.status, label) == (ingest_pb2.Ack.ACCEPTED, "")
    assert cols is not None and cols.points == 2


@pytest.mark.parametrize(("node", "boot", "reason"), [
    ("", "boot", "node_id must be 1-253 characters"),
    ("n" * 254, "boot", "node_id must be 1-253 characters"),
    ("node-1", "", "boot_id must be 1-64 bytes"),
    ("node-1", "b" * 65, "boot_id must be 1-64 bytes"),
    ("node-1", "é" * 33, "boot_id must be 1-64 bytes"),  # 66 bytes in 33 characters
])
def test_identity_is_bounded_before_dedup(node: str, boot: str, reason: str) -> None:
    g = gate()
    ack, cols, label = g.admit(batch(node, boot), None, None)
    assert (ack.status, ack.reason, label, cols) == (ingest_pb2.Ack.REJECTED, reason, "identity", None)
    assert ack.boot_id == ""  # an oversized identity is not echoed back
    assert g.dedup.state() == []  # nothing remembered under it


def test_a_sealed_batch_with_a_huge_boot_id_and_no_points_is_rejected() -> None:
    """The sealed header is outside the size check: an 8 MiB boot_id in it was accepted."""
    b = pb.Batch(node_id="node-1", boot_id="x" * (8 << 20), seq=1, start_ns=NOW - 10 * NS, end_ns=NOW,
                 strings=[""])
    sealed = seal(b)
    assert sealed.boot_id == b.boot_id  # the identity stays in the clear header
    g = gate()
    ack, _, label = g.admit(sealed, None, None)
    assert (ack.status, label) == (ingest_pb2.Ack.REJECTED, "identity")
    assert g.dedup.state() == []


def test_a_boot_id_of_64_bytes_passes() -> None:
    ack, _, _ = gate().admit(batch(boot="b" * 64), None, None)
    assert ack.status == ingest_pb2.Ack.ACCEPTED


def test_unreferenced_strings_beyond_a_small_allowance_are_rejected() -> None:
    """200,000 strings and no points were accepted: each is interned into the window."""
    b = pb.Batch(node_id="node-1", boot_id="boot", seq=1, start_ns=NOW - 10 * NS, end_ns=NOW,
                 strings=["", *(f"s{i}" for i in range(199_999))])
    assert rejected(b) == "199999 strings are not referred to (at most 16)"
    ack, _, _ = gate().admit(b, None, None)
    assert ack.status == ingest_pb2.Ack.REJECTED


def test_sixteen_unreferenced_strings_pass_and_seventeen_do_not() -> None:
    b = batch()
    b.strings.extend(f"spare{i}" for i in range(16))
    validate(b, Limits(), NOW)
    b.strings.append("one more")
    assert rejected(b) == "17 strings are not referred to (at most 16)"


def test_the_string_table_is_bounded_as_a_whole() -> None:
    b = batch()
    b.strings.extend("x" * 4000 + str(i) for i in range(1100))  # each under 4096, 4.4 M in all
    assert rejected(b) == "strings exceed 4194304 characters in all"
    validate(b, Limits(max_strings_chars=5_000_000, max_unreferenced_strings=2000), NOW)
