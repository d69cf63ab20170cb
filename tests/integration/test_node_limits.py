"""One noisy node against a real regional: it is answered RETRY past its rate and counted,
keeps its batches and gets them all in later; a quiet node on the same regional is never
held back. Totals of both are exact."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path

from stratoscope.edge.batch import BatchBuilder
from stratoscope.edge.forward import GrpcForwarder
from stratoscope.regional.app import RunningRegional
from stratoscope.regional.config import RegionalConfig
from stratoscope.regional.sinks.config import ClickHouseSettings
from stratoscope.v1 import batch_pb2 as pb

NOISY_BATCHES = 120
QUIET_BATCHES = 20


def _batch(node: str, seq: int) -> pb.Batch:
    now = time.time_ns()
    b = BatchBuilder(node, "boot", seq, now - 10**9, now, {})
    b.add_counters("syscalls_total", "calls", "", ["syscall"], {("read",): 3})
    return b.build()


async def test_a_noisy_node_is_throttled_and_the_others_are_not(tmp_path: Path) -> None:
    db = f"limits_{uuid.uuid4().hex[:10]}"
    regional = RunningRegional(RegionalConfig(
        insecure=True, listen="127.0.0.1:0", metrics_port=0, query_listen=None, wal_dir=tmp_path / "wal",
        clickhouse=ClickHouseSettings(dsn=f"chdb://{tmp_path}/ch", database=db),
        node_max_batches_per_s=20, node_burst=1))
    await regional.start()
    try:
        target = [f"127.0.0.1:{regional.port}"]
        noisy = GrpcForwarder(target, backoff_initial_s=0.1, backoff_max_s=1.0)
        quiet = GrpcForwarder(target, backoff_initial_s=0.1, backoff_max_s=1.0)

        def flood() -> None:  # as fast as the forwarder takes them
            for seq in range(1, NOISY_BATCHES + 1):
                noisy.write(_batch("noisy", seq))

        def trickle() -> None:  # 10 batches a second, well under the limit
            for seq in range(1, QUIET_BATCHES + 1):
                quiet.write(_batch("quiet", seq))
                time.sleep(0.1)  # pacing the workload, not waiting for a condition

        threads = [threading.Thread(target=flood), threading.Thread(target=trickle)]
        for t in threads:
            t.start()
        for t in threads:
            await asyncio.to_thread(t.join)
        await asyncio.to_thread(noisy.close, 120)
        await asyncio.to_thread(quiet.close, 60)
        assert (noisy.stats.acked, noisy.stats.rejected) == (NOISY_BATCHES, 0)
        assert noisy.stats.retries > 0
        assert (quiet.stats.acked, quiet.stats.rejected, quiet.stats.retries) == (QUIET_BATCHES, 0, 0)
        await regional.drain()
        throttled = regional.regional.registry.get_sample_value(
            "stratoscope_regional_throttled_batches_total", {"limit": "batches"})
        assert throttled == noisy.stats.retries
        rows = await regional.sink("clickhouse").query(
            f"SELECT node, sum(value) FROM {db}.metrics WHERE metric = 'syscalls_total' "
            "AND node != '' GROUP BY node ORDER BY node")
        assert {n: int(v) for n, v in rows} == {"noisy": 3 * NOISY_BATCHES, "quiet": 3 * QUIET_BATCHES}
        # the gate's state on /metrics (sent every second by the ingest process)
        def gate(name: str) -> float | None:
            return regional.regional.registry.get_sample_value(name)

        deadline = time.monotonic() + 30
        while gate("stratoscope_regional_dedup_boots") != 2:
            assert time.monotonic() < deadline, gate("stratoscope_regional_dedup_boots")
            await asyncio.sleep(0.2)
        assert gate("stratoscope_regional_rate_limited_nodes") == 2
        assert gate("stratoscope_regional_dedup_floor_jumps_total") == 0
    finally:
        await regional.stop()


BOMBS = 3


def _dear_batch(seq: int) -> pb.Batch:
    """A sealed batch whose body is within the inflation bound yet costs the regional
    ~1 s to parse: 16 MiB of empty metric blocks beside incompressible noise (an unknown
    field), refused for its block count only after the parse (docs/SECURITY.md)."""
    import random

    import zstandard

    from stratoscope.regional.validate import Limits
    from stratoscope.wire import varint

    now = time.time_ns()
    total = (16 << 20) - 1024
    noise = random.Random(seq).randbytes(total // Limits().max_inflation + 4096)
    tail = varint(99 << 3 | 2) + varint(len(noise)) + noise
    head = pb.Batch(strings=[""]).SerializeToString()
    body = head + b"\x4a\x00" * ((total - len(head) - len(tail)) // 2) + tail
    return pb.Batch(node_id="dear", boot_id="boot", seq=seq, start_ns=now - 10**9, end_ns=now,
                    codec=pb.CODEC_ZSTD, body=zstandard.ZstdCompressor(level=6).compress(body))


async def test_a_node_whose_batches_cost_much_cpu_waits_and_the_others_do_not(tmp_path: Path) -> None:
    db = f"cpu_{uuid.uuid4().hex[:10]}"
    regional = RunningRegional(RegionalConfig(
        insecure=True, listen="127.0.0.1:0", metrics_port=0, query_listen=None, wal_dir=tmp_path / "wal",
        clickhouse=ClickHouseSettings(dsn=f"chdb://{tmp_path}/ch", database=db),
        node_max_cpu=0.1, node_burst=1))  # 0.1 s of burst: the first dear batch spends it
    await regional.start()
    try:
        target = [f"127.0.0.1:{regional.port}"]
        # sealed here already: sent as they are
        dear = GrpcForwarder(target, backoff_initial_s=0.1, backoff_max_s=0.5, compression="none")
        quiet = GrpcForwarder(target, backoff_initial_s=0.1, backoff_max_s=1.0)
        bombs = [_dear_batch(seq) for seq in range(1, BOMBS + 1)]

        def bomb() -> None:
            for b in bombs:
                dear.write(b)

        def trickle() -> None:  # 5 batches a second
            for seq in range(1, QUIET_BATCHES + 1):
                quiet.write(_batch("quiet", seq))
                time.sleep(0.2)  # pacing the workload, not waiting for a condition

        threads = [threading.Thread(target=bomb), threading.Thread(target=trickle)]
        for t in threads:
            t.start()
        for t in threads:
            await asyncio.to_thread(t.join)
        await asyncio.to_thread(dear.close, 300)
        await asyncio.to_thread(quiet.close, 120)
        assert (dear.stats.acked, dear.stats.rejected) == (0, BOMBS)  # each parsed once, refused
        assert dear.stats.retries > 0
        assert (quiet.stats.acked, quiet.stats.rejected, quiet.stats.retries) == (QUIET_BATCHES, 0, 0)
        registry = regional.regional.registry
        assert registry.get_sample_value("stratoscope_regional_throttled_batches_total", {"limit": "cpu"}) \
            == dear.stats.retries
        assert registry.get_sample_value("stratoscope_regional_rejected_batches_total", {"reason": "series"}) == BOMBS
        await regional.drain()
        rows = await regional.sink("clickhouse").query(
            f"SELECT node, sum(value) FROM {db}.metrics WHERE metric = 'syscalls_total' "
            "AND node != '' GROUP BY node ORDER BY node")
        assert {n: int(v) for n, v in rows} == {"quiet": 3 * QUIET_BATCHES}
    finally:
        await regional.stop()
