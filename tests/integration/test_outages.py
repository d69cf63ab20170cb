"""Outages on real processes: the regional down for two minutes while edges keep producing,
and the Kafka broker down for a minute. Everything acknowledged arrives once
(docs/GUARANTEES.md)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import kafka_bootstrap, run_edge, stable_port, unique_comm, wait_for
from tests.integration.regional_proc import ROOT, RegionalProcess, kafka_reads, wait_until
from tests.integration.synthetic_edges import SyntheticFleet

pytestmark = [pytest.mark.kernel, pytest.mark.kafka]


def _stored_reads(regional: RegionalProcess) -> dict[str, int]:
    rows = regional.query("""SELECT node, sum(value) FROM stratoscope.metrics
        WHERE metric = 'syscalls_total' AND labels['syscall'] = 'read' AND labels['comm'] = 'app'
        AND resolution = 5 GROUP BY node""")
    return {n: int(v) for n, v in rows}


def _openat(regional: RegionalProcess, node: str, comm: str) -> int:
    rows = regional.query(f"""SELECT sum(value) FROM stratoscope.metrics WHERE metric = 'syscalls_total'
        AND node = '{node}' AND labels['comm'] = '{comm}' AND labels['syscall'] = 'openat'
        AND resolution = 5""")
    return int(rows[0][0])


def test_regional_down_two_minutes_loses_nothing(tmp_path: Path, workload_bin: dict[str, Path]) -> None:
    prefix = f"down-{uuid.uuid4().hex[:10]}"
    regional = RegionalProcess(tmp_path, "--resolution", "5s", "--lateness", "1s",
                               kafka=kafka_bootstrap(), topic_prefix=prefix)
    regional.start()
    target = f"127.0.0.1:{regional.port}"
    fleet = SyntheticFleet("down", 10, [target])
    comm = unique_comm("down")
    result: dict[str, Any] = {}
    errors: list[BaseException] = []
    outage = threading.Event()

    def kernel_edge() -> None:  # 2 x 3,000 openat calls, one run while the regional is down
        try:
            with run_edge(["syscalls"], interval=1.0, forward_to=[target], node_id="down-bpf",
                          forward_close_s=180) as run:
                subprocess.run([str(workload_bin["openat"]), comm, "2000", "1000", "100000"], check=True)
                outage.wait(60)
                subprocess.run([str(workload_bin["openat"]), comm, "2000", "1000", "100000"], check=True)
                result["during"] = time.monotonic()
            result["run"] = run
        except BaseException as exc:
            errors.append(exc)

    fleet.start()
    edge = threading.Thread(target=kernel_edge, name="kernel-edge")
    edge.start()
    t0 = time.monotonic()
    wait_until(t0 + 8)
    regional.kill()
    outage.set()
    wait_until(t0 + 8 + 120)  # two minutes without a regional; edges keep producing
    regional.start()
    wait_until(t0 + 8 + 120 + 10)
    stats = fleet.stop()
    edge.join(300)
    assert not errors, errors
    assert result["during"] < t0 + 8 + 120, "the second workload ran after the outage"
    assert regional.stop() == 0, regional.tail()

    assert stats["rejected"] == stats["dropped"] == 0, stats
    run = result["run"]
    assert run.forward_stats.rejected == 0
    assert not any(v for k, v in run.forward_counts.items() if k.startswith("dropped."))
    assert _stored_reads(regional) == dict(fleet.reads)
    assert _openat(regional, "down-bpf", comm) == 6_000
    reads, openat = kafka_reads(kafka_bootstrap(), prefix)
    assert dict(reads) == dict(fleet.reads)
    assert openat[f"down-bpf/{comm}"] == 6_000


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A broker of this test's own (it is stopped and started again), on free ports."""
    port = stable_port(span=2)  # the controller listens on port + 1
    env = {**os.environ, "KAFKA_PORT": str(port), "KAFKA_DATA": str(tmp_path / "kafka")}
    script = str(ROOT / "scripts/kafka.sh")
    subprocess.run(["bash", script, "start"], env=env, check=True, capture_output=True, timeout=300)
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True, timeout=120)


def test_kafka_broker_down_a_minute_then_every_block_arrives_once(
    tmp_path: Path, own_broker: tuple[str, dict[str, str]]
) -> None:
    bootstrap, env = own_broker
    prefix = f"kdown-{uuid.uuid4().hex[:10]}"
    regional = RegionalProcess(tmp_path, "--resolution", "5s", "--lateness", "1s", "--stop-timeout", "5s",
                               kafka=bootstrap, topic_prefix=prefix)
    regional.start()
    fleet = SyntheticFleet("kdown", 10, [f"127.0.0.1:{regional.port}"])
    fleet.start()
    script = str(ROOT / "scripts/kafka.sh")

    def delivered() -> dict[str, float]:
        m = regional.metrics()
        return {s: m.get(f'stratoscope_regional_sink_delivered_blocks_total{{sink="{s}"}}', 0.0)
                for s in ("clickhouse", "kafka")}

    wait_for("the first blocks in both sinks", lambda: all(delivered().values()), 60)
    subprocess.run(["bash", script, "halt"], env=env, check=True, capture_output=True, timeout=120)
    halted = time.monotonic()
    at_halt = delivered()
    wait_until(halted + 60)
    during = delivered()
    # ClickHouse went on storing while Kafka was down
    assert during["clickhouse"] > at_halt["clickhouse"]
    # SIGTERM while Kafka is still down: the regional stops within its deadline (5 s, plus
    # the ingest server's grace), keeping in its log what Kafka has not confirmed
    t = time.monotonic()
    assert regional.stop() == 0, regional.tail()
    assert time.monotonic() - t < 5 + 5 + 10, regional.tail()
    subprocess.run(["bash", script, "resume"], env=env, check=True, capture_output=True, timeout=300)
    # This life's stop must store everything before the store is read: with 5 s, a busy
    # machine's last drain (behind the replayed windows) can leave the last window in the
    # log, which the next start would store -- correct, but not what is read below.
    regional.argv[regional.argv.index("--stop-timeout") + 1] = "300s"
    regional.start()  # replays the log: Kafka gets its blocks, ClickHouse de-duplicates them
    wait_until(time.monotonic() + 10)
    stats = fleet.stop()
    assert regional.stop() == 0, regional.tail()
    last_life = regional.log.read_text().rsplit("=== start", 1)[1]
    assert "not everything was stored" not in last_life, last_life[-3000:]
    assert stats["rejected"] == stats["dropped"] == 0, stats
    assert _stored_reads(regional) == dict(fleet.reads)
    reads, _ = kafka_reads(bootstrap, prefix)
    assert dict(reads) == dict(fleet.reads)


async def test_clickhouse_refusing_inserts_a_minute_twice_loses_nothing(tmp_path: Path) -> None:
    """ClickHouse refuses every insert for a minute, twice: its target table gone
    (UNKNOWN_TABLE: blocked "missing") and too many parts (merges stopped, a part limit of
    1: blocked "too_many_parts"). Nothing is dropped; totals are exact once it is fixed."""
    import asyncio

    from stratoscope.regional.app import RunningRegional
    from stratoscope.regional.config import RegionalConfig
    from stratoscope.regional.sinks.config import ClickHouseSettings

    config = RegionalConfig(insecure=True, listen="127.0.0.1:0", metrics_port=0, query_listen=None,
                            clickhouse=ClickHouseSettings(dsn=f"chdb://{tmp_path}/ch"),
                            resolution=5, lateness=1, wal_dir=tmp_path / "wal")
    running = RunningRegional(config)
    await running.start()
    fleet = SyntheticFleet("chfail", 10, [f"127.0.0.1:{running.port}"])
    try:
        ch = running.sink("clickhouse")
        q = running.queues[0]
        fleet.start()

        async def until(what: str, check: Any, deadline_s: float = 60) -> None:
            end = time.monotonic() + deadline_s
            while not check():
                if time.monotonic() > end:
                    pytest.fail(f"timed out waiting for {what}")
                await asyncio.sleep(0.2)

        await until("the first blocks stored", lambda: q.delivered > 0)
        for reason, break_it, fix_it in (
            ("missing", ["RENAME TABLE stratoscope.metric_points TO stratoscope.metric_points_away"],
             ["RENAME TABLE stratoscope.metric_points_away TO stratoscope.metric_points"]),
            ("too_many_parts", ["SYSTEM STOP MERGES stratoscope.metric_points",
                                "ALTER TABLE stratoscope.metric_points MODIFY SETTING parts_to_throw_insert = 1"],
             ["ALTER TABLE stratoscope.metric_points MODIFY SETTING parts_to_throw_insert = 3000",
              "SYSTEM START MERGES stratoscope.metric_points"]),
        ):
            for sql in break_it:
                await ch.query(sql)
            await until(f"deliveries blocked ({reason})", lambda r=reason: q.blocked_reason == r)  # type: ignore[misc]
            held = time.monotonic()
            await asyncio.sleep(60)  # the outage's length, not a wait for a condition
            assert q.blocked_reason == reason and q.failed == q.dead_lettered == 0
            assert time.monotonic() - held >= 60
            for sql in fix_it:
                await ch.query(sql)
            await until(f"deliveries flowing again after {reason}", lambda: q.blocked_reason is None, 120)
        stats = await asyncio.to_thread(fleet.stop)
        await running.drain()
        rows = await ch.query("""SELECT node, sum(value) FROM stratoscope.metrics
            WHERE metric = 'syscalls_total' AND labels['syscall'] = 'read' AND labels['comm'] = 'app'
            AND resolution = 5 GROUP BY node""")
        assert {n: int(v) for n, v in rows} == dict(fleet.reads)
        assert stats["rejected"] == stats["dropped"] == 0
        assert (q.failed, q.dead_lettered, q.dropped, q.left_for_log) == (0, 0, 0, 0)
    finally:
        await running.stop()


async def test_the_log_at_its_bound_answers_retry_until_sinks_confirm(tmp_path: Path) -> None:
    """A 1 MiB log with windows that do not close on their own: from 90 % of the bound edges
    are answered RETRY (nothing acknowledged is dropped to make room); once the windows are
    stored the segments go and every batch is taken, once."""
    import asyncio
    import random

    from stratoscope.edge.batch import BatchBuilder
    from stratoscope.edge.forward import GrpcForwarder
    from stratoscope.regional.app import RunningRegional
    from stratoscope.regional.config import RegionalConfig
    from stratoscope.regional.sinks.config import ClickHouseSettings

    config = RegionalConfig(insecure=True, listen="127.0.0.1:0", metrics_port=0, query_listen=None,
                            clickhouse=ClickHouseSettings(dsn=f"chdb://{tmp_path}/ch"),
                            resolution=60, lateness=600, wal_dir=tmp_path / "wal",
                            wal_max_bytes=1024**2)
    assert config.wal_segment_bytes == 64 * 1024
    running = RunningRegional(config)
    await running.start()
    rng = random.Random(7)
    minute = (time.time_ns() // 60_000_000_000 - 2) * 60_000_000_000
    fwd = GrpcForwarder([f"127.0.0.1:{running.port}"], backoff_initial_s=0.1, backoff_max_s=0.5)
    total = 0
    def wal_bytes() -> float:
        return running.regional.registry.get_sample_value("stratoscope_regional_wal_bytes") or 0.0

    sent = 0
    try:
        # one batch at a time (~15 KiB after compression), each answered before the next,
        # until the regional answers RETRY
        while fwd.stats.retries == 0:
            assert sent < 400, f"no RETRY after {sent} batches, log at {wal_bytes():.0f} bytes"
            sent += 1
            b = BatchBuilder("big", "boot-1", sent, minute, minute + 10_000_000_000, {})
            values = {(f"s{i}",): rng.randint(1, 1 << 40) for i in range(1500)}
            b.add_counters("big_total", "1", "", ["k"], values)
            total += sum(values.values())
            fwd.write(b.build())
            await asyncio.to_thread(wait_for, "an answer", lambda: fwd.unacked == 0 or fwd.stats.retries > 0,
                                    30, 0.05)
        assert wal_bytes() >= 0.9 * 1024**2
        assert fwd.unacked == 1  # held by the edge, not dropped by the regional
        while fwd.unacked:  # store what the log holds; the segments go; the rest comes in
            await running.drain()
            await asyncio.sleep(0.5)
        assert fwd.close(60)
        await running.drain()
        rows = await running.sink("clickhouse").query(
            "SELECT sum(value) FROM stratoscope.metrics WHERE metric = 'big_total'")
        assert int(rows[0][0]) == total
        assert fwd.stats.acked == sent and fwd.stats.duplicates == 0
        assert wal_bytes() < 0.9 * 1024**2
    finally:
        await running.stop()
