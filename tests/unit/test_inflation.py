"""Issue 20: how far a sealed body may inflate for its size (``Limits.max_inflation``, at
least ``Limits.inflation_floor``), checked before protobuf parses anything.

Exact at the edge of the bound, with and without the size declared in the zstd frame; a
body over it never inflated further than the bound; real recorded batches, the
profile-heavy one first, accepted with a margin; the fuzz oracle agreeing throughout.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import zstandard

from stratoscope.edge.batch import BatchBuilder, batch_from_dict
from stratoscope.regional.gate import Gate
from stratoscope.regional.validate import NS, REASONS, Limits, parse_batch
from stratoscope.v1 import batch_pb2 as pb
from stratoscope.v1 import ingest_pb2
from stratoscope.wire import InflationError, inflation_cap, open_sealed, seal, varint
from tests.fuzz.batches import expected_reasons

ACCEPTED, REJECTED = ingest_pb2.Ack.ACCEPTED, ingest_pb2.Ack.REJECTED
NOW = 1_800_000_000 * NS
DATA = Path(__file__).resolve().parents[2] / "loadtest" / "data"
LIMITS = Limits()
HEADER = ("node_id", "boot_id", "seq", "start_ns", "end_ns")


def recorded(name: str) -> list[pb.Batch]:
    """The batches of loadtest/data/``name`` (real edges), their windows moved to end at NOW
    one after the other and their events into their window (recorded boot-relative)."""
    with gzip.open(DATA / name, "rt") as f:
        dicts: list[dict[str, Any]] = [json.loads(line) for line in f if line.strip()]
    out = []
    for i, d in enumerate(dicts):
        width = d["end_ns"] - d["start_ns"]
        end = NOW - (len(dicts) - 1 - i) * width
        t0 = min((e["time_ns"] for e in d["events"]), default=0)
        out.append(batch_from_dict(dict(
            d, node_id="node-1", boot_id="boot-1", seq=i + 1, start_ns=end - width, end_ns=end,
            events=[dict(e, time_ns=end - width + (e["time_ns"] - t0) % width) for e in d["events"]])))
    return out


def small() -> pb.Batch:
    b = BatchBuilder("node-1", "boot-1", 1, NOW - 10 * NS, NOW, {"region": "eu"})
    b.add_counters("syscalls_total", "calls", "h", ["syscall"], {("read",): 5, ("write",): 2})
    return b.build()


def admit(wire: bytes) -> tuple[int, str, str]:
    ack, _, label = Gate(LIMITS, clock=lambda: NOW).admit(parse_batch(wire), None, len(wire))
    return ack.status, label, ack.reason


def padded(whole: pb.Batch, over: int, sized: bool) -> tuple[bytes, int, int]:
    """``whole`` sealed as the edge seals it (zstd level 6), its body ending in an unknown
    field of zeros (the parse skips it) sized so that the body inflates to ``over`` bytes
    past the bound for its compressed size. (wire bytes, compressed, inflated)."""
    body = pb.Batch()
    body.CopyFrom(whole)
    for name in HEADER:
        body.ClearField(name)
    head = body.SerializeToString() + varint(99 << 3 | 2)
    z = zstandard.ZstdCompressor(level=6, write_content_size=sized)
    n = 0
    for _ in range(32):
        raw = head + varint(n) + bytes(n)
        compressed = z.compress(raw)
        bound = inflation_cap(len(compressed), LIMITS.max_bytes, LIMITS.max_inflation, LIMITS.inflation_floor)
        if len(raw) == bound + over:
            break
        n += bound + over - len(raw)
    else:
        raise AssertionError("no padding puts the body there")
    sealed = seal(whole)
    sealed.body = compressed
    return sealed.SerializeToString(), len(compressed), len(raw)


def test_the_bound_is_the_ratio_times_the_compressed_size_with_a_floor() -> None:
    assert (LIMITS.max_inflation, LIMITS.inflation_floor, LIMITS.max_bytes) == (64, 65_536, 16 << 20)
    assert inflation_cap(1_000, LIMITS.max_bytes, 64, 65_536) == 65_536  # the floor
    assert inflation_cap(1_025, LIMITS.max_bytes, 64, 65_536) == 65_600
    assert inflation_cap(41_636, LIMITS.max_bytes, 64, 65_536) == 2_664_704
    assert inflation_cap(300_000, LIMITS.max_bytes, 64, 65_536) == 16 << 20  # the batch limit
    assert inflation_cap(1_000, LIMITS.max_bytes) == 16 << 20  # no ratio: the batch limit alone
    assert "inflation" in REASONS


@pytest.mark.parametrize("sized", [True, False], ids=["size-declared", "size-not-declared"])
@pytest.mark.parametrize("base", ["real", "small"])
def test_a_body_at_the_bound_passes_and_one_byte_past_it_does_not(base: str, sized: bool) -> None:
    """The real batch is bounded by its ratio (64 x ~42 KB), the small one by the floor."""
    whole = recorded("edge_batch.jsonl.gz")[0] if base == "real" else small()
    wire, compressed, inflated = padded(whole, 0, sized)
    assert inflated == (64 * compressed if base == "real" else 65_536)
    assert admit(wire) == (ACCEPTED, "", "")
    assert expected_reasons(parse_batch(wire), LIMITS, NOW, len(wire)) == frozenset()

    wire, compressed, inflated = padded(whole, 1, sized)
    bound = inflated - 1
    assert bound == (64 * compressed if base == "real" else 65_536)
    reason = (f"compressed body: body of {compressed} bytes inflates to {inflated}, more than {bound} "
              f"(64x its size, at least 65536)" if sized else
              f"compressed body: body of {compressed} bytes inflates past {bound} (64x its size, at least 65536)")
    assert admit(wire) == (REJECTED, "inflation", reason)
    assert expected_reasons(parse_batch(wire), LIMITS, NOW, len(wire)) == frozenset({"inflation"})


def empty_blocks(sized: bool) -> pb.Batch:
    """loadtest/rejection_cost.py's lever: 16 MiB of empty metric blocks in a body of ~1.5 KB,
    whose parse alone cost the ingest process ~1 s."""
    raw = pb.Batch(strings=[""]).SerializeToString() + b"\x4a\x00" * ((16 << 20) // 2 - 64)
    body = zstandard.ZstdCompressor(level=6, write_content_size=sized).compress(raw)
    return pb.Batch(node_id="node-1", boot_id="boot-1", seq=1, start_ns=NOW - 10 * NS, end_ns=NOW,
                    codec=pb.CODEC_ZSTD, body=body)


class _Reader:
    def __init__(self, inner: Any, log: list[int]) -> None:
        self.inner, self.log = inner, log

    def read(self, size: int) -> bytes:
        out: bytes = self.inner.read(size)
        self.log.append(len(out))
        return out


class _Decompressor:
    """zstandard.ZstdDecompressor, with what it is asked to produce written down."""

    real = zstandard.ZstdDecompressor
    asked: list[int] = []  # max_output_size of each decompress()
    read: list[int] = []  # bytes each stream read returned

    def __init__(self) -> None:
        self.inner = self.real()

    def decompress(self, data: bytes, max_output_size: int = 0) -> bytes:
        self.asked.append(max_output_size)
        return bytes(self.inner.decompress(data, max_output_size=max_output_size))

    def stream_reader(self, source: bytes) -> _Reader:
        return _Reader(self.inner.stream_reader(source), self.read)


def test_a_body_that_declares_too_much_is_refused_without_inflating(monkeypatch: pytest.MonkeyPatch) -> None:
    sealed = empty_blocks(sized=True)
    assert len(sealed.body) < 1600

    def no(*args: object, **kwargs: object) -> None:
        raise AssertionError("inflated")

    monkeypatch.setattr(zstandard, "ZstdDecompressor", no)
    bound = 64 * len(sealed.body)  # ~90 KB
    with pytest.raises(InflationError, match=rf"^body of {len(sealed.body)} bytes inflates to 16777090, "
                                             rf"more than {bound} \(64x its size, at least 65536\)$"):
        open_sealed(sealed, LIMITS.max_bytes, LIMITS.max_inflation, LIMITS.inflation_floor)


def test_a_body_that_does_not_declare_its_size_stops_at_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    sealed = empty_blocks(sized=False)
    _Decompressor.asked, _Decompressor.read = [], []
    monkeypatch.setattr(zstandard, "ZstdDecompressor", _Decompressor)
    bound = 64 * len(sealed.body)
    with pytest.raises(InflationError, match=rf"^body of {len(sealed.body)} bytes inflates past {bound} "):
        open_sealed(sealed, LIMITS.max_bytes, LIMITS.max_inflation, LIMITS.inflation_floor)
    # a buffer of the bound, then one byte past it read to tell a bomb from a fault
    assert _Decompressor.asked == [bound] and sum(_Decompressor.read) == bound + 1


@pytest.mark.parametrize("sized", [True, False], ids=["size-declared", "size-not-declared"])
def test_the_compressible_body_is_refused_for_inflation_through_the_gate(sized: bool) -> None:
    wire = empty_blocks(sized).SerializeToString()
    status, label, _ = admit(wire)
    assert (status, label) == (REJECTED, "inflation")
    assert expected_reasons(parse_batch(wire), LIMITS, NOW, len(wire)) == frozenset({"inflation"})


@pytest.mark.parametrize(("name", "packed"), [
    ("edge_profile.jsonl.gz", False), ("edge_profile.jsonl.gz", True),
    ("edge_batch.jsonl.gz", False), ("edge_minute.jsonl.gz", False),
])
def test_real_batches_are_accepted_sealed_as_an_edge_seals_them(name: str, packed: bool) -> None:
    """The recorded batches, the profile-heavy one (60 s of the profile program alone at
    99 Hz, 88 % of its bytes profile) first: accepted, and ~10x inside the bound."""
    from stratoscope.columns import packed_copy

    for whole in recorded(name):
        sealed = seal(packed_copy(whole) if packed else whole)
        inflated = len(zstandard.ZstdDecompressor().decompress(sealed.body))
        assert inflated * 10 < LIMITS.max_inflation * len(sealed.body), inflated / len(sealed.body)
        status, label, reason = admit(sealed.SerializeToString())
        assert (status, label, reason) == (ACCEPTED, "", "")
    if name == "edge_profile.jsonl.gz":
        [whole] = recorded(name)
        profile = sum(p.ByteSize() for p in whole.profiles)
        assert not whole.metrics and not whole.histograms and profile > 0.8 * whole.ByteSize()
