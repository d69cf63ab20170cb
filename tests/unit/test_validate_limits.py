"""Issue 20, scope 2: nothing a client sends can hurt others. Each rule of the Gate and of
validate() that bounds what one batch may cost, with the exact reason it answers."""

from __future__ import annotations

import logging

import grpc
import pytest

from stratoscope.edge.batch import BatchBuilder
from stratoscope.regional.auth import Refused
from stratoscope.regional.gate import Gate, RejectionLog
from stratoscope.regional.validate import NS, REASONS, BatchRejected, Limits, validate
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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_gauges_must_be_finite(bad: float) -> None:
    b = batch()
    g = BatchBuilder("node-1", "boot", 1, NOW - 10 * NS, NOW, {})
    g.add_counters("load", "1", "", ["cpu"], {("0",): 1.5, ("1",): bad}, kind=pb.GAUGE)
    b = g.build()
    assert rejected(b) == "metrics[0]: a gauge is NaN or infinite"


def test_counters_may_not_sum_past_uint64_over_a_batch() -> None:
    g = BatchBuilder("node-1", "boot", 1, NOW - 10 * NS, NOW, {})
    g.add_counters("bytes_total", "By", "", ["dev"], {("a",): 2**64 - 3, ("b",): 2})
    validate(g.build(), Limits(), NOW)  # 2^64-1 exactly: fits
    g = BatchBuilder("node-1", "boot", 1, NOW - 10 * NS, NOW, {})
    g.add_counters("bytes_total", "By", "", ["dev"], {("a",): 2**64 - 3, ("b",): 3})
    assert rejected(g.build()) == "metrics[0]: counter values add up past 2^64-1"


def test_histogram_sums_may_not_wrap_either() -> None:
    from stratoscope.edge.decode import Histogram

    g = BatchBuilder("node-1", "boot", 1, NOW - 10 * NS, NOW, {})
    g.add_histograms("lat", "ns", "", ["a"], {(x,): Histogram({3: 1}, count=1, sum=2**63) for x in "ab"})
    assert rejected(g.build()) == "histograms[0]: sums add up past 2^64-1"


def _with_events(*times: int) -> pb.Batch:
    from stratoscope.edge.batch import EventRow

    g = BatchBuilder("node-1", "boot", 1, NOW - 10 * NS, NOW, {})
    g.add_events([EventRow(t, "exit", 1, 0, "ls", "/", "", 0) for t in times], lost=0)
    return g.build()


def test_event_times_lie_in_the_window_widened_by_the_skew() -> None:
    validate(_with_events(NOW - 10 * NS - 300 * NS, NOW + 300 * NS), Limits(), NOW)
    reason = "events: a time outside the window widened by 300s"
    assert rejected(_with_events(NOW - 10 * NS - 301 * NS)) == reason
    assert rejected(_with_events(NOW, NOW + 301 * NS)) == reason
    assert rejected(_with_events(NOW, 5)) == reason  # the epoch, a partition of its own


@pytest.mark.parametrize(("spoil", "reason"), [
    (lambda b: setattr(b, "seq", 0), "identity"),
    (lambda b: setattr(b, "end_ns", b.start_ns), "window"),
    (lambda b: setattr(b, "end_ns", NOW + 400 * NS), "window"),
    (lambda b: b.metrics[0].label_values_le.__len__() and b.metrics[0].label_values.append(1), "encoding"),
    (lambda b: setattr(b, "codec", pb.CODEC_ZSTD), "encoding"),
    (lambda b: b.strings.__setitem__(0, "x"), "strings"),
    (lambda b: setattr(b.metrics[0], "name", 999), "strings"),
    (lambda b: setattr(b.metrics[0], "kind", 7), "series"),
])
def test_every_rejection_is_counted_under_a_fixed_reason(spoil: object, reason: str) -> None:
    b = batch()
    spoil(b)  # type: ignore[operator]
    ack, cols, label = gate().admit(b, None, None)
    assert (ack.status, label, cols) == (ingest_pb2.Ack.REJECTED, reason, None)
    assert label in REASONS and ack.reason  # the text stays in the ack


def test_a_batch_too_large_is_counted_under_size_its_numbers_in_the_ack_only() -> None:
    ack, _, label = gate().admit(batch(), None, 17 * 1024 * 1024)
    assert (label, ack.reason) == ("size", "batch of 17825792 bytes exceeds 16777216")


def test_an_unknown_reason_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown rejection reason 'metrics'"):
        BatchRejected("x", "metrics")


def test_rejections_are_logged_once_per_reason_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    t = [100.0]
    g = gate()
    g.rejections = RejectionLog(every_s=10, clock=lambda: t[0])
    evil = "evil\n\x1b[31m" + "n" * 200
    with caplog.at_level(logging.WARNING, "stratoscope.regional"):
        for seq in range(1, 6):  # five bad windows, one line
            b = batch(node=evil, seq=seq)
            b.end_ns = b.start_ns
            g.admit(b, None, None)
        g.admit(batch(boot=""), None, None)  # another reason: a line of its own
        t[0] = 111.0
        b = batch(seq=9)
        b.end_ns = b.start_ns
        g.admit(b, None, None)
    lines = [r.getMessage() for r in caplog.records]
    shown_evil = "'evil\\n\\x1b[31m" + "n" * 38 + "'..."
    assert lines == [
        f"rejected batch (window) from node {shown_evil} seq 1: window start must be before its end",
        "rejected batch (identity) from node 'node-1' seq 1: boot_id must be 1-64 bytes",
        "rejected batch (window) from node 'node-1' seq 9: window start must be before its end"
        " (4 more rejected for window in the last 11s)",
    ]


def test_a_node_id_that_does_not_match_the_credentials_is_refused_and_not_logged_raw(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "stratoscope.regional"), \
            pytest.raises(Refused) as refused:
        gate().admit(batch(node="x\n" * 100), frozenset({"node-1"}), None)
    assert (refused.value.reason, refused.value.code) == ("node_mismatch", grpc.StatusCode.PERMISSION_DENIED)
    [line] = [r.getMessage() for r in caplog.records]
    assert "\n" not in line and len(line) < 200
    assert line.endswith("node_id is not one this client authenticated as ('node-1')")
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 200
