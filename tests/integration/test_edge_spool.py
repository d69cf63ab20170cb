"""The edge's spool through real processes: the `stratoscope edge` command, SIGKILL, a
restart, a regional that comes up later, and a torn segment tail."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from stratoscope.edge.batch import BatchBuilder
from stratoscope.edge.forward import GrpcForwarder
from stratoscope.edge.spool import Spool, segment_name
from stratoscope.regional.app import RunningRegional
from stratoscope.regional.config import RegionalConfig
from stratoscope.regional.sinks.config import ClickHouseSettings
from stratoscope.v1 import batch_pb2 as pb
from stratoscope.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import free_port, unique_comm, wait_for

pytestmark = pytest.mark.kernel
CLI = [sys.executable, "-m", "stratoscope.cli"]
NS = 1_000_000_000


class Edge:
    """`stratoscope edge` as a child process, its /metrics read as numbers."""

    def __init__(self, proc: subprocess.Popen[str], metrics_port: int, log: Path) -> None:
        self.proc = proc
        self.metrics_port = metrics_port
        self.log = log

    def metrics(self) -> dict[str, float]:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                          timeout=2).read().decode()
        except OSError:
            return {}
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def metric(self, name: str) -> float:
        if self.proc.poll() is not None:
            pytest.fail(f"the edge exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        return self.metrics().get(name, -1.0)


@contextmanager
def edge(tmp_path: Path, regional_port: int, spool: Path, name: str) -> Iterator[Edge]:
    if os.geteuid() != 0:
        pytest.fail("these tests load BPF programs and must run as root (see README)")
    port = free_port()
    log = tmp_path / f"{name}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [*CLI, "edge", "--programs", "syscalls", "--interval", "0.5s",
             "--regional", f"127.0.0.1:{regional_port}", "--insecure", "--spool-dir", str(spool),
             "--metrics-port", str(port), "--node-id", "spool-node"],
            stderr=err, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    e = Edge(proc, port, log)
    try:
        wait_for("the edge's programs attached", lambda: "attached" in log.read_text()
                 and e.metric("stratoscope_edge_spool_batches") >= 0, 120, every_s=0.2)
        yield e
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def regional_config(tmp_path: Path, port: int) -> RegionalConfig:
    return RegionalConfig(
        insecure=True, listen=f"127.0.0.1:{port}", metrics_port=0, query_listen=None,
        clickhouse=ClickHouseSettings(dsn=f"chdb://{tmp_path}/ch",
                                      database=f"spool_{uuid.uuid4().hex[:10]}"),
        resolution=60, lateness=0,
    )


async def sql(regional: RunningRegional, query: str, **params: Any) -> list[tuple[Any, ...]]:
    return await regional.sink("clickhouse").query(query, params)  # type: ignore[attr-defined, no-any-return]


def spooled_keys(spool: Path) -> list[tuple[str, int]]:
    """The unacknowledged batches on disk, read the way the edge reads them at start."""
    s = Spool(spool)
    try:
        return s.pending()
    finally:
        s.close()


async def test_batches_spooled_while_no_regional_survive_sigkill_and_arrive_exactly_once(
    tmp_path: Path, workload_bin: dict[str, Path]
) -> None:
    comm = unique_comm("spool")
    port = free_port()  # the regional's, not up yet
    spool = tmp_path / "spool"

    def first_boot() -> list[tuple[str, int]]:
        with edge(tmp_path, port, spool, "edge1") as e:
            # 4 pauses of 100 ms: the workload spans several 0.5 s intervals (batches)
            subprocess.run([str(workload_bin["openat"]), comm, "3000", "1000", "100000"], check=True)
            built = e.metric("stratoscope_edge_batches_total")
            # two more intervals: every call of the workload is in a spooled batch
            wait_for("two batches after the workload", lambda: e.metric(
                "stratoscope_edge_spool_batches") >= built + 2, 60, every_s=0.1)
            assert e.metric("stratoscope_edge_batches_acked_total") == 0
            e.proc.send_signal(signal.SIGKILL)
            e.proc.wait(timeout=30)
        return spooled_keys(spool)

    old = await asyncio.to_thread(first_boot)
    assert len(old) >= 2 and len({boot for boot, _ in old}) == 1
    assert [seq for _, seq in old] == list(range(1, len(old) + 1))  # none lost to the kill
    assert sorted(p.name for p in spool.glob("spool-*.log")) == [segment_name(1)]

    regional: RunningRegional | None = None
    with edge(tmp_path, port, spool, "edge2") as e:
        assert e.metric("stratoscope_edge_spool_replayed_batches_total") == len(old)
        assert e.metric("stratoscope_edge_spool_corrupt_records_total") == 0
        regional = RunningRegional(regional_config(tmp_path, port))
        await regional.start()
        try:
            def all_acked() -> bool:
                acked = e.metric("stratoscope_edge_batches_acked_total")
                return acked >= len(old) + 2 and e.metric("stratoscope_edge_spool_batches") == 0

            await asyncio.to_thread(wait_for, "the spooled batches acknowledged", all_acked, 120, 0.2)
            e.proc.send_signal(signal.SIGTERM)  # a final drain, acknowledged before it exits
            rc = await asyncio.to_thread(e.proc.wait, 60)
            assert rc == 0, e.log.read_text()[-3000:]
            assert "batches were not acknowledged" not in e.log.read_text()
            await regional.drain()
            db = regional.config.clickhouse.database  # type: ignore[union-attr]

            async def total(metric: str, extra: str = "") -> int:
                rows = await sql(regional, f"""SELECT sum(value) FROM {db}.metrics
                    WHERE metric = {{m:String}} AND node = 'spool-node' AND labels['comm'] = {{c:String}}
                    AND labels['syscall'] = 'openat' {extra}""", m=metric, c=comm)
                return int(rows[0][0])

            # exactly the calls made before the kill: every spooled batch stored once
            assert await total("syscalls_total") == 4000
            assert await total("syscall_errors_total", "AND labels['errno'] = 'ENOENT'") == 1000
            reg = regional.regional.registry
            accepted = reg.get_sample_value("stratoscope_regional_batches_total", {"status": "accepted"})
            dupes = reg.get_sample_value("stratoscope_regional_batches_total", {"status": "duplicate"})
            assert dupes in (None, 0.0)
            # the first boot's batches and the second's, each once
            assert accepted is not None and accepted >= len(old) + 2
        finally:
            await regional.stop()
    assert spooled_keys(spool) == []
    assert list(spool.glob("spool-*.log")) in ([], [spool / segment_name(2)])


async def test_a_torn_tail_is_counted_and_the_rest_is_sent(tmp_path: Path) -> None:
    """A segment whose last record was cut short (a power cut mid-write): the edge starts,
    counts it, and sends the batches before it."""
    spool = tmp_path / "spool"
    s = Spool(spool)
    now = __import__("time").time_ns()
    for seq in (1, 2, 3):
        b = BatchBuilder("torn-node", "old-boot", seq, now - (4 - seq) * 10 * NS, now - (3 - seq) * 10 * NS,
                         {})
        b.add_counters("syscalls_total", "calls", "h", ["syscall", "comm"], {("read", "torn"): 10 * seq})
        s.append(("old-boot", seq), b.build().SerializeToString())
    s.close()
    seg = spool / segment_name(1)
    whole = seg.read_bytes()
    with open(seg, "ab") as f:
        f.write(whole[:20])  # the start of a fourth record, torn
    port = free_port()
    regional = RunningRegional(regional_config(tmp_path, port))
    await regional.start()
    try:
        def run() -> None:
            with edge(tmp_path, port, spool, "edge") as e:
                assert e.metric("stratoscope_edge_spool_corrupt_records_total") == 1
                assert e.metric("stratoscope_edge_spool_corrupt_bytes_total") == 20
                assert e.metric("stratoscope_edge_spool_replayed_batches_total") == 3
                wait_for("the three batches acknowledged", lambda: e.metric(
                    "stratoscope_edge_batches_acked_total") >= 3 and e.metric(
                    "stratoscope_edge_spool_batches") <= 1, 120, every_s=0.2)
                e.proc.send_signal(signal.SIGTERM)
                assert e.proc.wait(timeout=60) == 0, e.log.read_text()[-3000:]

        await asyncio.to_thread(run)
        await regional.drain()
        db = regional.config.clickhouse.database  # type: ignore[union-attr]
        rows = await sql(regional, f"""SELECT sum(value) FROM {db}.metrics WHERE metric = 'syscalls_total'
            AND node = 'torn-node' AND labels['comm'] = 'torn'""")
        assert int(rows[0][0]) == 60
    finally:
        await regional.stop()
    assert spooled_keys(spool) == []
    assert not seg.exists()  # every batch in it answered: deleted, torn tail and all


class FakeRegional(ingest_pb2_grpc.IngestServicer):
    """An ingest endpoint that records what it receives and answers ACCEPTED either at
    once (``answer=True``) or only for the keys the test puts in ``release``."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.got: list[tuple[str, int]] = []
        self.release: queue.Queue[tuple[str, int]] = queue.Queue()

    def Stream(self, request_iterator: Any, context: Any) -> Iterator[ingest_pb2.Ack]:  # noqa: N802
        ack = ingest_pb2.Ack
        if self.answer:
            for b in request_iterator:
                self.got.append((b.boot_id, b.seq))
                yield ack(boot_id=b.boot_id, seq=b.seq, status=ack.ACCEPTED)
            return
        def read() -> None:
            with contextlib.suppress(grpc.RpcError, ValueError):  # the stream ends with the server
                for b in request_iterator:
                    self.got.append((b.boot_id, b.seq))

        threading.Thread(target=read, daemon=True).start()
        while context.is_active():
            try:
                boot, seq = self.release.get(timeout=0.1)
            except queue.Empty:
                continue
            yield ack(boot_id=boot, seq=seq, status=ack.ACCEPTED)


@contextmanager
def fake_regional(port: int, answer: bool) -> Iterator[FakeRegional]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    fake = FakeRegional(answer)
    ingest_pb2_grpc.add_IngestServicer_to_server(fake, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield fake
    finally:
        server.stop(0).wait(10)


def batch(seq: int) -> Any:
    return pb.Batch(node_id="n", boot_id="boot-1", seq=seq)


def test_in_doubt_batches_go_only_to_their_regional_also_after_a_restart(tmp_path: Path) -> None:
    """Sent to A and not answered when A died: held for A (not sent to B, which takes the
    new batches at once), also by a restarted edge, until A is back and answers them."""
    pa, pb_ = free_port(), free_port()
    targets = [f"127.0.0.1:{pa}", f"127.0.0.1:{pb_}"]
    with fake_regional(pb_, answer=True) as b:
        with fake_regional(pa, answer=False) as a:
            fwd = GrpcForwarder(targets, compression="none", backoff_initial_s=0.1,
                                spool=Spool(tmp_path / "spool"))
            for seq in (1, 2, 3):
                fwd.write(batch(seq))
            wait_for("A received 1-3", lambda: len(a.got) == 3, 30, every_s=0.05)
        # A is gone without answering: 1-3 are in doubt there. (Written before the edge saw
        # the stream end, 4 and 5 could go to A's dying stream and be in doubt there too.)
        wait_for("the stream to A retired", lambda: fwd.stats.reconnects >= 1, 30, every_s=0.05)
        fwd.write(batch(4))
        fwd.write(batch(5))
        wait_for("B acknowledged 4 and 5", lambda: fwd.stats.acked == 2, 30, every_s=0.05)
        assert b.got == [("boot-1", 4), ("boot-1", 5)]
        assert fwd.counts()["in_doubt"] == 3
        fwd.close(0)

        # a restarted edge: the SENT records keep 1-3 for A
        fwd = GrpcForwarder(targets, compression="none", backoff_initial_s=0.1,
                            spool=Spool(tmp_path / "spool"))
        assert (fwd.counts()["spool_replayed"], fwd.counts()["in_doubt"]) == (3, 3)
        fwd.write(batch(6))
        wait_for("B acknowledged 6", lambda: fwd.stats.acked == 1, 30, every_s=0.05)
        with fake_regional(pa, answer=True) as a2:
            wait_for("A answered 1-3", lambda: fwd.unacked == 0, 60, every_s=0.05)
        assert a2.got == [("boot-1", 1), ("boot-1", 2), ("boot-1", 3)]
        assert b.got == [("boot-1", 4), ("boot-1", 5), ("boot-1", 6)]
        assert (fwd.stats.acked, fwd.stats.in_doubt_released, fwd.counts()["in_doubt"]) == (4, 0, 0)
        assert fwd.close(0)


def test_in_doubt_batches_are_released_after_the_timeout_and_counted(tmp_path: Path) -> None:
    pa, pb_ = free_port(), free_port()
    targets = [f"127.0.0.1:{pa}", f"127.0.0.1:{pb_}"]
    spool = Spool(tmp_path / "spool")
    for seq in (1, 2):
        spool.append(("boot-1", seq), batch(seq).SerializeToString())
        spool.mark_sent(("boot-1", seq), targets[0])  # in doubt at A, which never comes back
    with fake_regional(pb_, answer=True) as b:
        fwd = GrpcForwarder(targets, compression="none", backoff_initial_s=0.1, spool=spool,
                            in_doubt_timeout_s=0.0)
        fwd.write(batch(3))
        assert fwd.close(30)
    assert sorted(b.got) == [("boot-1", 1), ("boot-1", 2), ("boot-1", 3)]
    assert fwd.stats.in_doubt_released == 2


def test_no_more_than_max_in_flight_batches_are_unanswered_on_a_stream(tmp_path: Path) -> None:
    port = free_port()
    with fake_regional(port, answer=False) as a:
        fwd = GrpcForwarder([f"127.0.0.1:{port}"], compression="none", max_in_flight=4,
                            spool=Spool(tmp_path / "spool"))
        for seq in range(1, 11):
            fwd.write(batch(seq))
        wait_for("four in flight", lambda: len(a.got) == 4, 30, every_s=0.05)
        for seq in (1, 2):
            a.release.put(("boot-1", seq))
        wait_for("two more after two answers", lambda: fwd.stats.acked == 2 and len(a.got) == 6,
                 30, every_s=0.05)
        for seq in range(3, 11):  # answered one by one, each once it has arrived
            wait_for(f"batch {seq}", lambda seq=seq: ("boot-1", seq) in a.got, 30, every_s=0.02)
            assert len(a.got) <= seq + 3  # seq - 1 answered: never more than 4 unanswered
            a.release.put(("boot-1", seq))
        assert fwd.close(30)
    assert a.got == [("boot-1", s) for s in range(1, 11)]


def test_an_unusable_spool_directory_exits_2_naming_it(tmp_path: Path) -> None:
    held = Spool(tmp_path / "busy")  # another edge holds this one
    try:
        for spool, message in ((tmp_path / "file" / "spool", "Not a directory"),
                               (tmp_path / "busy", "is in use by another edge")):
            (tmp_path / "file").write_text("")
            r = subprocess.run([*CLI, "edge", "--programs", "syscalls", "--once", "--metrics-port", "0",
                                "--regional", "127.0.0.1:1", "--insecure", "--spool-dir", str(spool)],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 2, r.stderr
            assert r.stderr.strip().endswith(f"{message} (set spool_dir or --spool-dir)"), r.stderr
            assert "Traceback" not in r.stderr
    finally:
        held.close()
