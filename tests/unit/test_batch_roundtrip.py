"""Batch encode/decode round trips: what goes in comes out, through the wire format."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stratoscope.edge.batch import BatchBuilder, EventRow, batch_to_dict
from stratoscope.edge.decode import Histogram, ProfileRow
from stratoscope.v1 import batch_pb2 as pb

label = st.text(min_size=0, max_size=12)
labels3 = st.tuples(label, label, label)


@st.composite
def histograms(draw: st.DrawFn) -> Histogram:
    buckets = draw(st.dictionaries(st.integers(-1, 62), st.integers(1, 10**12), max_size=8))
    zero = draw(st.integers(0, 1000))
    return Histogram(buckets=buckets, zero=zero, count=zero + sum(buckets.values()),
                     sum=draw(st.integers(0, 2**63)))


@settings(max_examples=60, deadline=None)
@given(
    counters=st.dictionaries(labels3, st.integers(1, 2**64 - 1), max_size=30),
    hists=st.dictionaries(labels3, histograms(), max_size=10),
    node_labels=st.dictionaries(st.text(min_size=1, max_size=8), label, max_size=3),
    seq=st.integers(1, 2**63),
)
def test_counters_and_histograms_round_trip(
    counters: dict[tuple[str, ...], int],
    hists: dict[tuple[str, ...], Histogram],
    node_labels: dict[str, str],
    seq: int,
) -> None:
    keys = ["a", "b", "c"]
    b = BatchBuilder("node-1", "boot", seq, 10, 20, node_labels)
    b.add_counters("m_total", "calls", "help", keys, counters)
    b.add_histograms("h", "ns", "help", keys, hists)
    wire = b.build().SerializeToString()
    d = batch_to_dict(pb.Batch.FromString(wire))
    assert d["seq"] == seq and d["node_labels"] == node_labels
    got = {
        tuple(s["labels"][k] for k in keys): s["value"]
        for m in d["metrics"] for s in m["series"]
    }
    assert got == counters
    got_h = {
        tuple(s["labels"][k] for k in keys): (
            {int(i): n for i, n in s["buckets"].items()}, s["zero_count"], s["count"], s["sum"]
        )
        for h in d["histograms"] for s in h["series"]
    }
    assert got_h == {k: (h.buckets, h.zero, h.count, h.sum) for k, h in hists.items()}


def test_profile_and_events_round_trip() -> None:
    b = BatchBuilder("n", "boot", 1, 0, 1, {})
    rows = {
        ProfileRow(10, "app", "/", ("leaf", "main"), ("f", "g")): 5,
        ProfileRow(11, "app", "/", None, ("f", "g")): 2,
    }
    b.add_profile("cpu", 52631578, rows)
    b.add_events([EventRow(5, "exec", 10, 1, "app", "/", "/bin/app", 0)], lost=3)
    d = batch_to_dict(pb.Batch.FromString(b.build().SerializeToString()))
    samples = d["profiles"][0]["samples"]
    assert samples[0] == {"pid": 10, "comm": "app", "cgroup": "/", "kernel_stack": ["leaf", "main"],
                          "user_stack": ["f", "g"], "count": 5}
    assert samples[1]["kernel_stack"] is None and samples[1]["user_stack"] == ["f", "g"]
    assert d["events"] == [{"time_ns": 5, "kind": "exec", "pid": 10, "ppid": 1, "comm": "app",
                            "cgroup": "/", "detail": "/bin/app", "code": 0}]
    assert d["events_lost"] == 3


def test_strings_are_interned_once() -> None:
    b = BatchBuilder("n", "boot", 1, 0, 1, {})
    b.add_counters("m", "", "", ["comm"], {("x",): 1, ("y",): 2})
    b.add_counters("m2", "", "", ["comm"], {("x",): 3})
    batch = b.build()
    assert len(batch.strings) == len(set(batch.strings))
    assert batch.strings[0] == ""
