"""A hostile client with a valid certificate hammers a real regional's port for 60 s while
a good node sends a known workload: the regional stays up, its memory stays under a
bound the whole time, and the good node's totals in ClickHouse are exact.

The hostile client (node "evil", its own certificate) sends, on several streams at once:
random bytes, batches with broken fields (out-of-range string indices, huge counts, deep
stacks, NaN gauges, wrapping sums, events centuries away, oversized identities and
string tables), batches claiming the good node's identity, and valid batches as fast as
it can (past its rate limit)."""

from __future__ import annotations

import math
import os
import random
import struct
import threading
import time
from pathlib import Path

import grpc

from stratoscope.edge.batch import BatchBuilder
from stratoscope.edge.decode import Histogram
from stratoscope.edge.forward import ClientTls
from stratoscope.pki import issue_certificates
from stratoscope.v1 import batch_pb2 as pb
from stratoscope.v1 import ingest_pb2
from tests.integration.regional_proc import RegionalProcess
from tests.integration.synthetic_edges import SyntheticFleet

NS = 1_000_000_000
HAMMER_S = 60
#: The regional's whole process group (merge, ingest, sinks, frame child), sum of RSS.
RSS_BOUND = 2 * 1024**3


def _group_rss(pgid: int) -> int:
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


def _valid(node: str, seq: int, boot: str = "evil-boot") -> pb.Batch:
    end = time.time_ns() // NS * NS
    b = BatchBuilder(node, boot, seq, end - NS, end, {})
    b.add_counters("syscalls_total", "calls", "", ["syscall", "comm"], {("read", "app"): 1})
    return b.build()


def _hostile(rng: random.Random, seq: int) -> bytes:
    """One hostile message (wire bytes)."""
    kind = rng.randrange(12)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 4096))
    b = _valid("evil", seq)
    if kind == 1:  # claims the good node
        b.node_id = "good-000"
    elif kind == 2:
        b.node_id = "x" * 100_000
    elif kind == 3:
        b.boot_id = "b" * 8_000_000
    elif kind == 4:
        b.strings.extend(f"s{i}" for i in range(300_000))
    elif kind == 5 and b.metrics:
        b.metrics[0].name = 1 << 30
    elif kind == 6:  # a NaN gauge
        m = b.metrics.add()
        m.name, m.kind = b.metrics[0].name, pb.GAUGE
        m.gauge_values.append(math.nan)
    elif kind == 7:  # counters whose sum wraps uint64
        b.metrics[0].counter_values_le = struct.pack("<Q", 2**64 - 1)
        b.metrics.add().CopyFrom(b.metrics[0])
    elif kind == 8:
        b.start_ns, b.end_ns = 1, 2**63 - 1
    elif kind == 9:
        b.seq = 0
    elif kind == 10:
        h = BatchBuilder("evil", "evil-boot", seq, b.start_ns, b.end_ns, {})
        h.add_histograms("lat", "ns", "", ["k"], {("v",): Histogram({i: 1 for i in range(10_000)},
                                                                      count=10_000, sum=1)})
        b = h.build()
    # kind 11: a valid batch (a flood of them goes past the rate limit)
    return b.SerializeToString()


def _hammer(port: int, creds: grpc.ChannelCredentials, stop: threading.Event, seed: int,
            counts: dict[str, int]) -> None:
    rng = random.Random(seed)
    seq = seed * 10_000_000
    while not stop.is_set():
        with grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                 options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            call = channel.stream_stream("/stratoscope.v1.Ingest/Stream", request_serializer=lambda b: b,
                                         response_deserializer=ingest_pb2.Ack.FromString)

            def messages() -> object:
                nonlocal seq
                for _ in range(200):
                    if stop.is_set():
                        return
                    seq += 1
                    yield _hostile(rng, seq)

            try:
                for _ in call(messages(), timeout=30):
                    counts["acks"] = counts.get("acks", 0) + 1
                counts["ok"] = counts.get("ok", 0) + 1
            except grpc.RpcError as exc:
                key = exc.code().name
                counts[key] = counts.get(key, 0) + 1


def test_a_hostile_client_cannot_hurt_a_good_node(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    issue_certificates(pki, servers=["localhost"], nodes=["good-000", "evil"], days=2)
    regional = RegionalProcess(
        tmp_path, "--resolution", "5s", "--lateness", "1s", "--tls-cert", str(pki / "localhost.crt"),
        "--tls-key", str(pki / "localhost.key"), "--tls-client-ca", str(pki / "ca.crt"), secure=True)
    regional.start()
    assert regional.proc is not None
    fleet = SyntheticFleet("good", 1, [f"127.0.0.1:{regional.port}"],
                           tls=ClientTls(pki / "ca.crt", pki / "good-000.crt", pki / "good-000.key"))
    evil = grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes(), (pki / "evil.key").read_bytes(),
                                        (pki / "evil.crt").read_bytes())
    stop = threading.Event()
    counts: list[dict[str, int]] = [{} for _ in range(4)]
    hammers = [threading.Thread(target=_hammer, args=(regional.port, evil, stop, i + 1, counts[i]))
               for i in range(4)]
    rss: list[int] = []
    fleet.start()
    for t in hammers:
        t.start()
    end = time.monotonic() + HAMMER_S
    while time.monotonic() < end:
        assert regional.proc.poll() is None, regional.tail()
        rss.append(_group_rss(regional.proc.pid))
        time.sleep(0.5)  # sampling memory, not waiting for a condition
    stop.set()
    for t in hammers:
        t.join(60)
    stats = fleet.stop()
    assert regional.proc.poll() is None, regional.tail()
    metrics = regional.metrics()
    assert regional.stop() == 0, regional.tail()

    assert stats["rejected"] == stats["dropped"] == 0, stats
    rows = regional.query("""SELECT node, sum(value) FROM stratoscope.metrics
        WHERE metric = 'syscalls_total' AND labels['syscall'] = 'read' AND labels['comm'] = 'app'
        AND resolution = 5 AND node != '' GROUP BY node""")
    stored = {n: int(v) for n, v in rows}
    assert stored.get("good-000") == fleet.reads["good-000"], (stored, dict(fleet.reads))
    print(f"hostile streams: {counts}; peak RSS of the regional's processes: {max(rss) / 2**20:.0f} MiB")
    assert max(rss) < RSS_BOUND, f"{max(rss) / 2**20:.0f} MiB"
    # the hostile traffic was refused and counted under fixed labels
    refused = metrics['stratoscope_regional_refused_total{reason="node_mismatch"}']
    rejected = sum(v for k, v in metrics.items() if k.startswith("stratoscope_regional_rejected_batches_total"))
    assert refused > 0 and rejected > 0, (refused, rejected)
    assert metrics['stratoscope_regional_rejected_batches_total{reason="encoding"}'] > 0
    log = regional.log.read_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:4000]
