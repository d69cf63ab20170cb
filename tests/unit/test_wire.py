"""Sealed (zstd) batches: what an edge seals opens to the same batch; bad bodies are refused."""

from __future__ import annotations

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from stratoscope.edge.batch import BatchBuilder
from stratoscope.edge.decode import Histogram
from stratoscope.v1 import batch_pb2 as pb
from stratoscope.wire import WireError, open_sealed, seal

NS = 1_000_000_000


def batch(seq: int, counters: dict[tuple[str, str], int]) -> pb.Batch:
    b = BatchBuilder("node-a", "boot-1", seq, 10 * NS, 20 * NS, {"region": "eu"})
    b.add_counters("syscalls_total", "calls", "h", ["syscall", "comm"], counters)
    b.add_histograms("syscall_latency", "ns", "h", ["syscall", "comm"],
                     {k: Histogram({3: v, 9: 1}, zero=1, count=v + 2, sum=v * 100) for k, v in counters.items()})
    return b.build()


names = st.text(alphabet="abcdefgh_", min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2**63), st.dictionaries(st.tuples(names, names), st.integers(0, 2**40), max_size=40))
def test_sealed_batch_opens_to_the_same_batch(seq: int, counters: dict[tuple[str, str], int]) -> None:
    original = batch(seq, counters)
    sealed = seal(original)
    # identity and window stay readable without inflating anything
    assert (sealed.node_id, sealed.boot_id, sealed.seq, sealed.start_ns, sealed.end_ns) == (
        "node-a", "boot-1", seq, 10 * NS, 20 * NS)
    assert not sealed.strings and not sealed.metrics
    wire = sealed.SerializeToString()
    opened, size = open_sealed(pb.Batch.FromString(wire), 1 << 24)
    assert opened == original
    assert size == len(zstandard.ZstdDecompressor().decompress(sealed.body))


def test_unsealed_batch_passes_through() -> None:
    original = batch(1, {("read", "x"): 5})
    assert open_sealed(original, 1 << 24) == (original, -1)


def sealed_with(body: bytes, codec: int = pb.CODEC_ZSTD) -> pb.Batch:
    return pb.Batch(node_id="n", boot_id="b", seq=1, start_ns=1, end_ns=2, codec=codec, body=body)


@pytest.mark.parametrize("case, message", [
    (sealed_with(b"not zstd at all"), "does not inflate"),
    # a small body that declares a huge size: refused before any allocation
    (sealed_with(zstandard.ZstdCompressor().compress(b"\0" * (8 << 20))), "more than 1048576"),
    # the same bomb without a declared size: stopped while inflating
    (sealed_with(zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (8 << 20))),
     "does not inflate within 1048576"),
    (sealed_with(zstandard.ZstdCompressor().compress(b"\xff\xff\xff")), "not a Batch"),
    (sealed_with(b"x", codec=7), "unknown codec 7"),
    (sealed_with(b"x", codec=pb.CODEC_NONE), "body present without a codec"),
    (sealed_with(zstandard.ZstdCompressor().compress(seal(batch(1, {})).SerializeToString())),
     "must not be sealed again"),
])
def test_bad_sealed_bodies_are_refused_with_a_reason(case: pb.Batch, message: str) -> None:
    with pytest.raises(WireError, match=message):
        open_sealed(pb.Batch.FromString(case.SerializeToString()), 1 << 20)
