"""The forwarder's tallies on /metrics: what the rolling deployment's health gate reads."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from stratoscope.edge.forward import GrpcForwarder
from stratoscope.edge.metrics import ForwardCounters
from stratoscope.v1 import batch_pb2 as pb
from stratoscope.v1 import ingest_pb2


def test_counts_follow_the_acks_of_each_kind() -> None:
    # Nothing listens on port 1: the stream never opens, so only the acks fed here count.
    fwd = GrpcForwarder(["127.0.0.1:1"], compression="none", backoff_initial_s=60)
    try:
        for seq in range(1, 6):
            fwd.write(pb.Batch(seq=seq))
        ack = ingest_pb2.Ack
        fwd._on_ack(ack(seq=1, status=ack.ACCEPTED))
        fwd._on_ack(ack(seq=2, status=ack.ACCEPTED))
        fwd._on_ack(ack(seq=3, status=ack.DUPLICATE))
        fwd._on_ack(ack(seq=4, status=ack.REJECTED, reason="bad"))
        fwd._on_ack(ack(seq=5, status=ack.RETRY))
        counts = fwd.counts()
    finally:
        fwd.close(timeout_s=0)
    assert {k: counts[k] for k in ("acked", "duplicates", "rejected", "retries", "dropped", "unacked")} \
        == {"acked": 2, "duplicates": 1, "rejected": 1, "retries": 1, "dropped": 0, "unacked": 1}


def test_exposition_names_and_values() -> None:
    registry = CollectorRegistry()
    values = {"acked": 7, "duplicates": 1, "rejected": 2, "retries": 3, "dropped": 4,
              "reconnects": 5, "unacked": 6}
    registry.register(ForwardCounters(lambda: values))
    text = generate_latest(registry).decode()
    samples = {line.split()[0]: float(line.split()[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples == {
        "stratoscope_edge_batches_acked_total": 7.0,
        "stratoscope_edge_batches_duplicate_total": 1.0,
        "stratoscope_edge_batches_rejected_total": 2.0,
        "stratoscope_edge_batches_retried_total": 3.0,
        "stratoscope_edge_batches_dropped_total": 4.0,
        "stratoscope_edge_reconnects_total": 5.0,
        "stratoscope_edge_batches_unacked": 6.0,
    }
