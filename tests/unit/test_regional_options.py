"""Regional options: `--frame-nodes`, `--max-held-points`, and what they bound."""

from __future__ import annotations

import pytest

from stratoscope.cli import _regional_options, build_parser
from stratoscope.edge.errors import ConfigError
from stratoscope.regional.app import QUEUE_RETRY, RegionalOptions


def test_frame_nodes_default_and_cli() -> None:
    assert RegionalOptions().frame_nodes == 250
    args = build_parser().parse_args(["regional", "--frame-nodes", "500", "--clickhouse", "none"])
    assert _regional_options(args).frame_nodes == 500
    args = build_parser().parse_args(["regional", "--clickhouse", "none"])
    assert _regional_options(args).frame_nodes == 250


@pytest.mark.parametrize("bad", [0, -1, QUEUE_RETRY // 3 + 1])
def test_frame_nodes_out_of_range_is_a_config_error(bad: int) -> None:
    args = build_parser().parse_args(["regional", "--frame-nodes", str(bad), "--clickhouse", "none"])
    with pytest.raises(ConfigError, match="frame_nodes must be 1..1000"):
        _regional_options(args)


def test_demote_merge_threads_sets_nice_on_named_threads_only() -> None:
    """A thread named like ClickHouse's merge pool gets MERGE_NICE; others keep theirs."""
    import os
    import threading

    from stratoscope.regional.sinks.process import MERGE_NICE, demote_merge_threads

    named, stop = threading.Barrier(3, timeout=5), threading.Event()
    tids: dict[str, int] = {}

    def worker(name: str) -> None:
        tids[name] = threading.get_native_id()
        with open(f"/proc/self/task/{tids[name]}/comm", "w") as f:
            f.write(name)
        named.wait()  # both threads carry their names before the test looks
        stop.wait(10)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("MergeMutate", "QueryPullPipeEx")]
    for t in threads:
        t.start()
    try:
        named.wait()
        base = os.getpriority(os.PRIO_PROCESS, tids["QueryPullPipeEx"])
        seen: set[int] = set()
        # The process may hold chdb's own merge threads too (an earlier test opened a
        # store), so count at least ours and look at our two threads by id.
        assert demote_merge_threads(seen) >= 1
        assert tids["MergeMutate"] in seen and tids["QueryPullPipeEx"] not in seen
        assert os.getpriority(os.PRIO_PROCESS, tids["MergeMutate"]) == MERGE_NICE
        assert os.getpriority(os.PRIO_PROCESS, tids["QueryPullPipeEx"]) == base
        os.setpriority(os.PRIO_PROCESS, tids["MergeMutate"], base)
        demote_merge_threads(seen)  # once per thread: a thread already seen is left alone
        assert os.getpriority(os.PRIO_PROCESS, tids["MergeMutate"]) == base
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_max_held_points_default_cli_and_bounds() -> None:
    from stratoscope.regional.service import DEFAULT_MAX_HELD_POINTS

    assert RegionalOptions().max_held_points == DEFAULT_MAX_HELD_POINTS == 64_000_000
    args = build_parser().parse_args(["regional", "--max-held-points", "1000", "--clickhouse", "none"])
    assert _regional_options(args).max_held_points == 1000
    args = build_parser().parse_args(["regional", "--max-held-points", "0", "--clickhouse", "none"])
    with pytest.raises(ConfigError, match="max_held_points must be >= 1"):
        _regional_options(args)


def test_gate_answers_retry_while_windows_are_full_or_draining_and_remembers_nothing() -> None:
    """A RETRY is not a delivery: the same batch is accepted once the bound clears, then
    is a duplicate."""
    import time

    from stratoscope.edge.batch import BatchBuilder
    from stratoscope.regional.service import Gate
    from stratoscope.v1 import ingest_pb2

    now = time.time_ns()
    b = BatchBuilder("gate-node", "boot", 7, now - 10_000_000_000, now, {})
    b.add_counters("syscalls_total", "calls", "h", ["syscall"], {("read",): 5})
    batch = b.build()
    gate = Gate()
    gate.held_full = True
    ack, cols, _ = gate.admit(batch, None, None)
    assert (ack.status, ack.seq, cols) == (ingest_pb2.Ack.RETRY, 7, None)
    assert "max held points" in ack.reason
    gate.held_full, gate.closed = False, True  # the owner drains
    ack, cols, _ = gate.admit(batch, None, None)
    assert (ack.status, ack.reason, cols) == (ingest_pb2.Ack.RETRY, "regional is draining its windows", None)
    gate.closed = False
    ack, cols, _ = gate.admit(batch, None, None)
    assert ack.status == ingest_pb2.Ack.ACCEPTED and cols is not None and cols.points == 1
    assert gate.admit(batch, None, None)[0].status == ingest_pb2.Ack.DUPLICATE
