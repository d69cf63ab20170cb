"""The merge state machine: exact sums per node and rolled up, windows, late partials."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from stratoscope.edge.batch import BatchBuilder, batch_to_dict
from stratoscope.edge.decode import Histogram
from stratoscope.regional.merge import Aggregator, MergeSettings, Rollup
from stratoscope.v1 import batch_pb2 as pb
from tests.frames import block_batch

NS = 1_000_000_000
T0 = 1_800_000_000 * NS  # a minute boundary
KEYS = ["syscall", "comm"]


def edge_batch(node: str, seq: int, start_s: float, counters: dict, hists: dict | None = None,
               boot: str = "b") -> Any:
    b = BatchBuilder(node, boot, seq, T0 + int(start_s * NS), T0 + int((start_s + 10) * NS),
                     {"region": "eu"})
    b.add_counters("syscalls_total", "calls", "h", KEYS, counters)
    if hists:
        b.add_histograms("syscall_latency", "ns", "h", KEYS, hists)
    return b.build()


def totals(blocks: list, metric: str) -> dict[tuple[str, tuple], int]:
    out: Counter[tuple[str, tuple]] = Counter()
    for blk in blocks:
        d = batch_to_dict(block_batch(blk))
        for m in d["metrics"]:
            if m["name"] == metric:
                for s in m["series"]:
                    out[(d["node_id"], tuple(sorted(s["labels"].items())))] += s["value"]
    return dict(out)


def hist_totals(blocks: list, metric: str) -> dict:
    out: dict = defaultdict(lambda: [0, 0, 0, Counter()])
    for blk in blocks:
        d = batch_to_dict(block_batch(blk))
        for h in d["histograms"]:
            if h["name"] == metric:
                for s in h["series"]:
                    acc = out[(d["node_id"], tuple(sorted(s["labels"].items())))]
                    acc[0] += s["count"]
                    acc[1] += s["sum"]
                    acc[2] += s["zero_count"]
                    acc[3].update({int(i): n for i, n in s["buckets"].items()})
    return dict(out)


def test_three_edges_per_node_and_rolled_up() -> None:
    agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0,
                                   rollups=(Rollup("syscalls_total", ("syscall",)),
                                            Rollup("syscall_latency", ("syscall",)))))
    for i, node in enumerate(["n1", "n2", "n3"]):
        for k in range(6):  # six 10 s batches per node in one minute
            agg.record(edge_batch(
                node, k + 1, k * 10,
                {("read", "app"): 10 * (i + 1), ("write", "db"): 1},
                {("read", "app"): Histogram({3: 2, 5: 1}, zero=1, count=4, sum=100)},
            ))
    assert agg.flush(T0 + 60 * NS - 1) == []  # window still open
    blocks = agg.flush(T0 + 60 * NS)
    assert len(blocks) == 4  # three nodes + one roll-up
    t = totals(blocks, "syscalls_total")
    assert t[("n1", (("comm", "app"), ("syscall", "read")))] == 60
    assert t[("n2", (("comm", "app"), ("syscall", "read")))] == 120
    assert t[("n3", (("comm", "app"), ("syscall", "read")))] == 180
    assert t[("n3", (("comm", "db"), ("syscall", "write")))] == 6
    assert t[("", (("syscall", "read"),))] == 360
    assert t[("", (("syscall", "write"),))] == 18
    h = hist_totals(blocks, "syscall_latency")
    assert h[("n1", (("comm", "app"), ("syscall", "read")))] == [24, 600, 6, Counter({3: 12, 5: 6})]
    assert h[("", (("syscall", "read"),))] == [72, 1800, 18, Counter({3: 36, 5: 18})]
    for blk in blocks:
        assert block_batch(blk).start_ns == T0 and block_batch(blk).end_ns == T0 + 60 * NS
    node_block = next(b for b in blocks if block_batch(b).node_id == "n1")
    assert batch_to_dict(block_batch(node_block))["node_labels"] == {"region": "eu"}


def test_batches_split_into_windows_by_read_time() -> None:
    agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0, rollups=()))
    agg.record(edge_batch("n", 1, 50, {("read", "a"): 1}))  # ends at 60 s: first window
    agg.record(edge_batch("n", 2, 60, {("read", "a"): 2}))  # second window
    first = agg.flush(T0 + 60 * NS)
    assert [block_batch(b).start_ns for b in first] == [T0]
    assert totals(first, "syscalls_total") == {("n", (("comm", "a"), ("syscall", "read"))): 1}
    second = agg.flush(T0 + 120 * NS)
    assert totals(second, "syscalls_total") == {("n", (("comm", "a"), ("syscall", "read"))): 2}


def test_late_batch_becomes_an_additive_partial_with_its_own_id() -> None:
    agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=5, rollups=()))
    agg.record(edge_batch("n", 1, 0, {("read", "a"): 5}))
    on_time = agg.flush(T0 + 65 * NS)
    assert agg.record(edge_batch("n", 2, 10, {("read", "a"): 7})) is True
    late = agg.flush(T0 + 66 * NS)
    assert [block_batch(b).start_ns for b in late] == [T0]
    assert late[0].block_id != on_time[0].block_id
    both = totals(on_time, "syscalls_total")[("n", (("comm", "a"), ("syscall", "read")))] + \
        totals(late, "syscalls_total")[("n", (("comm", "a"), ("syscall", "read")))]
    assert both == 12
    assert agg.late_batches == 1


def test_same_input_gives_same_block_ids() -> None:
    def run() -> list[str]:
        agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0))
        agg.record(edge_batch("n", 1, 0, {("read", "a"): 5}))
        agg.record(edge_batch("m", 1, 0, {("read", "a"): 5}))
        return [b.block_id for b in agg.flush(0, force=True)]

    assert run() == run()


series_key = st.tuples(st.sampled_from(["read", "write", "openat"]), st.sampled_from(["a", "b", "c"]))


@settings(max_examples=50, deadline=None)
@given(st.lists(
    st.tuples(st.sampled_from(["n1", "n2"]), st.integers(0, 11),
              st.dictionaries(series_key, st.integers(1, 2**40), max_size=6)),
    max_size=15,
))
def test_merge_equals_naive_sum(batches: list[tuple[str, int, dict]]) -> None:
    agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0,
                                   rollups=(Rollup("syscalls_total", ("syscall",)),)))
    expected: Counter[tuple] = Counter()
    for seq, (node, slot, counters) in enumerate(batches, 1):
        agg.record(edge_batch(node, seq, slot * 10, counters))
        window = T0 + (slot // 6) * 60 * NS
        for (sc, comm), v in counters.items():
            expected[(window, node, (("comm", comm), ("syscall", sc)))] += v
            expected[(window, "", (("syscall", sc),))] += v
    got: Counter[tuple] = Counter()
    for blk in agg.flush(0, force=True):
        for (node, labels), v in totals([blk], "syscalls_total").items():
            got[(block_batch(blk).start_ns, node, labels)] += v
    assert got == expected


def test_bucket_sums_agree_across_dense_chunked_and_sorted_paths(monkeypatch: Any) -> None:
    import numpy as np

    from stratoscope.regional import merge

    rng = np.random.default_rng(7)
    series = rng.integers(0, 500, 20_000)
    idx = rng.integers(-3, 40, 20_000)
    cnt = rng.integers(1, 1000, 20_000).astype(np.uint64)
    expected: Counter[tuple[int, int]] = Counter()
    for s, i, c in zip(series.tolist(), idx.tolist(), cnt.tolist(), strict=True):
        expected[(s, i)] += c
    results = [merge._reduce_buckets(series, idx, cnt)]  # one dense pass
    monkeypatch.setattr(merge, "_DENSE_CELLS", 1000)  # many series ranges
    results.append(merge._reduce_buckets(series, idx, cnt))
    monkeypatch.setattr(merge, "_EXACT_F64", 0)  # the sort path
    results.append(merge._reduce_buckets(series, idx, cnt))
    for s_, i_, c_, clamped in results:
        assert clamped == 0
        got = list(zip(s_.tolist(), i_.tolist(), c_.tolist(), strict=True))
        assert got == sorted((s, i, c) for (s, i), c in expected.items())


def test_grouping_is_exact_for_wide_keys_and_survives_hash_collisions(monkeypatch: Any) -> None:
    import numpy as np

    from stratoscope.regional import columns

    rng = np.random.default_rng(3)
    # 5 columns of up to 2^20: 100 bits, two packed words, so the hash path is taken
    base = rng.integers(0, 1 << 20, (300, 5)).astype(np.uint32)
    keys = base[rng.integers(0, 300, 5000)]
    expected = Counter(map(tuple, keys.tolist()))

    def check() -> None:
        g = columns.group(keys)
        got = {tuple(k): int(n) for k, n in zip(g.keys.tolist(), np.diff(np.append(g.starts, len(keys))).tolist(), strict=True)}
        assert got == dict(expected)
        assert all(tuple(keys[i]) == tuple(g.keys[g.inverse[i]]) for i in range(0, 5000, 97))

    check()
    monkeypatch.setattr(columns, "mix64", lambda x: x * 0)  # every key collides
    check()


def test_profile_rows_sum_per_stack_content_across_batches_and_nodes() -> None:
    """Stacks are interned by content: the same frames under different batch-local string
    ids are one stack; order, length and prefixes tell stacks apart."""
    from stratoscope.edge.decode import ProfileRow

    def batch(node: str, seq: int, rows: dict[ProfileRow, int], pad: int) -> Any:
        b = BatchBuilder(node, "b", seq, T0 + seq * 10 * NS, T0 + (seq + 1) * 10 * NS, {})
        for i in range(pad):  # shifts every string id of this batch
            b.s(f"pad{i}")
        b.add_profile("cpu", 10_000_000, rows)
        return b.build()

    ab, ba, a, abc = ("f_a", "f_b"), ("f_b", "f_a"), ("f_a",), ("f_a", "f_b", "f_c")
    agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0))
    agg.record(batch("n1", 1, {ProfileRow(7, "app", "/", ab, None): 3,
                               ProfileRow(7, "app", "/", ba, None): 5,
                               ProfileRow(7, "app", "/", a, abc): 1}, pad=0))
    agg.record(batch("n1", 2, {ProfileRow(7, "app", "/", ab, None): 4,
                               ProfileRow(7, "app", "/", a, abc): 2}, pad=3))
    agg.record(batch("n2", 1, {ProfileRow(9, "db", "/", abc, ab): 6}, pad=5))
    blocks = agg.flush(0, force=True)
    got: Counter[tuple] = Counter()
    for blk in blocks:
        d = batch_to_dict(block_batch(blk))
        for p in d["profiles"]:
            for s in p["samples"]:
                k, u = s["kernel_stack"], s["user_stack"]
                got[(d["node_id"], s["pid"], tuple(k) if k else None, tuple(u) if u else None)] += s["count"]
    assert got == {("n1", 7, ab, None): 7, ("n1", 7, ba, None): 5, ("n1", 7, a, abc): 3,
                   ("n2", 9, abc, ab): 6}
    frame = blocks[0].frame
    assert frame is not None and len(frame.stacks) == 4  # ab, ba, a, abc: once each


def test_profile_rows_without_any_stack_are_merged() -> None:
    """A window whose profile rows have no stacks at all (every id -1) still reduces."""
    from stratoscope.edge.decode import ProfileRow

    b = BatchBuilder("n1", "b", 1, T0, T0 + 10 * NS, {})
    b.add_profile("cpu", 10_000_000, {ProfileRow(7, "app", "/", None, None): 4})
    agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0))
    agg.record(b.build())
    blocks = agg.flush(0, force=True)
    samples = [s for blk in blocks for p in batch_to_dict(block_batch(blk))["profiles"] for s in p["samples"]]
    assert [(s["pid"], s["kernel_stack"], s["user_stack"], s["count"]) for s in samples] == [(7, None, None, 4)]


def test_split_windows_keep_each_batchs_strings_and_only_their_stacks() -> None:
    """Parts of a split window translate every chunk through its own batch's strings
    (the batches below number their strings differently) and carry only their stacks."""
    from stratoscope.edge.decode import ProfileRow

    def batch(node: str, seq: int, pad: int) -> Any:
        b = BatchBuilder(node, "b", seq, T0 + seq * 10 * NS, T0 + (seq + 1) * 10 * NS, {"region": "eu"})
        for i in range(pad):
            b.s(f"pad{node}{i}")
        b.add_counters("syscalls_total", "calls", "h", KEYS, {("read", node): seq, ("write", "x"): 1})
        b.add_histograms("syscall_latency", "ns", "h", KEYS, {
            ("read", node): Histogram({seq: 2}, zero=0, count=2, sum=seq),
            ("idle", node): Histogram({}, zero=1, count=1, sum=0),  # no buckets
        })
        b.add_profile("cpu", 10_000_000, {ProfileRow(1, node, "/", (f"k_{node}", "k_common"), None): seq})
        return b.build()

    def run(frame_nodes: int) -> list[Any]:
        agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0, rollups=(), frame_nodes=frame_nodes))
        for i, node in enumerate(["n1", "n2", "n3", "n4"]):
            for seq in (1, 2, 3):
                agg.record(batch(node, seq, pad=3 * i + seq))
        return agg.flush(0, force=True)

    whole, split = run(250), run(1)
    assert totals(split, "syscalls_total") == totals(whole, "syscalls_total")
    assert totals(split, "syscalls_total")[("n3", (("comm", "n3"), ("syscall", "read")))] == 6
    assert hist_totals(split, "syscall_latency") == hist_totals(whole, "syscall_latency")
    assert hist_totals(split, "syscall_latency")[("n2", (("comm", "n2"), ("syscall", "read")))] == [
        6, 6, 0, Counter({1: 2, 2: 2, 3: 2})]
    frames = {id(b.frame): b.frame for b in split if b.frame is not None}
    assert len(frames) == 4
    for f in frames.values():  # one node each: its own stack, not the window's four
        assert len(f.stacks) == 1
        assert [f.strings[i] for i in f.stacks.values("frames", "values")][0].startswith("k_n")


def test_held_points_count_series_and_event_rows_until_taken() -> None:
    """What max_held_points bounds: every series point and event row a window holds."""
    from stratoscope.edge.batch import BatchBuilder, EventRow
    from stratoscope.edge.decode import Histogram
    from stratoscope.regional.merge import Aggregator, MergeSettings

    agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0))
    end = 1_800_000_030 * 1_000_000_000
    b = BatchBuilder("n1", "boot", 1, end - 10 * 1_000_000_000, end, {})
    b.add_counters("c", "", "", ["k"], {("a",): 1, ("b",): 2})
    b.add_histograms("h", "ns", "", ["k"], {("a",): Histogram({3: 1}, count=1, sum=3)})
    b.add_events([EventRow(end - i, "exec", i, 1, "sh", "/", "", 0) for i in range(4)], lost=0)
    agg.record(b.build())
    assert agg.held_points() == 2 + 1 + 4
    assert len(agg.take_due(end + 120 * 1_000_000_000)) == 1
    assert agg.held_points() == 0


def test_released_windows_are_emptied_and_their_frames_stay_whole() -> None:
    """release_windows frees what the merge held, never what the frames it built hold."""
    from stratoscope.regional.merge import release_windows

    agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0,
                                   rollups=(Rollup("syscalls_total", ("syscall",)),)))
    for node in ("a", "b"):
        for slot in range(6):
            h = Histogram()
            h.add_slot(3, 2, 10)
            agg.record(edge_batch(node, slot + 1, slot * 10,
                                  {("read", f"p{slot}"): 5, ("write", "x"): 1},
                                  {("read", "x"): h}))
    due = agg.take_due(T0 + 61 * NS)
    blocks = agg.emit(due)
    before = totals(blocks, "syscalls_total"), hist_totals(blocks, "syscall_latency")
    windows = list(due)
    release_windows(due)
    assert due == []
    for w in windows:
        assert not w.shards and not w.events and not w.stacks
        assert w.strings.items  # frames built here share it: left whole
    assert (totals(blocks, "syscalls_total"), hist_totals(blocks, "syscall_latency")) == before
    assert before[0][("b", (("comm", "x"), ("syscall", "write")))] == 6
    assert before[0][("", (("syscall", "read"),))] == 60


def _series_batch(node: str, seq: int, n: int, offset: int = 0) -> Any:
    b = BatchBuilder(node, "boot", seq, T0 + (seq - 1) % 6 * 10 * NS, T0 + ((seq - 1) % 6 + 1) * 10 * NS, {})
    b.add_counters("syscalls_total", "calls", "h", KEYS,
                   {(f"s{offset + i}", "app"): seq for i in range(n)})
    b.add_histograms("syscall_latency", "ns", "h", KEYS,
                     {(f"s{offset + i}", "app"): Histogram({i % 7: 1, 9: 2}, count=3, sum=5)
                      for i in range(n // 4)})
    return b.build()


def test_a_windows_memory_follows_its_distinct_series_not_its_points() -> None:
    """The same series sent 6 times hold the memory of one sending (plus each batch's
    identity); 6 sendings of different series hold 6 times as much."""
    from stratoscope.regional.merge import SOURCE_BYTES

    n = 40_000  # counter rows per batch, more than fold_min_rows: every batch folds
    same = Aggregator(MergeSettings(resolution_s=60, lateness_s=0, rollups=()))
    same.record(_series_batch("n1", 1, n))
    one_bytes, one_rows = same.held()
    assert one_rows == n + n // 4
    for seq in range(2, 7):
        same.record(_series_batch("n1", seq, n))
    assert same.held() == (one_bytes + 5 * SOURCE_BYTES, one_rows)
    assert same.held_points() == 6 * (n + n // 4)  # points received: what max_held_points counts

    distinct = Aggregator(MergeSettings(resolution_s=60, lateness_s=0, rollups=()))
    for seq in range(1, 7):
        distinct.record(_series_batch("n1", seq, n, offset=seq * n))
    nbytes, rows = distinct.held()
    assert rows == 6 * one_rows
    assert 5.5 * one_bytes < nbytes < 6.5 * one_bytes  # the strings of new label values too

    blocks = same.flush(0, force=True)
    t = totals(blocks, "syscalls_total")
    assert len(t) == n and t[("n1", (("comm", "app"), ("syscall", "s7")))] == 1 + 2 + 3 + 4 + 5 + 6
    h = hist_totals(blocks, "syscall_latency")
    assert h[("n1", (("comm", "app"), ("syscall", "s8")))] == [18, 30, 0, Counter({1: 6, 9: 12})]
    assert same.held() == (0, 0)


@given(st.lists(st.tuples(st.sampled_from(["n1", "n2", "n3", "n4", "n5"]),
                          st.lists(st.tuples(st.sampled_from(["read", "write", "open"]),
                                             st.sampled_from(["a", "b"]), st.integers(1, 1000)),
                                   max_size=6)),
                min_size=1, max_size=30),
       st.integers(0, 8), st.integers(1, 3))
@settings(max_examples=60, deadline=None)
def test_folding_at_any_point_gives_the_same_sums(sends: list, fold_min_rows: int, fold_nodes: int) -> None:
    """Whenever shards fold (every batch, now and then, only at emit) and however nodes are
    grouped into shards and frames, the sums per node and rolled up are the same."""
    expected: Counter[tuple] = Counter()
    hist_expected: Counter[tuple] = Counter()
    gauge_expected: dict[tuple, float] = {}
    agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0, fold_min_rows=fold_min_rows,
                                   fold_nodes=fold_nodes, frame_nodes=2,
                                   rollups=(Rollup("syscalls_total", ("syscall",)),
                                            Rollup("syscall_latency", ("syscall",)))))
    for seq, (node, series) in enumerate(sends, start=1):
        counters = {(sc, comm): v for sc, comm, v in series}
        hists = {}
        for (sc, comm), v in counters.items():
            expected[(node, sc, comm)] += v
            expected[("", sc, "")] += v
            hists[(sc, comm)] = Histogram({v % 5: v}, count=v, sum=2 * v)
            hist_expected[(node, sc, comm, v % 5)] += v
            hist_expected[("", sc, "", v % 5)] += v
        b = BatchBuilder(node, "b", seq, T0 + (seq % 6) * 10 * NS, T0 + ((seq % 6) * 10 + 10) * NS, {})
        b.add_counters("syscalls_total", "calls", "h", KEYS, counters)
        b.add_histograms("syscall_latency", "ns", "h", KEYS, hists)
        gauge = {(comm,): float(v) for _, comm, v in series}
        b.add_counters("open_fds", "", "h", ["comm"], gauge, kind=pb.GAUGE)
        for (comm,), g in gauge.items():
            gauge_expected[(node, comm)] = max(gauge_expected.get((node, comm), 0.0), g)
        agg.record(b.build())
    blocks = agg.flush(0, force=True)
    gauges = {(node, dict(labels)["comm"]): v for (node, labels), v in totals(blocks, "open_fds").items()}
    assert gauges == gauge_expected
    got: Counter[tuple] = Counter()
    for (node, labels), v in totals(blocks, "syscalls_total").items():
        d = dict(labels)
        got[(node, d["syscall"], d.get("comm", ""))] += v
    assert got == +expected
    hist_got: Counter[tuple] = Counter()
    for (node, labels), (_, _, _, buckets) in hist_totals(blocks, "syscall_latency").items():
        d = dict(labels)
        for i, c in buckets.items():
            hist_got[(node, d["syscall"], d.get("comm", ""), i)] += c
    assert hist_got == +hist_expected
