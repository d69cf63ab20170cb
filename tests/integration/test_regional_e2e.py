"""Edge -> regional -> ClickHouse and Kafka, on the real kernel, broker and engine."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from aiokafka import AIOKafkaConsumer, TopicPartition

from stratoscope.columns import to_packed
from stratoscope.edge.batch import BatchBuilder, batch_to_dict
from stratoscope.edge.decode import Histogram
from stratoscope.edge.forward import GrpcForwarder
from stratoscope.regional.app import RunningRegional
from stratoscope.regional.config import RegionalConfig
from stratoscope.regional.merge import Rollup
from stratoscope.regional.sinks.config import ClickHouseSettings, KafkaSettings
from stratoscope.regional.sinks.kafka import decode_message
from stratoscope.regional.sinks.process import MERGE_NICE, SINK_NICE
from stratoscope.regional.validate import REASONS
from stratoscope.v1 import batch_pb2 as pb
from tests.conftest import kafka_bootstrap, run_edge, unique_comm

pytestmark = [pytest.mark.kernel, pytest.mark.kafka]
NS = 1_000_000_000
ROOT = Path(__file__).resolve().parents[2]




@pytest.fixture
async def regional(tmp_path: Path) -> AsyncIterator[RunningRegional]:
    # The sinks run in child processes (the production setup); the embedded store
    # belongs to the ClickHouse one, so tests read it through the regional (sql()).
    config = RegionalConfig(
        insecure=True, listen="127.0.0.1:0", metrics_port=0, query_listen=None,
        clickhouse=ClickHouseSettings(dsn=f"chdb://{tmp_path}/ch", database=f"e2e_{uuid.uuid4().hex[:10]}"),
        kafka=KafkaSettings(bootstrap=kafka_bootstrap(), topic_prefix=f"e2e-{uuid.uuid4().hex[:10]}"),
        resolution=60, lateness=0, wal_dir=tmp_path / "wal",
        rollups=(Rollup("syscalls_total", ("syscall",)), Rollup("syscall_latency", ("syscall",))),
    )
    running = RunningRegional(config)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def sql(regional: RunningRegional, query: str, **params: Any) -> list[tuple[Any, ...]]:
    """Rows of a SELECT, run by the regional's ClickHouse sink process."""
    return await regional.sink("clickhouse").query(query, params)  # type: ignore[attr-defined, no-any-return]


async def one(regional: RunningRegional, query: str, **params: Any) -> Any:
    return (await sql(regional, query, **params))[0][0]


async def consume_all(bootstrap: str, topic: str) -> list[tuple[str, Any]]:
    """Every message of a topic, decoded, de-duplicated by block id."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        seen: dict[str, Any] = {}
        while await consumer.position(tp) < end:
            for records in (await consumer.getmany(timeout_ms=2000)).values():
                for r in records:
                    block_id, batch = decode_message(r.value, r.headers)
                    seen[block_id] = batch
        return list(seen.items())
    finally:
        await consumer.stop()


async def test_openat_exact_through_regional_into_clickhouse_and_kafka(
    regional: RunningRegional, workload_bin: dict[str, Path]
) -> None:
    comm = unique_comm("e2eop")
    target = [f"127.0.0.1:{regional.port}"]

    def edge_side() -> Any:
        with run_edge(["syscalls"], interval=0.5, forward_to=target, node_id="e2e-node",
                      params={"syscalls": {"LATENCY": 1}}) as run:
            # 15 pauses of 100 ms: the workload spans at least two 0.5 s intervals, so the
            # regional merges several batches (30 ms pauses once fit in one on CI)
            subprocess.run([str(workload_bin["openat"]), comm, "10000", "5000", "100000"], check=True)
        return run

    run = await asyncio.to_thread(edge_side)
    assert run.forward_stats.acked == len(run.batches) >= 2
    await regional.drain()
    db = regional.config.clickhouse.database  # type: ignore[union-attr]
    calls = await one(regional, f"""SELECT sum(value) FROM {db}.metrics WHERE metric = 'syscalls_total'
        AND node = 'e2e-node' AND labels['comm'] = {{c:String}} AND labels['syscall'] = 'openat'""",
        c=comm)
    errors = await one(regional, f"""SELECT sum(value) FROM {db}.metrics WHERE metric = 'syscall_errors_total'
        AND node = 'e2e-node' AND labels['comm'] = {{c:String}} AND labels['syscall'] = 'openat'
        AND labels['errno'] = 'ENOENT'""", c=comm)
    assert (calls, errors) == (15000, 5000)
    hist = await one(regional, f"""SELECT sum(count) FROM {db}.histograms WHERE metric = 'syscall_latency'
        AND node = 'e2e-node' AND labels['comm'] = {{c:String}} AND labels['syscall'] = 'openat'""",
        c=comm)
    assert hist == 15000

    prefix = regional.config.kafka.topic_prefix  # type: ignore[union-attr]
    totals: Counter[str] = Counter()
    for _, batch in await consume_all(kafka_bootstrap(), f"{prefix}.metrics"):
        d = batch_to_dict(batch)
        if d["node_id"] != "e2e-node":
            continue
        for m in d["metrics"]:
            for s in m["series"]:
                if s["labels"].get("comm") == comm and s["labels"].get("syscall") == "openat":
                    totals[m["name"]] += s["value"]
    assert totals["syscalls_total"] == 15000
    assert totals["syscall_errors_total"] == 5000


def synthetic(node: str, seq: int, end_ns: int, read: int, hist: Histogram, boot: str = "boot-1") -> Any:
    b = BatchBuilder(node, boot, seq, end_ns - 10 * NS, end_ns, {"region": "test"})
    b.add_counters("syscalls_total", "calls", "h", ["syscall", "comm"],
                   {("read", "app"): read, ("write", "app"): 1})
    b.add_histograms("syscall_latency", "ns", "h", ["syscall", "comm"], {("read", "app"): hist})
    return b.build()


def send(regional: RunningRegional, batches: list[Any],
         compression: dict[str, str] | None = None) -> Any:
    """Each node sends its own batches over its own stream, as edges do (compressed as
    ``compression[node]`` says; zstd, the edge's default, otherwise; a ``+packed``
    suffix sends packed numeric columns instead of raw ones)."""
    total = Counter()
    for node in dict.fromkeys(b.node_id for b in batches):
        form, _, columns = (compression or {}).get(node, "zstd").partition("+")
        fwd = GrpcForwarder([f"127.0.0.1:{regional.port}"], compression=form,
                            wire_columns=columns or "raw")
        for b in batches:
            if b.node_id == node:
                fwd.write(b)
        assert fwd.close(30), "batches not acknowledged"
        total.update(vars(fwd.stats))
    return type("Stats", (), dict(total))


async def test_three_edges_merge_roll_up_dedupe_and_late_data(
    regional: RunningRegional
) -> None:
    minute = (time.time_ns() // (60 * NS) - 3) * 60 * NS  # a closed minute, three minutes ago
    batches = []
    for i, node in enumerate(["n1", "n2", "n3"], 1):
        for k in range(6):
            h = Histogram({3: i, 10: 1}, zero=1, count=i + 2, sum=1000 * i)
            batches.append(synthetic(node, k + 1, minute + (k + 1) * 10 * NS, 100 * i, h))
    # every wire form the regional takes: sealed zstd bodies, gRPC gzip, plain; raw
    # little-endian columns (the edge's default) and packed ones (older edges)
    wire_forms = {"n1": "zstd", "n2": "gzip+packed", "n3": "none"}
    stats = await asyncio.to_thread(send, regional, batches, wire_forms)
    assert (stats.acked, stats.duplicates) == (18, 0)
    await regional.drain()
    db = regional.config.clickhouse.database  # type: ignore[union-attr]

    async def per_node() -> dict[str, int]:
        rows = await sql(regional, f"""SELECT node, sum(value) FROM {db}.metrics
            WHERE metric = 'syscalls_total' AND labels['syscall'] = 'read' AND resolution = 60
            GROUP BY node ORDER BY node""")
        return dict(rows)

    assert (await per_node()) == {"": 3600, "n1": 600, "n2": 1200, "n3": 1800}
    buckets = await sql(regional, f"""SELECT node, sumMap(bucket_index, bucket_count), sum(zero_count),
        sum(count), sum(sum) FROM {db}.histograms WHERE metric = 'syscall_latency'
        GROUP BY node ORDER BY node""")
    assert [(n, dict(zip(*m, strict=True)), z, c, s) for n, m, z, c, s in buckets] == [
        ("", {3: 36, 10: 18}, 18, 72, 36000),
        ("n1", {3: 6, 10: 6}, 6, 18, 6000),
        ("n2", {3: 12, 10: 6}, 6, 24, 12000),
        ("n3", {3: 18, 10: 6}, 6, 30, 18000),
    ]
    ts = await one(regional, f"SELECT toUnixTimestamp(min(ts)) FROM {db}.metrics")
    assert ts * NS == minute

    # Resending the very same batches: acknowledged as duplicates, nothing changes
    # (also when the resend comes in another wire form).
    stats = await asyncio.to_thread(send, regional, batches[:6], {"n1": "gzip"})
    assert (stats.acked, stats.duplicates) == (0, 6)
    await regional.drain()
    assert (await per_node())["n1"] == 600

    # A late batch for the closed window: stored as an extra partial, totals add up.
    h = Histogram({3: 1}, zero=0, count=1, sum=5)
    late = synthetic("n1", 7, minute + 60 * NS, 11, h)
    stats = await asyncio.to_thread(send, regional, [late])
    assert stats.acked == 1
    await regional.drain()
    assert (await per_node()) == {"": 3611, "n1": 611, "n2": 1200, "n3": 1800}
    assert regional.regional.aggregator.late_batches == 1

    # Re-running the same ClickHouse insert (a retry after a timeout) changes nothing.
    ch = regional.sink("clickhouse")
    from stratoscope.regional.merge import Aggregator, MergeSettings

    agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0, rollups=()), "regional-x")
    agg.record(synthetic("n9", 1, minute + 10 * NS, 5, h))
    blocks = agg.flush(0, force=True)
    await ch.deliver(blocks)
    await ch.deliver(blocks)
    assert (await per_node())["n9"] == 5


def _samples(regional: RunningRegional, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for m in regional.regional.registry.collect()
            for s in m.samples if s.name == name]


async def test_invalid_batch_is_rejected_and_counted_without_harm(regional: RunningRegional) -> None:
    now = time.time_ns()
    bad = to_packed(synthetic("bad-node", 1, now, 1, Histogram({3: 1}, count=1, sum=3)))
    bad.metrics[0].label_values.append(9999)  # one label value too many for its series
    # the edge sends raw little-endian columns: one given in both encodings, one cut short
    both = synthetic("both-node", 1, now, 1, Histogram({3: 1}, count=1, sum=3))
    both.metrics[0].label_values.append(1)
    odd = synthetic("odd-node", 1, now, 1, Histogram({3: 1}, count=1, sum=3))
    odd.histograms[0].bucket_count_le = odd.histograms[0].bucket_count_le[:-1]
    good = synthetic("good-node", 1, now, 1, Histogram({3: 1}, count=1, sum=3))
    # a sealed batch whose body is not zstd, and one whose body would inflate past the
    # regional's 16 MiB batch limit (declared in the frame: refused before allocating)
    garbage = pb.Batch(node_id="zstd-node", boot_id="b", seq=1, start_ns=now - 10 * NS, end_ns=now,
                       codec=pb.CODEC_ZSTD, body=b"\x28\xb5\x2f\xfd garbage")
    bomb = pb.Batch(node_id="zstd-node", boot_id="b", seq=2, start_ns=now - 10 * NS, end_ns=now,
                    codec=pb.CODEC_ZSTD, body=zstandard.ZstdCompressor().compress(b"\0" * (64 << 20)))
    stats = await asyncio.to_thread(send, regional, [bad, both, odd, good, garbage, bomb],
                                    {"zstd-node": "none"})
    assert (stats.rejected, stats.acked) == (5, 1)
    await regional.drain()  # the ingest process has handed over every outcome
    samples = regional.regional.registry.get_sample_value(
        "stratoscope_regional_batches_total", {"status": "rejected"})
    assert samples == 5.0
    reasons = {labels["reason"]: v for labels, v in _samples(regional, "stratoscope_regional_rejected_batches_total")}
    # a fixed set of labels (validate.REASONS), all present from the start
    assert reasons == {**dict.fromkeys(REASONS, 0.0), "encoding": 4.0, "series": 1.0}, reasons


async def test_a_batch_larger_than_the_flow_control_window_is_accepted_whole(
    regional: RunningRegional
) -> None:
    """The ingest server runs HTTP/2 with a fixed 1 MiB stream window (server.FLOW_CONTROL,
    no BDP probing): a ~3 MiB uncompressed batch still arrives whole, every series counted."""
    from stratoscope.regional.server import FLOW_CONTROL

    window = dict(FLOW_CONTROL)["grpc.http2.lookahead_bytes"]
    now = time.time_ns()
    b = BatchBuilder("big-node", "boot-1", 1, now - 10 * NS, now, {"region": "test"})
    series = {(f"call{i % 1000}", f"comm{i // 1000}"): 1_000_000_007 * (i + 1) for i in range(150_000)}
    b.add_counters("syscalls_total", "calls", "h", ["syscall", "comm"], series)
    batch = b.build()
    assert batch.ByteSize() > 2 * window
    stats = await asyncio.to_thread(send, regional, [batch], {"big-node": "none"})
    assert (stats.acked, stats.rejected) == (1, 0)
    await regional.drain()
    points = regional.regional.registry.get_sample_value("stratoscope_regional_points_total")
    assert points == 150_000


def _thread_nices(pid: int) -> dict[str, set[int]]:
    """Niceness of a process's threads, by thread name (field 19 of /proc/.../stat)."""
    out: dict[str, set[int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                name, rest = f.read().split(" (", 1)[1].rsplit(")", 1)
        except FileNotFoundError:  # a pool thread that just ended
            continue
        out.setdefault("main" if int(tid) == pid else name, set()).add(int(rest.split()[16]))
    return out


async def test_sinks_yield_the_cpu_to_ingest(regional: RunningRegional) -> None:
    """Sink processes run SINK_NICE below the regional, and so do the threads chdb starts
    in them (inserts); chdb's background merge threads go further down, to MERGE_NICE; the
    ingest process, which answers acks, does not. (Threads started at import, before the child lowers itself, e.g. an idle BLAS
    pool, and chdb's tiny memory-accounting thread, which raises itself, are not checked.)"""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert base <= 9, f"run the tests below nice 10 (at {base} the sinks cannot go lower)"
    assert SINK_NICE >= 5
    niced = min(19, base + SINK_NICE)
    assert await one(regional, "SELECT count() FROM system.merge_tree_settings") > 0  # store open
    pid = regional.sink("clickhouse")._proc.pid  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10  # the sink demotes merge threads every 2 s
    while (ch := _thread_nices(pid)).get("MergeMutate") != {MERGE_NICE} and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert ch["main"] == {niced}
    assert {"MergeMutate", "ThreadPool", "BgSchPool"} <= set(ch), ch
    assert ch["MergeMutate"] == {MERGE_NICE}, ch  # merges below the inserts
    for name in ("ThreadPool", "BgSchPool", "BgStrmSchPool", "PoolDelayExec", "Fetch", "Move"):
        assert ch.get(name, {niced}) == {niced}, (name, ch)
    assert _thread_nices(regional.sink("kafka")._proc.pid)["main"] == {niced}  # type: ignore[attr-defined]
    assert _thread_nices(regional._ingest._proc.pid)["main"] == {base}  # type: ignore[union-attr]


def test_demo_command_reports_every_section(tmp_path: Path) -> None:
    env = {**os.environ, "STRATOSCOPE_DEMO_STORE": str(tmp_path / "store"),
           "STRATOSCOPE_DEMO_WAL": str(tmp_path / "wal")}
    r = subprocess.run(["bash", str(ROOT / "scripts/demo.sh"), "--duration", "20s"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for title in ("Top syscalls", "Run-queue latency", "TCP", "Block I/O", "Process execs",
                  "Hottest stacks"):
        assert title in r.stdout
    assert "sections without rows" not in r.stdout, r.stdout[-3000:]
    assert "tcp_opens_total" in r.stdout
    # p99 latencies in ns/µs/ms/s (stratoscope/units.py), not raw nanosecond integers
    top = r.stdout.split("Top syscalls", 1)[1].split("Run-queue latency", 1)[0]
    rows = [line for line in top.splitlines() if line.startswith("│")]
    assert rows and all(re.search(r"[0-9.,]+ (ns|µs|ms|s) +│$", line) for line in rows), top
    assert "read endpoint http://127.0.0.1:" in r.stdout


async def test_edge_fails_over_to_the_next_regional(regional: RunningRegional) -> None:
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]

    def go() -> Any:
        fwd = GrpcForwarder([f"127.0.0.1:{dead}", f"127.0.0.1:{regional.port}"],
                            backoff_initial_s=0.1)
        now = time.time_ns()
        for seq in (1, 2, 3):
            fwd.write(synthetic("failover-node", seq, now - (3 - seq) * NS, 1,
                                Histogram({3: 1}, count=1, sum=3)))
        assert fwd.close(30)
        return fwd.stats

    stats = await asyncio.to_thread(go)
    assert stats.acked == 3 and stats.reconnects >= 1


async def test_memory_bound_answers_retry_then_stores_each_batch_once(tmp_path: Path) -> None:
    """Past ``max_held_points`` the ingest process answers RETRY: the edge keeps the batch
    and backs off, the regional's memory stops growing. Once windows are stored the same
    batch is accepted, exactly once: nothing lost, nothing doubled."""
    db = f"held_{uuid.uuid4().hex[:10]}"
    # each synthetic batch holds 3 points (2 counters, 1 histogram): two reach the bound
    # a long lateness: no window closes on its own during the test (a minute boundary
    # between the sends must not clear the bound early); drain() closes them
    config = RegionalConfig(insecure=True, listen="127.0.0.1:0", metrics_port=0, query_listen=None,
                            clickhouse=ClickHouseSettings(dsn=f"chdb://{tmp_path}/ch", database=db),
                            resolution=60, lateness=600, max_held_points=5, wal_dir=tmp_path / "wal")
    running = RunningRegional(config)
    await running.start()
    try:
        now = time.time_ns()
        hist = Histogram({3: 1}, count=1, sum=3)
        first = [synthetic("held-a", seq, now - (2 - seq) * NS, 10 * seq, hist) for seq in (1, 2)]
        stats = await asyncio.to_thread(send, running, first)
        assert stats.acked == 2
        await running.push_pressure()  # both recorded into the (still open) window; the gate knows
        assert running.regional.held_points == 6 and running.regional.held_full  # in one or two windows

        fwd = GrpcForwarder([f"127.0.0.1:{running.port}"], backoff_initial_s=0.1)
        fwd.write(synthetic("held-b", 1, now, 1000, hist))

        def retries() -> float:
            return running.regional.registry.get_sample_value(
                "stratoscope_regional_batches_total", {"status": "retry"}) or 0.0

        deadline = time.monotonic() + 20
        while retries() < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert retries() >= 2 and fwd.stats.acked == 0
        async with running.admission_closed():  # the forwarder keeps resending meanwhile
            await running.regional.drain()  # the window is stored: nothing held any more
            assert running.regional.held_points == 0
        assert await asyncio.to_thread(fwd.close, 30), "the retried batch was never accepted"
        assert (fwd.stats.acked, fwd.stats.duplicates) == (1, 0) and fwd.stats.retries >= 2
        await running.drain()
        rows = await sql(running, f"""SELECT node, sum(value) FROM {db}.metrics
            WHERE metric = 'syscalls_total' AND labels['syscall'] = 'read' GROUP BY node ORDER BY node""")
        assert rows == [("", 1030), ("held-a", 30), ("held-b", 1000)]  # "" is the roll-up
        assert running.regional.registry.get_sample_value("stratoscope_regional_held_points_limit") == 5
    finally:
        await running.stop()
