"""The forwarder's tallies on /metrics: what the rolling deployment's health gate reads."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from stratoscope.edge.forward import ERROR_REASONS, ClientTls, GrpcForwarder
from stratoscope.edge.metrics import FORWARD_LABELLED, ForwardCounters
from stratoscope.edge.spool import DROP_REASONS
from stratoscope.v1 import batch_pb2 as pb
from stratoscope.v1 import ingest_pb2
from tests.conftest import wait_for


def test_counts_follow_the_acks_of_each_kind() -> None:
    # Nothing listens on port 1: the stream never opens, so only the acks fed here count.
    fwd = GrpcForwarder(["127.0.0.1:1"], compression="none", backoff_initial_s=60)
    try:
        for seq in range(1, 6):
            fwd.write(pb.Batch(boot_id="b1", seq=seq))
        fwd.write(pb.Batch(boot_id="b0", seq=1))  # an older boot's seq 1: another batch
        ack = ingest_pb2.Ack
        fwd._on_ack(ack(boot_id="b1", seq=1, status=ack.ACCEPTED))
        fwd._on_ack(ack(boot_id="b1", seq=2, status=ack.ACCEPTED))
        fwd._on_ack(ack(boot_id="b1", seq=3, status=ack.DUPLICATE))
        fwd._on_ack(ack(boot_id="b1", seq=4, status=ack.REJECTED, reason="bad"))
        fwd._on_ack(ack(boot_id="b1", seq=5, status=ack.RETRY))
        counts = fwd.counts()
        left = fwd.spool.pending()
    finally:
        fwd.close(timeout_s=0)
    assert {k: counts[k] for k in ("acked", "duplicates", "rejected", "retries", "dropped.full",
                                   "spool_batches")} \
        == {"acked": 2, "duplicates": 1, "rejected": 1, "retries": 1, "dropped.full": 0,
            "spool_batches": 2}
    assert left == [("b1", 5), ("b0", 1)]


def test_exposition_names_and_values() -> None:
    registry = CollectorRegistry()
    values = {"acked": 7, "duplicates": 1, "rejected": 2, "retries": 3, "dropped.full": 4,
              "dropped.age": 1, "reconnects": 5, "spool_batches": 6, "spool_bytes": 600,
              "spool_oldest_age_s": 12.5, "spool_replayed": 8, "spool_corrupt_records": 1,
              "spool_corrupt_bytes": 33, "in_doubt": 2, "in_doubt_released": 1, "errors.tls": 3}
    registry.register(ForwardCounters(lambda: values))
    text = generate_latest(registry).decode()
    samples = {line.split()[0]: float(line.split()[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples == {
        "stratoscope_edge_batches_acked_total": 7.0,
        "stratoscope_edge_batches_duplicate_total": 1.0,
        "stratoscope_edge_batches_rejected_total": 2.0,
        "stratoscope_edge_batches_retried_total": 3.0,
        "stratoscope_edge_reconnects_total": 5.0,
        "stratoscope_edge_in_doubt_released_total": 1.0,
        "stratoscope_edge_spool_replayed_batches_total": 8.0,
        "stratoscope_edge_spool_corrupt_records_total": 1.0,
        "stratoscope_edge_spool_corrupt_bytes_total": 33.0,
        "stratoscope_edge_spool_batches": 6.0,
        "stratoscope_edge_spool_bytes": 600.0,
        "stratoscope_edge_spool_oldest_age_seconds": 12.5,
        "stratoscope_edge_batches_in_doubt": 2.0,
        'stratoscope_edge_batches_dropped_total{reason="full"}': 4.0,
        'stratoscope_edge_batches_dropped_total{reason="age"}': 1.0,
        'stratoscope_edge_batches_dropped_total{reason="corrupt"}': 0.0,
        'stratoscope_edge_batches_dropped_total{reason="unwritable"}': 0.0,
        'stratoscope_edge_forwarder_errors_total{reason="tls"}': 3.0,
        'stratoscope_edge_forwarder_errors_total{reason="auth"}': 0.0,
        'stratoscope_edge_forwarder_errors_total{reason="spool"}': 0.0,
        'stratoscope_edge_forwarder_errors_total{reason="ack_timeout"}': 0.0,
        'stratoscope_edge_forwarder_errors_total{reason="internal"}': 0.0,
    }


def test_the_fixed_label_sets_are_the_forwarders() -> None:
    assert FORWARD_LABELLED["dropped"][3] == DROP_REASONS
    assert FORWARD_LABELLED["errors"][3] == ERROR_REASONS


def test_a_missing_certificate_is_counted_and_the_forwarder_goes_on(tmp_path: Path) -> None:
    """A certificate file missing (a rotation in progress) ends a round, not the thread:
    counted under "tls", and once the file is back the rounds get past it."""
    ca = tmp_path / "ca.pem"
    fwd = GrpcForwarder(["127.0.0.1:1"], tls=ClientTls(ca), backoff_initial_s=0.05,
                        backoff_max_s=0.1)
    try:
        wait_for("two tls errors", lambda: fwd.errors["tls"] >= 2, 20, every_s=0.05)
        assert all(t.is_alive() for t in fwd._threads)
        ca.write_bytes(b"not a certificate, but readable")
        seen = fwd.errors["tls"]
        reconnects = fwd.stats.reconnects
        wait_for("rounds past the TLS files", lambda: fwd.stats.reconnects >= reconnects + 3,
                 20, every_s=0.05)
        assert fwd.errors["tls"] <= seen + 1  # at most a round already under way
    finally:
        fwd.close(timeout_s=0)
