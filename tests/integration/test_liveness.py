"""Liveness: a process that is alive but stops answering is noticed within a deadline.

The edge fails over when a regional leaves its batches unanswered past ``ack_timeout``
(the batches it left unanswered stay in doubt there); the regional notices a sink process,
its ingest process or its merge process that stops answering within ``child_timeout``, and
a write-ahead log whose write or fsync does not return within ``wal_fsync_timeout``
(docs/GUARANTEES.md). Deadlines are set short here by flags; every wait is for a
condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stratoscope.edge.forward import GrpcForwarder
from stratoscope.edge.spool import Spool
from stratoscope.regional.delivery import DeliveryQueue
from stratoscope.regional.sinks.config import ClickHouseSettings
from stratoscope.regional.sinks.process import ProcessSink
from tests.conftest import free_port, unique_comm, wait_for
from tests.integration.regional_proc import RegionalProcess, _group_alive
from tests.integration.synthetic_edges import SyntheticFleet
from tests.integration.test_clickhouse_sink import framed_blocks
from tests.integration.test_edge_spool import Edge, batch, fake_regional
from tests.integration.test_outages import _openat, _stored_reads
from tests.integration.test_sink_acknowledged import frames_of, syscalls, until


def test_a_regional_that_stops_answering_is_failed_over_and_keeps_its_batches(tmp_path: Path) -> None:
    """A takes batches 1-3 and never answers (alive, connected, silent): after the deadline
    the edge counts it, new batches go to B at once, and 1-3 stay held for A (never sent to
    B) until A answers them."""
    pa, pb_ = free_port(), free_port()
    targets = [f"127.0.0.1:{pa}", f"127.0.0.1:{pb_}"]
    with fake_regional(pb_, answer=True) as b:
        with fake_regional(pa, answer=False) as a:
            fwd = GrpcForwarder(targets, compression="none", backoff_initial_s=0.1,
                                spool=Spool(tmp_path / "spool"), ack_timeout_s=3.0)
            for seq in (1, 2, 3):
                fwd.write(batch(seq))
            wait_for("A received 1-3", lambda: len(a.got) >= 3, 30, every_s=0.05)
            assert fwd.errors["ack_timeout"] == 0
            wait_for("the ack deadline to end the stream to A",
                     lambda: fwd.errors["ack_timeout"] >= 1, 3.0 + 30, every_s=0.05)
            fwd.write(batch(4))
            fwd.write(batch(5))
            wait_for("B acknowledged 4 and 5", lambda: fwd.stats.acked == 2, 30, every_s=0.05)
            assert b.got == [("boot-1", 4), ("boot-1", 5)]
            assert set(a.got) == {("boot-1", 1), ("boot-1", 2), ("boot-1", 3)}
            assert fwd.counts()["in_doubt"] == 3
        with fake_regional(pa, answer=True) as a2:  # A answers again
            wait_for("A answered 1-3", lambda: fwd.unacked == 0, 60, every_s=0.05)
        assert set(a2.got) == {("boot-1", 1), ("boot-1", 2), ("boot-1", 3)}
        assert b.got == [("boot-1", 4), ("boot-1", 5)]
        assert (fwd.stats.acked, fwd.stats.in_doubt_released, fwd.counts()["in_doubt"]) == (5, 0, 0)
        assert fwd.counts()["errors.ack_timeout"] >= 1
        assert fwd.close(0)


def test_a_regional_that_answers_slowly_but_steadily_is_not_failed_over(tmp_path: Path) -> None:
    """16 batches answered one every 0.25 s: the last waits 4 s, past the 2.5 s deadline,
    but answers never stop for long, so A keeps them all and B gets none."""
    pa, pb_ = free_port(), free_port()
    with fake_regional(pb_, answer=True) as b, fake_regional(pa, answer=False) as a:
        fwd = GrpcForwarder([f"127.0.0.1:{pa}", f"127.0.0.1:{pb_}"], compression="none",
                            spool=Spool(tmp_path / "spool"), ack_timeout_s=2.5)
        for seq in range(1, 17):
            fwd.write(batch(seq))
        wait_for("A received all 16", lambda: len(a.got) == 16, 30, every_s=0.05)
        started = time.monotonic()
        for seq in range(1, 17):
            next_at = started + 0.25 * seq
            time.sleep(max(0.0, next_at - time.monotonic()))  # pacing the answers, not a wait
            a.release.put(("boot-1", seq))
        wait_for("A answered all 16", lambda: fwd.unacked == 0, 30, every_s=0.05)
        assert time.monotonic() - started > 2.5  # the last one waited longer than the deadline
        assert fwd.errors["ack_timeout"] == 0 and b.got == [] and fwd.stats.acked == 16
        assert fwd.close(0)


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_a_delivery_to_a_hung_sink_process_is_retried_in_a_new_one(tmp_path: Path) -> None:
    """The sink process is stopped (alive, its pipe open, silent) while a frame is being
    delivered to it: within the deadline it is counted and killed, the delivery fails as
    retriable, the queue retries it in a new process, and ClickHouse holds every frame
    once."""
    sink = ProcessSink(ClickHouseSettings(dsn=f"chdb://{tmp_path}/ch"), child_timeout_s=3.0)
    q = DeliveryQueue(sink, batch_max_blocks=2, batch_max_wait_s=0.0, timeout_s=120,
                      backoff_initial_s=0.1, backoff_max_s=0.5)
    frames = frames_of(framed_blocks(6, 2, "hung-sink"))
    await q.start()
    try:
        await q.put(frames[0])
        await asyncio.wait_for(q.flush(), 60)
        assert sink._proc is not None and sink._proc.pid is not None
        hung_pid = sink._proc.pid
        os.kill(hung_pid, signal.SIGSTOP)
        await q.put(frames[1])
        await q.put(frames[2])
        await until("the hung sink process noticed", lambda: sink.hangs == 1, 3.0 + 30)
        await until("it is gone", lambda: _gone(hung_pid), 30)
        await asyncio.wait_for(q.flush(), 120)
        assert sink._proc is not None and sink._proc.pid != hung_pid and sink.alive
        assert (q.delivered, q.failed, q.dead_lettered, sink.hangs) == (6, 0, 0, 1)
        assert q.retried >= 1
        assert await sink.query("SELECT sum(value) FROM metrics WHERE metric = 'syscalls_total'") \
            == [(syscalls(6),)]
    finally:
        await q.stop()


# -- real processes -----------------------------------------------------------------------

#: Short deadlines for the tests (the defaults are 30 s and 60 s), still long next to the
#: milliseconds an answer takes on a busy machine.
ACK_TIMEOUT_S = 3.0
CHILD_TIMEOUT_S = 5.0
#: How much longer than a deadline a condition may take on a busy 2-core machine before the
#: test fails: never used as a measure of speed.
SLACK_S = 30.0
WINDOWS = ("--resolution", "5s", "--lateness", "1s")


def _children(pid: int, comm: str) -> list[int]:
    """The live child processes of ``pid`` named ``comm`` (regional/runtime.py names them)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                head, _, rest = f.read().rpartition(")")
        except OSError:
            continue
        fields = rest.split()
        if head.split("(", 1)[1] == comm and int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def _child(regional: RegionalProcess, comm: str) -> int:
    assert regional.proc is not None
    proc = regional.proc
    (pid,) = wait_for(f"the regional's {comm} process", lambda: _children(proc.pid, comm), 60, 0.1)
    return pid  # type: ignore[no-any-return]


def _metrics(regional: RegionalProcess) -> dict[str, float]:
    """Its /metrics, waiting until they are served: the page starts a moment after the
    ingest port, which is what RegionalProcess.start() waits for."""

    def page() -> dict[str, float] | None:
        try:
            return regional.metrics()
        except OSError:
            return None

    return wait_for("the regional's /metrics", page, 60, 0.1)  # type: ignore[no-any-return]


def _hangs(regional: RegionalProcess, process: str) -> float:
    return _metrics(regional).get(f'stratoscope_regional_child_hangs_total{{process="{process}"}}', -1.0)


def _sum_reads(*regionals: RegionalProcess) -> dict[str, int]:
    total: dict[str, int] = {}
    for r in regionals:
        for node, v in _stored_reads(r).items():
            total[node] = total.get(node, 0) + v
    return total


@pytest.fixture
def regionals(tmp_path: Path) -> Iterator[Callable[..., RegionalProcess]]:
    """Makes RegionalProcesses in directories of their own; kills what a failed test left
    running (continued first: a stopped process group would not die of SIGTERM)."""
    made: list[RegionalProcess] = []

    def make(name: str, *extra: str) -> RegionalProcess:
        (tmp_path / name).mkdir()
        r = RegionalProcess(tmp_path / name, *extra)
        made.append(r)
        return r

    yield make
    for r in made:
        if r.proc is not None and r.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(r.proc.pid, signal.SIGCONT)
            r.kill()


def test_a_stopped_regional_is_failed_over_and_what_it_took_arrives_once(
        regionals: Callable[..., RegionalProcess]) -> None:
    """Regional A's whole process group is stopped (alive, its port open, silent) while
    five edges send to [A, B]: each edge notices within its ack deadline and sends to B;
    what A left unanswered stays held for A. After SIGCONT, A answers those, nothing is
    released to B, A does not take its own pause for a hung child, and the two stores
    together hold exactly what the edges sent."""
    a = regionals("a", *WINDOWS, "--child-timeout", "20s")
    b = regionals("b", *WINDOWS, "--child-timeout", "20s")
    a.start()
    b.start()
    fleet = SyntheticFleet("stop", 5, [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"],
                           ack_timeout_s=ACK_TIMEOUT_S)
    fwds = list(fleet.forwarders.values())
    fleet.start()
    wait_for("A to acknowledge every edge", lambda: all(f.stats.acked >= 3 for f in fwds), 60, 0.1)
    assert a.proc is not None
    os.killpg(a.proc.pid, signal.SIGSTOP)
    at_stop = [f.stats.acked for f in fwds]
    # only B can acknowledge now: an edge with new acknowledgements has failed over
    wait_for("every edge to fail over to B",
             lambda: all(f.errors["ack_timeout"] >= 1 and f.stats.acked > n
                         for f, n in zip(fwds, at_stop, strict=True)),
             ACK_TIMEOUT_S + SLACK_S, 0.1)
    wait_for("B to take five more batches of every edge",
             lambda: all(f.stats.acked >= n + 5 for f, n in zip(fwds, at_stop, strict=True)), 60, 0.1)
    # sent to A before the deadline and never answered: held for A, not sent to B
    assert sum(f.counts()["in_doubt"] for f in fwds) >= 1
    os.killpg(a.proc.pid, signal.SIGCONT)
    wait_for("A to answer what it was holding",
             lambda: sum(f.counts()["in_doubt"] for f in fwds) == 0, 120, 0.2)
    # A's own watchdogs did not take the pause of the whole group for a hung child
    assert _hangs(a, "ingest") == _hangs(a, "sink-clickhouse") == 0
    stats = fleet.stop()
    assert a.stop() == 0, a.tail()
    assert b.stop() == 0, b.tail()
    assert stats["rejected"] == stats["dropped"] == stats["in_doubt_released"] == 0, stats
    assert stats["errors.ack_timeout"] >= 5, stats
    assert _sum_reads(a, b) == dict(fleet.reads)


@pytest.mark.kernel
def test_the_edge_command_fails_over_from_a_stopped_regional_with_exact_counts(
        regionals: Callable[..., RegionalProcess], tmp_path: Path, workload_bin: dict[str, Path]) -> None:
    """The real `stratoscope edge` (BPF programs, its spool, /metrics) with --ack-timeout 3s
    sends to [A, B]. A child makes 1,500 openat calls, A's process group is stopped, the
    edge fails over and says so on /metrics, a child makes 2,500 more; after SIGCONT the
    two stores together hold exactly 4,000 for that child."""
    if os.geteuid() != 0:
        pytest.fail("this test loads BPF programs and must run as root (see README)")
    a = regionals("a", *WINDOWS, "--child-timeout", "20s")
    b = regionals("b", *WINDOWS, "--child-timeout", "20s")
    a.start()
    b.start()
    comm = unique_comm("ackto")
    port = free_port()
    log = tmp_path / "edge.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stratoscope.cli", "edge", "--programs", "syscalls",
             "--interval", "1s", "--regional", f"127.0.0.1:{a.port}", "--regional",
             f"127.0.0.1:{b.port}", "--ack-timeout", f"{ACK_TIMEOUT_S:g}s",
             "--spool-dir", str(tmp_path / "spool"), "--metrics-port", str(port),
             "--node-id", "ackto-node", "--insecure"],
            stderr=err, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    edge = Edge(proc, port, log)
    timeouts = 'stratoscope_edge_forwarder_errors_total{reason="ack_timeout"}'
    try:
        wait_for("A to acknowledge the edge", lambda: edge.metric("stratoscope_edge_batches_acked_total") >= 2,
                 120, 0.2)
        subprocess.run([str(workload_bin["openat"]), comm, "1000", "500"], check=True)
        assert a.proc is not None
        os.killpg(a.proc.pid, signal.SIGSTOP)
        wait_for("the edge to give up on A", lambda: edge.metric(timeouts) >= 1, ACK_TIMEOUT_S + SLACK_S, 0.2)
        acked = edge.metric("stratoscope_edge_batches_acked_total")
        wait_for("B to acknowledge the edge",
                 lambda: edge.metric("stratoscope_edge_batches_acked_total") >= acked + 2, 60, 0.2)
        assert edge.metric("stratoscope_edge_batches_in_doubt") >= 1  # held for A
        subprocess.run([str(workload_bin["openat"]), comm, "2000", "500"], check=True)
        os.killpg(a.proc.pid, signal.SIGCONT)
        wait_for("A to answer what it was holding",
                 lambda: edge.metric("stratoscope_edge_batches_in_doubt") == 0, 120, 0.2)
        m = edge.metrics()
        assert m["stratoscope_edge_in_doubt_released_total"] == 0, m
        assert not any(v for k, v in m.items() if k.startswith("stratoscope_edge_batches_dropped_total")), m
        proc.send_signal(signal.SIGTERM)  # its final drain is acknowledged before it exits
        assert proc.wait(120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert a.stop() == 0, a.tail()
    assert b.stop() == 0, b.tail()
    assert _openat(a, "ackto-node", comm) + _openat(b, "ackto-node", comm) == 4_000


def _delivered(regional: RegionalProcess) -> float:
    return _metrics(regional).get('stratoscope_regional_sink_delivered_blocks_total{sink="clickhouse"}', 0.0)


def test_a_stopped_sink_process_is_replaced_and_totals_stay_exact(
        regionals: Callable[..., RegionalProcess]) -> None:
    """The ClickHouse sink process is stopped while five edges send: the regional notices
    within its deadline (counted, logged), kills it, stores on in a new one, and ClickHouse
    holds exactly what the edges sent."""
    r = regionals("r", *WINDOWS, "--child-timeout", f"{CHILD_TIMEOUT_S:g}s")
    r.start()
    assert r.proc is not None
    regional_pid = r.proc.pid
    fleet = SyntheticFleet("sinkhang", 5, [f"127.0.0.1:{r.port}"])
    fleet.start()
    wait_for("the first blocks stored", lambda: _delivered(r) > 0, 60, 0.2)
    assert _hangs(r, "sink-clickhouse") == 0
    hung = _child(r, "strato-sink-ch")
    os.kill(hung, signal.SIGSTOP)
    wait_for("the regional to notice the stopped sink process",
             lambda: _hangs(r, "sink-clickhouse") == 1, CHILD_TIMEOUT_S + SLACK_S, 0.1)
    wait_for("it to be gone", lambda: _gone(hung), 30, 0.1)
    assert f"sink process clickhouse (pid {hung}) has not answered" in r.tail(10**6)
    at_kill = _delivered(r)
    wait_for("a new sink process to store again",
             lambda: _delivered(r) > at_kill and _children(regional_pid, "strato-sink-ch") != [], 60, 0.2)
    assert hung not in _children(regional_pid, "strato-sink-ch")
    stats = fleet.stop()
    assert _hangs(r, "sink-clickhouse") == 1 and _hangs(r, "ingest") == 0
    assert r.stop() == 0, r.tail()
    assert stats["rejected"] == stats["dropped"] == 0, stats
    assert _stored_reads(r) == dict(fleet.reads)


def test_a_stopped_ingest_process_stops_the_regional_and_a_restart_replays_its_log(
        regionals: Callable[..., RegionalProcess]) -> None:
    """The ingest process is stopped while five edges send: the regional notices within
    its deadline, logs it and exits non-zero (as when the ingest process dies), so a
    supervisor restarts it. Its windows are long and it has no time to store on the way
    out (--stop-timeout 0), so what it acknowledged is only in its log: the restart
    replays it, and ClickHouse holds exactly what the edges sent."""
    r = regionals("r", "--resolution", "60s", "--lateness", "60s",
                  "--child-timeout", f"{CHILD_TIMEOUT_S:g}s", "--stop-timeout", "0s")
    r.start()
    fleet = SyntheticFleet("ingesthang", 5, [f"127.0.0.1:{r.port}"])
    fwds = list(fleet.forwarders.values())
    fleet.start()
    wait_for("every edge acknowledged", lambda: all(f.stats.acked >= 3 for f in fwds), 60, 0.1)
    hung = _child(r, "strato-ingest")
    assert r.proc is not None
    os.kill(hung, signal.SIGSTOP)
    # noticed within the deadline, then the regional stops at once (--stop-timeout 0s; a sink
    # process gets 5 s more to exit)
    assert r.proc.wait(CHILD_TIMEOUT_S + 5 + SLACK_S) == 1, r.tail()
    log = r.tail(10**6)
    assert f"the ingest process (pid {hung}) has not answered" in log, log
    wait_for("the stopped ingest process to be gone", lambda: _gone(hung), 30, 0.1)
    # what a supervisor does; this time with time to store everything when stopped below
    r.argv[r.argv.index("--stop-timeout") + 1] = "120s"
    r.start()
    replayed = _metrics(r)
    assert replayed['stratoscope_regional_wal_replayed_batches_total{outcome="merged"}'] >= 5 * 3, \
        replayed
    stats = fleet.stop()
    assert r.stop() == 0, r.tail()
    assert stats["rejected"] == stats["dropped"] == 0, stats
    rows = r.query("""SELECT node, sum(value) FROM stratoscope.metrics
        WHERE metric = 'syscalls_total' AND labels['syscall'] = 'read' AND labels['comm'] = 'app'
        AND resolution = 60 GROUP BY node""")
    assert {n: int(v) for n, v in rows} == dict(fleet.reads)


async def test_a_stopped_ingest_process_is_counted_and_fails_the_regional(tmp_path: Path) -> None:
    """The same, in process: the hang is on /metrics, and ``failed`` is set (what makes
    ``stratoscope regional`` exit 1)."""
    from stratoscope.regional.app import RunningRegional
    from stratoscope.regional.config import RegionalConfig

    config = RegionalConfig(insecure=True, listen="127.0.0.1:0", metrics_port=0, query_listen=None,
                            clickhouse=ClickHouseSettings(dsn=f"chdb://{tmp_path}/ch"),
                            resolution=5, lateness=1, wal_dir=tmp_path / "wal",
                            child_timeout=CHILD_TIMEOUT_S, stop_timeout=5)
    running = RunningRegional(config)
    await running.start()

    def hangs(process: str) -> float | None:
        return running.regional.registry.get_sample_value(
            "stratoscope_regional_child_hangs_total", {"process": process})

    try:
        assert (hangs("ingest"), hangs("sink-clickhouse")) == (0, 0)
        proc = running._ingest._proc
        assert proc is not None and proc.pid is not None
        os.kill(proc.pid, signal.SIGSTOP)
        await asyncio.wait_for(running.failed.wait(), CHILD_TIMEOUT_S + SLACK_S)
        assert (hangs("ingest"), hangs("sink-clickhouse")) == (1, 0)
        await until("it to be gone", lambda: _gone(proc.pid), 30)  # type: ignore[arg-type]
    finally:
        await running.stop()


def _replayed_reads(r: RegionalProcess) -> dict[str, int]:
    rows = r.query("""SELECT node, sum(value) FROM stratoscope.metrics
        WHERE metric = 'syscalls_total' AND labels['syscall'] = 'read' AND labels['comm'] = 'app'
        AND resolution = 60 GROUP BY node""")
    return {n: int(v) for n, v in rows}


def test_a_stopped_merge_process_is_killed_by_its_ingest_process_and_a_restart_replays_its_log(
        regionals: Callable[..., RegionalProcess]) -> None:
    """The merge process (the regional itself) is stopped while five edges send: its ingest
    process notices within the deadline, logs it, records it and kills it (a stopped process
    cannot exit 1 itself: SIGKILL is the exit a supervisor sees), then stops taking batches
    and exits, and so do the sink processes. Its windows are long, so what it acknowledged
    is only in its log: the restart replays it, shows the hang on /metrics, and ClickHouse
    holds exactly what the edges sent."""
    r = regionals("r", "--resolution", "60s", "--lateness", "60s",
                  "--child-timeout", f"{CHILD_TIMEOUT_S:g}s")
    r.start()
    fleet = SyntheticFleet("mergehang", 5, [f"127.0.0.1:{r.port}"])
    fwds = list(fleet.forwarders.values())
    fleet.start()
    wait_for("every edge acknowledged", lambda: all(f.stats.acked >= 3 for f in fwds), 60, 0.1)
    assert _hangs(r, "merge") == _hangs(r, "ingest") == 0
    assert r.proc is not None
    merge = r.proc.pid
    ingest = _child(r, "strato-ingest")
    os.kill(merge, signal.SIGSTOP)
    assert r.proc.wait(CHILD_TIMEOUT_S + SLACK_S) == -signal.SIGKILL, r.tail()
    log = r.tail(10**6)
    assert f"[ingest {ingest}] stratoscope.regional: the merge process (pid {merge}) has not answered" \
        in log, log
    # the ingest and sink processes see their parent gone and exit on their own
    wait_for("the regional's other processes to exit", lambda: not _group_alive(merge), 30, 0.1)
    r.start()  # what a supervisor does
    replayed = _metrics(r)
    assert replayed['stratoscope_regional_child_hangs_total{process="merge"}'] == 1, replayed
    assert replayed['stratoscope_regional_wal_replayed_batches_total{outcome="merged"}'] >= 5 * 3, \
        replayed
    stats = fleet.stop()
    assert r.stop() == 0, r.tail()
    assert stats["rejected"] == stats["dropped"] == 0, stats
    assert _replayed_reads(r) == dict(fleet.reads)


# -- a write-ahead log whose disk stops returning -------------------------------------------

@pytest.fixture
def freezable_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on an ext4 filesystem of its own (a file on a loop device) that a test
    may freeze with ``fsfreeze -f``: every write to it then blocks in the kernel until
    ``fsfreeze -u``, as on a frozen or hung disk. Thawed, unmounted and detached after."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a filesystem and must run as root (see README)")
    if not Path("/dev/loop-control").exists():
        pytest.fail("this test needs loop devices (a filesystem of its own to freeze)")
    missing = [t for t in ("mkfs.ext4", "losetup", "mount", "umount", "fsfreeze") if not shutil.which(t)]
    if missing:
        pytest.fail(f"this test needs {', '.join(missing)} (e2fsprogs, util-linux)")
    image, mnt = tmp_path / "fs.img", tmp_path / "fs"
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        mnt.mkdir()
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True)  # not frozen: an error
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], check=True)  # a test's process left open
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


#: A deadline for one write or fsync of the log (the default is 120 s).
FSYNC_TIMEOUT_S = 8.0


def test_a_stuck_log_stops_the_regional_and_edges_go_elsewhere_meanwhile(
        freezable_dir: Path, regionals: Callable[..., RegionalProcess]) -> None:
    """Regional A's log is on a filesystem that is frozen while five edges send to [A, B]:
    A's log write blocks in the kernel, so its acknowledgements stop (nothing answered
    RETRY: edges fail over to B within their ack deadline); /metrics shows the write in
    progress; at the deadline A logs it, closes its port and stops; it exits 1 once the
    kernel returns the call (after the thaw: a thread blocked in the kernel ends only
    then). Restarted on the same log, A answers what it held, and the two stores together
    hold exactly what was sent."""
    a = regionals("a", *WINDOWS, "--wal-dir", str(freezable_dir / "wal"),
                  "--wal-fsync-timeout", f"{FSYNC_TIMEOUT_S:g}s", "--child-timeout", "300s",
                  "--stop-timeout", "5s")
    b = regionals("b", *WINDOWS)
    a.start()
    b.start()
    fleet = SyntheticFleet("stuck", 5, [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"],
                           ack_timeout_s=ACK_TIMEOUT_S)
    fwds = list(fleet.forwarders.values())
    fleet.start()
    wait_for("A to acknowledge every edge", lambda: all(f.stats.acked >= 3 for f in fwds), 60, 0.1)
    assert _metrics(a)["stratoscope_regional_wal_fsync_in_progress_seconds"] < 1.0
    assert a.proc is not None
    a_pid = a.proc.pid
    subprocess.run(["fsfreeze", "-f", str(freezable_dir)], check=True)
    try:
        at_freeze = [f.stats.acked for f in fwds]
        wait_for("the stuck write on A's /metrics",
                 lambda: _metrics(a)["stratoscope_regional_wal_fsync_in_progress_seconds"] >= 2.0,
                 FSYNC_TIMEOUT_S, 0.2)
        wait_for("every edge to fail over to B",
                 lambda: all(f.errors["ack_timeout"] >= 1 and f.stats.acked > n
                             for f, n in zip(fwds, at_freeze, strict=True)),
                 ACK_TIMEOUT_S + SLACK_S, 0.1)
        wait_for("A to give its log up", lambda: "the write-ahead log is stuck" in a.tail(10**6),
                 FSYNC_TIMEOUT_S + SLACK_S, 0.2)
        wait_for("A's ingest port to close", lambda: not _listening(a.port), SLACK_S, 0.1)
        assert a.proc.poll() is None  # its ingest process cannot end while the kernel holds the call
        assert sum(f.counts()["in_doubt"] for f in fwds) >= 1  # held for A
        log = a.tail(10**6)
        assert "a write or fsync of the write-ahead log took" in log  # the warning came first
    finally:
        subprocess.run(["fsfreeze", "-u", str(freezable_dir)], check=True)
    assert a.proc.wait(120) == 1, a.tail()
    log = a.tail(10**6)
    assert re.search(rf"the write-ahead log failed \(a write or fsync of {re.escape(str(freezable_dir))}/wal "
                     rf"has not returned for \d+ s \(wal_fsync_timeout {FSYNC_TIMEOUT_S:g} s\): its disk "
                     r"is stuck\): stopping", log), log
    wait_for("A's other processes to exit", lambda: not _group_alive(a_pid), 60, 0.1)
    a.start()  # what a supervisor does
    wait_for("A to answer what it was holding",
             lambda: sum(f.counts()["in_doubt"] for f in fwds) == 0, 120, 0.2)
    stats = fleet.stop()
    assert a.stop() == 0, a.tail()
    assert b.stop() == 0, b.tail()
    assert stats["rejected"] == stats["dropped"] == stats["in_doubt_released"] == 0, stats
    assert stats["errors.ack_timeout"] >= 5, stats
    assert _sum_reads(a, b) == dict(fleet.reads)
