#!/usr/bin/env python3
"""Soak: random faults on real processes for ``--minutes``, then a ledger of every batch
and every count, from what the edges sent to what ClickHouse and Kafka hold.

Results and discussion: docs/BENCHMARKS.md, section "Soak". The promises it checks:
docs/GUARANTEES.md.

Why: each fault-injection test (tests/integration/test_regional_crash.py,
test_outages.py) checks one kind of fault for a minute or two. A soak runs the kinds
in random order, at random moments, overlapping (the regional killed while the broker
is down, a kill during the replay that followed the last one), for as long as it is
given, so what shows only at the thirtieth restart or in one unlucky interleaving has
a chance to show. The ledger is per node and per output window, so a window counted
twice and another one lost do not cancel out in a total.

What runs:

- a real ``stratoscope regional`` (tests/integration/regional_proc.py) with embedded
  ClickHouse and its write-ahead log, on loopback (``--insecure``), ``--resolution`` and
  ``--lateness`` as given, ``--stop-timeout`` = ``--term-stop-timeout``;
- with ``--kafka``, an Apache Kafka broker of its own (scripts/kafka.sh on a port below
  the ephemeral range, so nothing takes it while the broker is halted) and the Kafka sink;
- ``--nodes`` synthetic edges (tests/integration/synthetic_edges.py: one batch per node per
  second through the edge's real gRPC forwarder, acks, resends, in-memory spool). Each
  batch's read counter and histogram count are recorded per node and output window
  before the forwarder gets it: that is the truth the stores are checked against.

Faults, at exponential gaps (mean ``--fault-every``), each logged with its time; the kinds
come round in a random order, each about equally often:

- ``kill``: SIGKILL the regional's whole process group; restart it after 0-20 s. A third
  of the kills land at a uniform moment, a third while batches are sent and not answered,
  a third 0-2 s after a window closed (while it is stored);
- ``term``: SIGTERM, which stores what it can within the short stop timeout and leaves
  the rest in the log; restart it at once;
- ``kafka`` (with ``--kafka``): halt the broker (its data kept) for 10-60 s, then resume
  it. Other faults go on meanwhile. A regional started while the broker is down exits
  (it checks its sinks at start); the soak starts it again every 3 s, as a supervisor
  would, and counts the refused starts.

Not injected: killing an edge. The synthetic edges are threads of this process with
in-memory spools, so there is no edge process to SIGKILL and no spool on disk to restart
from; tests/integration/test_edge_spool.py does that with the real edge.

At the end: the broker resumed if it was halted; the fleet stopped once every batch is
answered; the regional stopped (SIGTERM), then started once more with ``--stop-timeout
600s`` and stopped, so whatever its log still held is stored; ClickHouse read from the
stopped store (the ``--resolution`` rows per node, the roll-up across nodes, the hourly
roll-ups), Kafka read whole and de-duplicated by block id as a consumer does.

The ledger: batches sent by the edges, answered (ACCEPTED, DUPLICATE, REJECTED), RETRY
answers, resends, never answered, dropped at the edge by reason; counter and histogram
totals sent against stored in ClickHouse and in Kafka, with **missing** (sent − stored)
and **duplicated** (stored − sent) summed over (node, window) where positive; Kafka
records against distinct block ids; faults by kind; regional starts; what each start
replayed from its log ("write-ahead log replayed: ..."); wall time. Nodes and windows
that differ are listed with the faults before them.

Exit code 0 only if nothing is missing or duplicated anywhere (what the edges dropped is
shown apart and must account exactly for what is missing, window by window), 1 if not,
2 if the soak could not run. The work directory (the regional's log, store and log
segments, the edges' log, the fault log) is kept when the result is not 0, or with
``--keep``.

From the repository root::

    .venv/bin/python loadtest/soak.py --minutes 10 --kafka
    .venv/bin/python loadtest/soak.py --minutes 5 --faults kill --fault-every 20s --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from stratoscope.edge.batch import batch_to_dict  # noqa: E402
from stratoscope.edge.forward import GrpcForwarder  # noqa: E402
from stratoscope.edge.spool import Spool  # noqa: E402
from stratoscope.settings import parse_duration  # noqa: E402
from stratoscope.v1 import batch_pb2 as pb  # noqa: E402
from tests.conftest import stable_port  # noqa: E402
from tests.integration.regional_proc import RegionalProcess  # noqa: E402
from tests.integration.synthetic_edges import SyntheticFleet  # noqa: E402

NS = 1_000_000_000
FAULTS = ("kill", "term", "kafka")
KAFKA_SH = ROOT / "scripts" / "kafka.sh"
#: The final life's stop timeout: long enough to store everything the log holds.
FINAL_STOP_TIMEOUT = "600s"
#: (node, window start in seconds) -> value; node "" is the roll-up across nodes.
Cells = dict[tuple[str, int], int]


# ============================================================================ the truth


class _DropKeys(Spool):
    """An in-memory spool that remembers which batches it dropped, so the points they
    held can be subtracted from what the stores should hold (window by window)."""

    def __init__(self) -> None:
        super().__init__(None)
        self.dropped_keys: list[tuple[tuple[str, int], str]] = []

    def _drop(self, key: Any, reason: str) -> None:  # Spool's one place that drops a batch
        self.dropped_keys.append((key, reason))
        super()._drop(key, reason)


class _Recording(GrpcForwarder):
    """The edge's forwarder, recording each batch's figures before it takes the batch."""

    def __init__(self, record: Callable[[pb.Batch], None], targets: list[str], spool: Spool) -> None:
        self._record = record
        super().__init__(list(targets), backoff_initial_s=0.2, backoff_max_s=2.0, spool=spool)

    def write(self, batch: pb.Batch) -> None:
        self._record(batch)
        super().write(batch)

    def in_flight(self) -> int:
        """Batches on a stream and not answered yet."""
        with self._cv:
            return len(self._inflight)


class SoakFleet(SyntheticFleet):
    """SyntheticFleet whose truth is kept per (node, output window) and per batch, and
    whose stop reports instead of asserting (a batch never answered is a ledger line)."""

    def __init__(self, name: str, nodes: int, targets: list[str], resolution_s: int, seed: int) -> None:
        super().__init__(name, 0, targets, seed=seed)  # forwarders of our own below
        self.res_ns = resolution_s * NS
        self.nodes = [f"{name}-{i:03d}" for i in range(nodes)]
        self.spools = {n: _DropKeys() for n in self.nodes}
        # the same backoff as SyntheticFleet's forwarders
        self.forwarders: dict[str, _Recording] = {  # type: ignore[assignment]
            n: _Recording(self.record, targets, self.spools[n]) for n in self.nodes}
        self.sent_reads: Counter[tuple[str, int]] = Counter()
        self.sent_hist: Counter[tuple[str, int]] = Counter()
        #: (node, boot_id, seq) -> (window start s, reads, histogram count)
        self.per_batch: dict[tuple[str, str, int], tuple[int, int, int]] = {}
        #: set when a round of batches (one per node) starts
        self.burst = threading.Event()

    def record(self, batch: pb.Batch) -> None:
        if batch.node_id == self.nodes[0]:
            self.burst.set()
        d = batch_to_dict(batch)
        window = (batch.end_ns - 1) // self.res_ns * self.res_ns // NS  # Aggregator.window_of
        reads = sum(int(s["value"]) for m in d["metrics"] if m["name"] == "syscalls_total"
                    for s in m["series"] if s["labels"].get("syscall") == "read")
        count = sum(int(s["count"]) for h in d["histograms"] if h["name"] == "syscall_latency"
                    for s in h["series"])
        key = (batch.node_id, window)
        self.sent_reads[key] += reads
        self.sent_hist[key] += count
        self.per_batch[(batch.node_id, batch.boot_id, batch.seq)] = (window, reads, count)

    def finish(self, ack_timeout_s: float) -> dict[str, dict[str, float]]:
        """Stop producing, wait until every batch is answered (up to ``ack_timeout_s`` in
        all); per node, the forwarder's counts plus "sends" (resends included) and
        "unanswered"."""
        self._stop.set()
        self._thread.join(30)
        deadline = time.monotonic() + ack_timeout_s
        out: dict[str, dict[str, float]] = {}
        for node in self.nodes:
            rec = self.forwarders[node]
            rec.close(max(1.0, deadline - time.monotonic()))
            counts = rec.counts()
            counts["unanswered"] = len(self.spools[node])
            counts["sends"] = rec.stats.sent
            out[node] = counts
        return out

    def dropped_cells(self) -> tuple[Counter[tuple[str, int]], Counter[tuple[str, int]], int]:
        """What the edges dropped, per (node, window): reads, histogram count; and the
        number of dropped batches this could not attribute (should be 0)."""
        reads: Counter[tuple[str, int]] = Counter()
        hist: Counter[tuple[str, int]] = Counter()
        unattributed = 0
        for node, spool in self.spools.items():
            unattributed += sum(spool.dropped.values()) - len(spool.dropped_keys)
            for (boot, seq), _ in spool.dropped_keys:
                window, r, c = self.per_batch[(node, boot, seq)]
                reads[(node, window)] += r
                hist[(node, window)] += c
        return reads, hist, unattributed


# ============================================================================ the faults


class Log:
    """Timestamped lines to stdout and to the work directory's faults.log, as they happen."""

    def __init__(self, path: Path, t0: float) -> None:
        self.path = path
        self.t0 = t0
        self.lock = threading.Lock()
        #: (seconds since start, wall time, line)
        self.lines: list[tuple[float, float, str]] = []

    def __call__(self, msg: str) -> None:
        now, wall = time.monotonic() - self.t0, time.time()
        stamp = time.strftime("%H:%M:%S", time.gmtime(wall)) + f".{int(wall * 1000) % 1000:03d}Z"
        line = f"{stamp} +{now:7.1f}s  {msg}"
        with self.lock:
            self.lines.append((now, wall, msg))
            print(line, flush=True)
            with open(self.path, "a") as f:
                f.write(line + "\n")


class Broker:
    """scripts/kafka.sh on a port of its own (and the controller's, port + 1)."""

    def __init__(self, workdir: Path) -> None:
        self.port = stable_port(span=2)
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "KAFKA_PORT": str(self.port), "KAFKA_DATA": str(workdir / "kafka")}
        self.down = threading.Event()

    def run(self, command: str) -> None:
        r = subprocess.run(["bash", str(KAFKA_SH), command], env=self.env, capture_output=True,
                           text=True, timeout=400)
        if r.returncode != 0:
            raise RuntimeError(f"scripts/kafka.sh {command} failed: {r.stderr[-2000:]}")


@dataclass
class Faults:
    """What was injected, and what the regional did about it."""

    injected: Counter[str] = field(default_factory=Counter)
    #: regional lives: how each one ended ("kill", "term", "final", "exited by itself", ...)
    ended_by: list[str] = field(default_factory=list)
    #: per start of the regional (1-based, refused ones included): why it was started
    start_why: dict[int, str] = field(default_factory=dict)
    refused_starts: int = 0
    unexpected_exits: int = 0
    unclean_term: list[str] = field(default_factory=list)
    kafka_down_s: float = 0.0
    term_stop_s: list[float] = field(default_factory=list)


class Soak:
    """The regional, the broker and the fault schedule (module docstring)."""

    def __init__(self, args: argparse.Namespace, workdir: Path, log: Log) -> None:
        self.args = args
        self.workdir = workdir
        self.log = log
        self.rng = random.Random(args.seed)
        self.faults = Faults()
        self.broker = Broker(workdir) if args.kafka else None
        self.prefix = f"soak-{uuid.uuid4().hex[:8]}"
        self.regional = RegionalProcess(
            workdir, "--resolution", args.resolution, "--lateness", args.lateness,
            "--stop-timeout", args.term_stop_timeout,
            "--clickhouse-dead-letter-dir", str(workdir / "dead-letter" / "clickhouse"),
            *(["--kafka-dead-letter-dir", str(workdir / "dead-letter" / "kafka")] if args.kafka else []),
            kafka=self.broker.bootstrap if self.broker else None, topic_prefix=self.prefix)
        self._outage: threading.Thread | None = None
        self.errors: list[str] = []

    # -- the regional ----------------------------------------------------------------
    def start_regional(self, why: str) -> None:
        """Start it, again every 3 s while it refuses (a broker that is down), as a
        supervisor would; up to 5 refusals while the broker is up."""
        refused_up = 0
        while True:
            t = time.monotonic()
            try:
                self.faults.start_why[self.regional.starts + 1] = why
                self.regional.start()
                self._wait_up()
            except BaseException as exc:  # wait_for's timeout is pytest's Failed, a BaseException
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                kafka_down = self.broker is not None and self.broker.down.is_set()
                self.faults.refused_starts += 1
                self.log(f"regional: start {self.regional.starts} ({why}) refused"
                         f"{' (the broker is down)' if kafka_down else ''}: {_last_line(self.regional.tail(600))}")
                self._reap()
                if not kafka_down:
                    refused_up += 1
                    if refused_up >= 5:
                        raise RuntimeError(f"the regional does not start: {self.regional.tail()}") from None
                time.sleep(3)
                continue
            assert self.regional.proc is not None
            self.log(f"regional: life {self.regional.starts} up ({why}), pid {self.regional.proc.pid}, "
                     f"up after {time.monotonic() - t:.1f} s")
            return

    def _wait_up(self) -> None:
        """Until this life logs "regional up": its ingest port accepts a little earlier
        than its SIGTERM handler is installed, and a SIGTERM in between kills it with the
        default action (exit -15) instead of stopping it within its stop timeout."""
        deadline = time.monotonic() + 120
        while "regional up:" not in self.life_log():
            proc = self.regional.proc
            assert proc is not None
            if proc.poll() is not None:
                raise RuntimeError(f"the regional exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("the regional listens but has not logged 'regional up' in 120 s")
            time.sleep(0.05)

    def life_log(self) -> str:
        """The current life's part of the regional's log."""
        return self.regional.log.read_text(errors="replace").rsplit("=== start", 1)[-1]

    def _reap(self) -> None:
        proc = self.regional.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)

    def check_alive(self) -> None:
        proc = self.regional.proc
        assert proc is not None
        if proc.poll() is not None:
            self.faults.unexpected_exits += 1
            self.faults.ended_by.append(f"exited by itself ({proc.returncode})")
            self.log(f"regional: life {self.regional.starts} EXITED BY ITSELF with {proc.returncode}: "
                     f"{_last_line(self.regional.tail(2000))}")
            self.start_regional("after it exited")

    def kill(self, fleet: SoakFleet) -> None:
        down = self.rng.uniform(0, 20)
        # A third of the kills land at a uniform moment; a third while batches are on the
        # wire and not answered (being logged, acknowledged, merged: the answer is lost
        # and the edge resends); a third 0-2 s after a window closed, while its frames
        # are reduced and stored. At a uniform moment most kills find neither: a round
        # of sends takes a few ms of every second, and storing a window a fraction of
        # its length.
        when = ""
        how = self.rng.choice(("uniform", "in flight", "storing"))
        if how == "in flight":
            fleet.burst.clear()
            fleet.burst.wait(5)
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                flying = sum(f.in_flight() for f in fleet.forwarders.values())
                if flying:
                    when = f", {flying} batches sent and not answered"
                    break
                time.sleep(0.0005)
        elif how == "storing":
            res, late = parse_duration(self.args.resolution), parse_duration(self.args.lateness)
            now = time.time()
            closes = (now // res + 1) * res + late  # the next window's close
            if closes - res > now:
                closes -= res
            delay = self.rng.uniform(0, 2)
            time.sleep(max(0.0, closes + delay - time.time()))
            start = time.strftime("%H:%M:%S", time.gmtime(closes - late - res))
            when = f", {delay:.2f} s after window {start}Z closed"
        assert self.regional.proc is not None
        self.log(f"fault kill: SIGKILL the regional's process group (life {self.regional.starts}, "
                 f"pid {self.regional.proc.pid}{when}); restart after {down:.1f} s")
        self.regional.kill()
        self.faults.injected["kill"] += 1
        self.faults.ended_by.append("kill")
        time.sleep(down)
        self.start_regional("after kill")

    def term(self) -> None:
        assert self.regional.proc is not None
        self.log(f"fault term: SIGTERM the regional (life {self.regional.starts}, pid "
                 f"{self.regional.proc.pid}, --stop-timeout {self.args.term_stop_timeout})")
        t = time.monotonic()
        code = self.regional.stop()
        took = time.monotonic() - t
        left = "not everything was stored" in self.life_log()
        self.faults.injected["term"] += 1
        self.faults.ended_by.append("term")
        self.faults.term_stop_s.append(took)
        self.log(f"regional: life {self.regional.starts} exited {code} after {took:.1f} s"
                 f"{', leaving the rest in its log' if left else ', everything stored'}")
        if code != 0:
            self.faults.unclean_term.append(f"life {self.regional.starts}: exit {code}")
        self.start_regional("after term")

    # -- the broker ------------------------------------------------------------------
    def kafka_outage(self) -> None:
        assert self.broker is not None
        broker = self.broker
        length = self.rng.uniform(10, 60)
        self.faults.injected["kafka"] += 1

        def outage() -> None:
            try:
                self.log(f"fault kafka: halt the broker for {length:.0f} s")
                broker.down.set()
                t = time.monotonic()
                broker.run("halt")
                time.sleep(max(0.0, length - (time.monotonic() - t)))
                self.log("kafka: resuming the broker")
                broker.run("resume")
                broker.down.clear()
                self.faults.kafka_down_s += time.monotonic() - t
                self.log(f"kafka: broker serving again after {time.monotonic() - t:.1f} s")
            except Exception as exc:  # reported; the soak ends with exit code 2
                self.errors.append(f"kafka outage: {exc}")
                self.log(f"kafka: FAILED: {exc}")

        self._outage = threading.Thread(target=outage, name="kafka-outage", daemon=True)
        self._outage.start()

    def outage_running(self) -> bool:
        return self._outage is not None and self._outage.is_alive()

    def end_outage(self) -> None:
        if self._outage is not None:
            self._outage.join(400)

    # -- the schedule ----------------------------------------------------------------
    def run_faults(self, until: float, fleet: SoakFleet) -> None:
        """Faults at exponential gaps until the monotonic time ``until`` (the last one
        ends before the soak does: a restart is never left undone)."""
        mean = parse_duration(self.args.fault_every)
        kinds = list(self.args.faults)
        bag: list[str] = []
        next_at = time.monotonic() + self.rng.expovariate(1 / mean)
        while True:
            now = time.monotonic()
            if now >= until:
                return
            if now < next_at:
                time.sleep(min(1.0, next_at - now, until - now))
                self.check_alive()
                if self.errors:
                    raise RuntimeError("; ".join(self.errors))
                continue
            # Kinds come from a bag refilled with every kind in a random order, so each
            # kind is injected about equally often (a draw with replacement left a
            # 10-minute soak without a single broker outage).
            if not bag:
                bag = self.rng.sample(kinds, len(kinds))
            kind = bag.pop()
            if kind == "kafka" and self.outage_running():
                others = [k for k in bag if k != "kafka"]
                bag.insert(0, kind)  # its turn comes again later
                kind = others[-1] if others else "none"
                if others:
                    bag.remove(kind)
            self.check_alive()
            if kind == "kill":
                self.kill(fleet)
            elif kind == "term":
                self.term()
            elif kind == "kafka":
                self.kafka_outage()
            next_at = time.monotonic() + self.rng.expovariate(1 / mean)

    def final_stop(self) -> None:
        """SIGTERM; then one more life with a long stop timeout to store what the log
        still holds, and SIGTERM again."""
        self.check_alive()
        code = self.regional.stop()
        self.faults.ended_by.append("end of the soak")
        left = "not everything was stored" in self.life_log()
        self.log(f"regional: life {self.regional.starts} stopped (exit {code})"
                 f"{', leaving the rest in its log' if left else ', everything stored'}")
        if code != 0:
            self.errors.append(f"the last life of the soak exited {code}")
        argv = self.regional.argv
        argv[argv.index("--stop-timeout") + 1] = FINAL_STOP_TIMEOUT
        self.start_regional(f"final, --stop-timeout {FINAL_STOP_TIMEOUT}")
        t = time.monotonic()
        code = self.regional.stop(timeout_s=parse_duration(FINAL_STOP_TIMEOUT) + 120)
        self.faults.ended_by.append("final")
        left = "not everything was stored" in self.life_log()
        self.log(f"regional: final life {self.regional.starts} stopped (exit {code}) after "
                 f"{time.monotonic() - t:.1f} s{', NOT everything stored' if left else ''}")
        if code != 0 or left:
            self.errors.append(f"the final life exited {code}{', not everything stored' if left else ''}")

    def cleanup(self) -> None:
        """Whatever is still running of ours: the regional's group, the broker (halted:
        its topics stay in the work directory, removed with it)."""
        with contextlib.suppress(Exception):
            self._reap()
            proc = self.regional.proc
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        if self.broker is not None:
            self.end_outage()
            with contextlib.suppress(Exception):
                self.broker.run("halt")  # its data stays in the work directory


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("===")]
    return lines[-1][-300:] if lines else "(no output)"


# ============================================================================ the stores


def read_clickhouse(regional: RegionalProcess, res: int) -> dict[str, Any]:
    """From the stopped regional's store: per (node, window) the read counter and the
    histogram count at the soak's resolution (node "" = the roll-up), and per node the
    hourly roll-ups' totals."""
    out: dict[str, Any] = {}
    rows = regional.query(f"""SELECT node, toUnixTimestamp(ts), sum(value), count() FROM stratoscope.metrics
        WHERE metric = 'syscalls_total' AND labels['syscall'] = 'read'
          AND (node = '' OR labels['comm'] = 'app') AND resolution = {res} GROUP BY node, ts""")
    out["reads"] = {(n, int(t)): int(v) for n, t, v, _ in rows}
    out["read_rows"] = sum(int(c) for *_, c in rows)
    rows = regional.query(f"""SELECT node, toUnixTimestamp(ts), sum(count) FROM stratoscope.histograms
        WHERE metric = 'syscall_latency' AND resolution = {res} GROUP BY node, ts""")
    out["hist"] = {(n, int(t)): int(v) for n, t, v in rows}
    rows = regional.query("""SELECT node, sum(value) FROM stratoscope.metrics_1h
        WHERE metric = 'syscalls_total' AND labels['syscall'] = 'read' AND (node = '' OR labels['comm'] = 'app')
        GROUP BY node""")
    out["reads_1h"] = {n: int(v) for n, v in rows}
    rows = regional.query("""SELECT node, sum(count) FROM stratoscope.histograms_1h
        WHERE metric = 'syscall_latency' GROUP BY node""")
    out["hist_1h"] = {n: int(v) for n, v in rows}
    return out


async def _consume(bootstrap: str, topic: str) -> list[tuple[str, pb.Batch]]:
    """Every record of ``topic`` (one partition), in order, with its block id."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from stratoscope.regional.sinks.kafka import decode_message

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        records: list[tuple[str, pb.Batch]] = []
        while await consumer.position(tp) < end:
            for batch in (await consumer.getmany(timeout_ms=2000)).values():
                records.extend(decode_message(r.value, r.headers) for r in batch)
        return records
    finally:
        await consumer.stop()


def read_kafka(bootstrap: str, prefix: str, res: int) -> dict[str, Any]:
    """The metrics topic as a consumer sees it after de-duplicating by block id: per
    (node, window) the read counter and histogram count (node "" = the roll-up); how
    many records were redeliveries of a block, and how many of those differed from the
    first delivery (a consumer would keep the wrong one: must be 0)."""
    records = asyncio.run(_consume(bootstrap, f"{prefix}.metrics"))
    first: dict[str, tuple[str, int, int, int]] = {}
    conflicting = 0
    reads: Counter[tuple[str, int]] = Counter()
    hist: Counter[tuple[str, int]] = Counter()
    for block_id, batch in records:
        d = batch_to_dict(batch)
        window = (batch.end_ns - 1) // (res * NS) * res
        r = sum(int(s["value"]) for m in d["metrics"] if m["name"] == "syscalls_total"
                for s in m["series"] if s["labels"].get("syscall") == "read"
                and (not batch.node_id or s["labels"].get("comm") == "app"))
        c = sum(int(s["count"]) for h in d["histograms"] if h["name"] == "syscall_latency"
                for s in h["series"])
        figures = (batch.node_id, window, r, c)
        if block_id in first:
            conflicting += first[block_id] != figures
            continue
        first[block_id] = figures
        reads[(batch.node_id, window)] += r
        hist[(batch.node_id, window)] += c
    return {"reads": dict(reads), "hist": dict(hist), "records": len(records), "blocks": len(first),
            "conflicting": conflicting}


# ============================================================================ the ledger


_REPLAYED = re.compile(r"write-ahead log replayed: (\d+) batches \((\d+) into (\d+) instances sealed "
                       r"before, (\d+) already stored\) in ([\d.]+)s")


def _logger(line: str) -> str:
    """The logger of a regional log line ("... ERROR [sink 123] aiokafka.cluster: ...")."""
    head = line.split(": ", 1)[0].split()
    return head[-1] if head else ""


def regional_lives(log_text: str) -> list[dict[str, Any]]:
    """Per start of the regional: its replay line's figures, whether its stop left
    anything in the log, and its ERROR lines."""
    lives = []
    for chunk in log_text.split("=== start ")[1:]:
        n = int(chunk.split(" ", 1)[0])
        m = _REPLAYED.search(chunk)
        lives.append({
            "life": n,
            "replayed": [int(m.group(i)) for i in range(1, 5)] + [float(m.group(5))] if m else None,
            "left_in_log": "not everything was stored" in chunk,
            "errors": [ln for ln in chunk.splitlines() if " ERROR " in ln],
        })
    return lives


def compare(sent: Cells, stored: Cells, dropped: Cells) -> dict[str, Any]:
    """Missing (sent − stored) and duplicated (stored − sent) summed over cells where
    positive; cells whose missing part is not exactly what the edges dropped."""
    missing = duplicated = 0
    bad: list[tuple[str, int, int, int, int]] = []
    for key in sorted(set(sent) | set(stored)):
        s, got, d = sent.get(key, 0), stored.get(key, 0), dropped.get(key, 0)
        missing += max(0, s - got)
        duplicated += max(0, got - s)
        if got != s - d:
            bad.append((key[0], key[1], s, got, d))
    return {"sent": sum(sent.values()), "stored": sum(stored.values()), "missing": missing,
            "duplicated": duplicated, "dropped": sum(dropped.values()), "cells": len(sent), "bad": bad}


def rollup(cells: Cells | Counter[tuple[str, int]]) -> Cells:
    """Per window, the sum over nodes: what the roll-up across nodes must hold."""
    out: Counter[tuple[str, int]] = Counter()
    for (_, w), v in cells.items():
        out[("", w)] += v
    return dict(out)


def only(cells: Cells, roll: bool) -> Cells:
    """The node cells (``roll`` False) or the roll-up's."""
    return {k: v for k, v in cells.items() if (k[0] == "") == roll}


def per_node_total(cells: Cells | Counter[tuple[str, int]]) -> Cells:
    """Per node, the sum over windows (window 0)."""
    out: Counter[tuple[str, int]] = Counter()
    for (n, _), v in cells.items():
        out[(n, 0)] += v
    return dict(out)


def total(cells: Cells | Counter[tuple[str, int]]) -> Cells:
    """The sum over nodes and windows, as the roll-up's one cell."""
    return {("", 0): sum(cells.values())}


def keyed(per_node: dict[str, int], roll: bool) -> Cells:
    """Per-node totals (the hourly tables' sums) as cells; the nodes or the roll-up."""
    return {(n, 0): v for n, v in per_node.items() if (n == "") == roll}


def fmt_s(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m {s:02d}s" if m else f"{s}s"


def print_ledger(L: dict[str, Any], log: Log) -> None:
    a = L["args"]
    p = print
    p("")
    p("=" * 100)
    p(f"Soak ledger: {a['minutes']:g} min of faults, {a['nodes']} nodes x 1 batch/s, faults "
      f"{','.join(a['faults'])} every {a['fault_every']} on average, seed {a['seed']}, resolution "
      f"{a['resolution']}, lateness {a['lateness']}, Kafka {'yes' if a['kafka'] else 'no'}")
    w = L["wall_s"]
    p(f"wall time {fmt_s(w['total'])} (faults {fmt_s(w['faults'])}, edges' last answers "
      f"{fmt_s(w['acks'])}, final stop {fmt_s(w['final'])}, reading the stores {fmt_s(w['read'])})")
    p("=" * 100)
    f = L["faults"]
    p(f"{'faults injected':<28}" + "  ".join(f"{k} {f['injected'].get(k, 0)}" for k in a["faults"])
      + (f"  (broker down {f['kafka_down_s']:.0f} s in all)" if "kafka" in a["faults"] else ""))
    ends = Counter(f["ended_by"])
    p(f"{'regional starts':<28}{L['starts']} (lives ended by: "
      + ", ".join(f"{k} {v}" for k, v in ends.items()) + f"); starts refused {f['refused_starts']}; "
      f"exits on its own {f['unexpected_exits']}")
    if f["term_stop_s"]:
        p(f"{'SIGTERM to exit':<28}{min(f['term_stop_s']):.1f}-{max(f['term_stop_s']):.1f} s; "
          f"unclean: {', '.join(f['unclean_term']) or 'none'}")
    rp = L["replay"]
    p(f"{'write-ahead log replays':<28}{rp['starts_with_replay']} starts read back {rp['batches']:,} batches: "
      f"{rp['restored']:,} into {rp['instances']:,} instances sealed before, {rp['skipped']:,} already "
      f"stored; longest {rp['longest_s']:.1f} s; stops that left batches in the log {rp['left_in_log']}")
    for life, r in rp["per_start"].items():
        if r:
            p(f"{'':<28}start {life:>2} ({f['start_why'].get(life, '?')}): {r[0]:,} read back, {r[1]:,} "
              f"into {r[2]} sealed instances, {r[3]:,} already stored, {r[4]:.1f} s")
    e = L["edges"]
    p(f"{'edge batches':<28}sent {e['batches']:,} ({e['points']:,} points); answered ACCEPTED "
      f"{e['acked']:,}, DUPLICATE {e['duplicates']:,}, REJECTED {e['rejected']:,}; never answered "
      f"{e['unanswered']:,}")
    p(f"{'':<28}RETRY answers {e['retries']:,}; sends with resends {e['sends']:,}; reconnects "
      f"{e['reconnects']:,}; in doubt released {e['in_doubt_released']:,}")
    p(f"{'dropped at the edge':<28}" + ", ".join(f"{k} {v}" for k, v in e["dropped"].items())
      + (f"; not attributed {e['unattributed']}" if e["unattributed"] else ""))
    p(f"{'dead letters':<28}" + ", ".join(f"{k} {v}" for k, v in L["dead_letters"].items()))
    if L.get("kafka_records"):
        k = L["kafka_records"]
        p(f"{'Kafka metrics records':<28}{k['records']:,}, distinct block ids {k['blocks']:,}, "
          f"redelivered {k['records'] - k['blocks']:,} (differing from the first delivery: {k['conflicting']})")
    p("")
    hdr = (f"{'measure':<40}{'sent':>13}{'stored':>13}{'missing':>9}{'duplic.':>9}{'dropped':>9}"
           f"{'cells':>7}{'wrong':>7}")
    p(hdr)
    p("-" * len(hdr))
    for name, c in L["measures"].items():
        p(f"{name:<40}{c['sent']:>13,}{c['stored']:>13,}{c['missing']:>9,}{c['duplicated']:>9,}"
          f"{c['dropped']:>9,}{c['cells']:>7,}{len(c['bad']):>7,}")
    p("(cells: node x window compared, or nodes for the hourly roll-ups; wrong: cells whose "
      "stored value is not sent − dropped)")
    if L["nodes_differ"]:
        p("")
        p("nodes that differ:")
        hdr = f"{'node':<12}{'batches':>8}{'acked':>7}{'dup':>5}{'unans.':>7}{'dropped':>8}" \
              f"{'reads sent':>13}{'ClickHouse':>13}{'Kafka':>13}"
        p(hdr)
        for n in L["nodes_differ"]:
            p(f"{n['node']:<12}{n['batches']:>8}{n['acked']:>7}{n['duplicates']:>5}{n['unanswered']:>7}"
              f"{n['dropped']:>8}{n['sent']:>13,}{n['clickhouse']:>13,}{n['kafka'] if n['kafka'] is not None else '-':>13}")
    bad = [(name, cell) for name, c in L["measures"].items() for cell in c["bad"]]
    if bad:
        p("")
        p(f"cells that are wrong ({len(bad)}, first 30):")
        windows = set()
        for name, (node, window, s, got, d) in bad[:30]:
            windows.add(window)
            p(f"  {name:<38} node {node or '(roll-up)':<10} window {time.strftime('%H:%M:%S', time.gmtime(window))}Z "
              f"sent {s:,} stored {got:,} dropped {d:,}")
        for window in sorted(windows):
            p(f"faults from window {time.strftime('%H:%M:%S', time.gmtime(window))}Z's start to 60 s after it closed:")
            for _, wall, ln in log.lines:
                if window <= wall <= window + L["res"] + L["lateness"] + 60 and ln.startswith("fault"):
                    p(f"  {time.strftime('%H:%M:%S', time.gmtime(wall))}Z {ln}")
    if L["library_errors"]:
        p("")
        p("ERROR lines of the regional's libraries (by logger): "
          + ", ".join(f"{k} {v}" for k, v in L["library_errors"].items()))
    if L["regional_errors"]:
        p(f"regional ERROR lines ({len(L['regional_errors'])}, first 10):")
        for ln in L["regional_errors"][:10]:
            p("  " + ln[:200])
    p("")
    p("RESULT: " + L["verdict"])


# ============================================================================ main


def _interrupted(signum: int, frame: Any) -> None:
    """SIGTERM ends the soak as Ctrl-C does: what it started is stopped."""
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10, help="how long faults are injected (default 10)")
    ap.add_argument("--nodes", type=int, default=20, help="synthetic edges, one batch per second each (default 20)")
    ap.add_argument("--faults", default=None,
                    help="comma list of kill, term, kafka (default: all; kafka only with --kafka)")
    ap.add_argument("--fault-every", default="45s", help="mean gap between faults, exponential (default 45s)")
    ap.add_argument("--seed", type=int, default=None, help="makes the fault schedule and the values reproducible")
    ap.add_argument("--kafka", action="store_true", help="a broker of its own, and the Kafka sink")
    ap.add_argument("--resolution", default="5s", help="the regional's --resolution (default 5s)")
    ap.add_argument("--lateness", default="1s", help="the regional's --lateness (default 1s)")
    ap.add_argument("--term-stop-timeout", default="5s",
                    help="the regional's --stop-timeout during the soak, what SIGTERM gets (default 5s)")
    ap.add_argument("--ack-timeout", default="300s", help="how long the edges' last batches may wait for answers")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new directory under /var/tmp")
    ap.add_argument("--keep", action="store_true", help="keep the work directory even if the result is 0")
    ap.add_argument("--json", type=Path, default=None, help="also write the ledger here")
    args = ap.parse_args(argv)
    faults = args.faults.split(",") if args.faults else [f for f in FAULTS if f != "kafka" or args.kafka]
    for f in faults:
        if f not in FAULTS:
            ap.error(f"--faults: unknown fault {f!r} (kill, term, kafka; an edge kill is not offered, "
                     "see the module docstring)")
        if f == "kafka" and not args.kafka:
            ap.error("--faults kafka needs --kafka")
    args.faults = faults
    if args.seed is None:
        args.seed = random.randrange(1 << 31)
    for name in ("fault_every", "resolution", "lateness", "term_stop_timeout", "ack_timeout"):
        try:
            parse_duration(getattr(args, name))
        except ValueError as exc:
            ap.error(f"--{name.replace('_', '-')}: {exc}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = int(parse_duration(args.resolution))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="stratoscope-soak-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(workdir / "edges.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    t_start = time.monotonic()
    log = Log(workdir / "faults.log", t_start)
    print(f"soak: work directory {workdir}; seed {args.seed}; faults {','.join(args.faults)}", flush=True)
    soak = Soak(args, workdir, log)
    fleet: SoakFleet | None = None
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        if soak.broker is not None:
            log(f"kafka: starting a broker of its own at {soak.broker.bootstrap}")
            soak.broker.run("start")
        soak.start_regional("first")
        fleet = SoakFleet("soak", args.nodes, [f"127.0.0.1:{soak.regional.port}"], res, args.seed)
        fleet.start()
        t0 = time.monotonic()
        log(f"edges: {args.nodes} synthetic nodes sending")
        soak.run_faults(t0 + args.minutes * 60, fleet)
        t_faults = time.monotonic()
        if soak.outage_running():
            log("waiting for the broker's outage to end")
            soak.end_outage()
        if soak.errors:
            raise RuntimeError("; ".join(soak.errors))
        soak.check_alive()
        log("edges: stopping; waiting until every batch is answered")
        per_node = fleet.finish(parse_duration(args.ack_timeout))
        t_acks = time.monotonic()
        log(f"edges: stopped, {sum(c['unanswered'] for c in per_node.values())} batches never answered")
        soak.final_stop()
        t_final = time.monotonic()
        log("reading ClickHouse" + (" and Kafka" if soak.broker else ""))
        ch = read_clickhouse(soak.regional, res)
        kf = read_kafka(soak.broker.bootstrap, soak.prefix, res) if soak.broker else None
        t_read = time.monotonic()
    except KeyboardInterrupt:
        print(f"soak: interrupted; work directory {workdir}", file=sys.stderr)
        soak.cleanup()
        return 2
    except BaseException as exc:  # pytest's Failed (a wait_for timeout) included
        if isinstance(exc, SystemExit):
            raise
        print(f"soak: could not run: {type(exc).__name__}: {exc}\nwork directory {workdir}", file=sys.stderr)
        soak.cleanup()
        if fleet is not None:
            fleet._stop.set()
        return 2
    soak.cleanup()

    # -- the ledger ------------------------------------------------------------------
    assert fleet is not None
    drop_reads, drop_hist, unattributed = fleet.dropped_cells()
    sent_reads, sent_hist = dict(fleet.sent_reads), dict(fleet.sent_hist)
    measures = {
        "read counter, per node (ClickHouse)": compare(sent_reads, only(ch["reads"], False), drop_reads),
        "histogram count, per node (CH)": compare(sent_hist, only(ch["hist"], False), drop_hist),
        "read counter, roll-up (CH)": compare(rollup(sent_reads), only(ch["reads"], True), rollup(drop_reads)),
        "histogram count, roll-up (CH)": compare(rollup(sent_hist), only(ch["hist"], True), rollup(drop_hist)),
        "read counter, hourly per node (CH)": compare(per_node_total(sent_reads), keyed(ch["reads_1h"], False),
                                                      per_node_total(drop_reads)),
        "histogram count, hourly per node (CH)": compare(per_node_total(sent_hist), keyed(ch["hist_1h"], False),
                                                         per_node_total(drop_hist)),
        "read counter, hourly roll-up (CH)": compare(total(sent_reads), keyed(ch["reads_1h"], True),
                                                     total(drop_reads)),
        "histogram count, hourly roll-up (CH)": compare(total(sent_hist), keyed(ch["hist_1h"], True),
                                                        total(drop_hist)),
    }
    if kf is not None:
        measures.update({
            "read counter, per node (Kafka)": compare(sent_reads, only(kf["reads"], False), drop_reads),
            "histogram count, per node (Kafka)": compare(sent_hist, only(kf["hist"], False), drop_hist),
            "read counter, roll-up (Kafka)": compare(rollup(sent_reads), only(kf["reads"], True), rollup(drop_reads)),
            "histogram count, roll-up (Kafka)": compare(rollup(sent_hist), only(kf["hist"], True), rollup(drop_hist)),
        })
    totals: Counter[str] = Counter()
    for c in per_node.values():
        totals.update(c)
    lives = regional_lives(soak.regional.log.read_text(errors="replace"))
    replays = [lv["replayed"] for lv in lives if lv["replayed"]]
    ch_node = per_node_total(only(ch["reads"], False))
    kf_node = per_node_total(only(kf["reads"], False)) if kf else {}
    sent_node = per_node_total(sent_reads)
    nodes_differ = []
    for n in fleet.nodes:
        c = per_node[n]
        dropped = int(sum(v for k, v in c.items() if k.startswith("dropped.")))
        if (ch_node.get((n, 0), 0) != sent_node.get((n, 0), 0)
                or (kf is not None and kf_node.get((n, 0), 0) != sent_node.get((n, 0), 0))
                or c["unanswered"] or c["rejected"] or dropped):
            nodes_differ.append({"node": n, "batches": fleet.batches[n], "acked": int(c["acked"]),
                                 "duplicates": int(c["duplicates"]), "unanswered": int(c["unanswered"]),
                                 "dropped": dropped, "sent": sent_node.get((n, 0), 0),
                                 "clickhouse": ch_node.get((n, 0), 0),
                                 "kafka": kf_node.get((n, 0), 0) if kf is not None else None})
    dead = {s: sum(1 for p in (workdir / "dead-letter" / s).rglob("*") if p.is_file())
            if (workdir / "dead-letter" / s).exists() else 0 for s in ("clickhouse", "kafka")}
    problems = [f"{name}: {len(c['bad'])} cells wrong ({c['missing']:,} missing, {c['duplicated']:,} "
                f"duplicated, {c['dropped']:,} dropped at the edge)"
                for name, c in measures.items() if c["bad"]]
    if totals["unanswered"]:
        problems.append(f"{int(totals['unanswered'])} batches never answered")
    if unattributed:
        problems.append(f"{unattributed} dropped batches not attributed")
    if kf is not None and kf["conflicting"]:
        problems.append(f"{kf['conflicting']} Kafka redeliveries differ from the first delivery")
    problems += soak.errors
    verdict = ("exact: nothing missing, nothing duplicated, in every node and window"
               + (" (edge drops account for what is missing)" if sum(drop_reads.values()) else "")
               if not problems else "FAILED: " + "; ".join(problems))
    ledger: dict[str, Any] = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "res": res,
        "lateness": parse_duration(args.lateness),
        "wall_s": {"total": t_read - t_start, "faults": t_faults - t0, "acks": t_acks - t_faults,
                   "final": t_final - t_acks, "read": t_read - t_final},
        "faults": {"injected": dict(soak.faults.injected), "ended_by": soak.faults.ended_by,
                   "start_why": soak.faults.start_why,
                   "refused_starts": soak.faults.refused_starts,
                   "unexpected_exits": soak.faults.unexpected_exits, "unclean_term": soak.faults.unclean_term,
                   "kafka_down_s": soak.faults.kafka_down_s, "term_stop_s": soak.faults.term_stop_s},
        "starts": soak.regional.starts,
        "replay": {"starts_with_replay": len(replays), "batches": sum(r[0] for r in replays),
                   "restored": sum(r[1] for r in replays), "instances": sum(r[2] for r in replays),
                   "skipped": sum(r[3] for r in replays), "longest_s": max((r[4] for r in replays), default=0.0),
                   "left_in_log": sum(lv["left_in_log"] for lv in lives),
                   "per_start": {lv["life"]: lv["replayed"] for lv in lives}},
        "edges": {"batches": sum(fleet.batches.values()), "points": 2 * sum(fleet.batches.values()),
                  "acked": int(totals["acked"]), "duplicates": int(totals["duplicates"]),
                  "rejected": int(totals["rejected"]), "unanswered": int(totals["unanswered"]),
                  "retries": int(totals["retries"]), "sends": int(totals["sends"]),
                  "reconnects": int(totals["reconnects"]), "in_doubt_released": int(totals["in_doubt_released"]),
                  "dropped": {k.split(".", 1)[1]: int(v) for k, v in totals.items() if k.startswith("dropped.")},
                  "unattributed": unattributed},
        "dead_letters": dead,
        "kafka_records": {k: kf[k] for k in ("records", "blocks", "conflicting")} if kf else None,
        "clickhouse_read_rows": ch["read_rows"],
        "measures": measures,
        "nodes_differ": nodes_differ,
        "regional_errors": [ln for lv in lives for ln in lv["errors"] if _logger(ln).startswith("stratoscope")],
        "library_errors": dict(Counter(_logger(ln) for lv in lives for ln in lv["errors"]
                                       if not _logger(ln).startswith("stratoscope"))),
        "faults_log": [ln for _, _, ln in log.lines],
        "verdict": verdict,
        "workdir": str(workdir),
    }
    print_ledger(ledger, log)
    if args.json:
        args.json.write_text(json.dumps(ledger, indent=1, default=str))
    code = 0 if not problems else 1
    if code == 0 and not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"work directory kept: {workdir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
