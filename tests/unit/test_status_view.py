"""stratoscope status: /metrics text to a person's view (the real processes' pages are
read in tests/integration/test_query_cli.py)."""

from __future__ import annotations

import pytest
from rich.console import Console

from stratoscope.settings import ConfigError
from stratoscope.status import edge_view, metrics_url, parse, regional_view

EDGE = """# TYPE stratoscope_edge_programs_attached gauge
stratoscope_edge_programs_attached{program="syscalls"} 1.0
stratoscope_edge_programs_attached{program="tcp"} 0.0
# TYPE stratoscope_edge_last_drain_timestamp_seconds gauge
stratoscope_edge_last_drain_timestamp_seconds 1000.0
# TYPE stratoscope_edge_batches_total counter
stratoscope_edge_batches_total 12.0
# TYPE stratoscope_edge_events_lost_total counter
stratoscope_edge_events_lost_total{program="process",where="kernel"} 3.0
"""


def _text(tables: list) -> str:
    c = Console(width=200, record=True)
    for t in tables:
        c.print(t)
    return " ".join(c.export_text().replace("│", " ").split())


def test_edge_view() -> None:
    text = _text(edge_view(parse("u", EDGE), now=1002.5))
    assert "programs attached 1 of 2: syscalls" in text
    assert "not attached tcp" in text
    assert "last drain 2.50 s ago" in text
    assert "batches built 12" in text
    assert "batches acked n/a" in text
    assert "events lost (kernel) process 3" in text
    acked = EDGE + "# TYPE stratoscope_edge_batches_acked_total counter\nstratoscope_edge_batches_acked_total 11.0\n"
    assert "batches acked 11" in _text(edge_view(parse("u", acked), now=1002.5))


def test_a_page_of_the_other_kind_is_refused() -> None:
    with pytest.raises(ConfigError, match="is not a regional's /metrics"):
        regional_view(parse("u", EDGE))


def test_metrics_urls() -> None:
    assert metrics_url("h:9431") == "http://h:9431/metrics"
    assert metrics_url("https://h:9431") == "https://h:9431/metrics"
    assert metrics_url("http://h:1/custom") == "http://h:1/custom"


WAL = """# TYPE stratoscope_regional_batches_total counter
stratoscope_regional_batches_total{status="accepted"} 40.0
# TYPE stratoscope_regional_wal_segments gauge
stratoscope_regional_wal_segments 3.0
# TYPE stratoscope_regional_wal_bytes gauge
stratoscope_regional_wal_bytes 1048576.0
# TYPE stratoscope_regional_wal_bytes_limit gauge
stratoscope_regional_wal_bytes_limit 8589934592.0
# TYPE stratoscope_regional_wal_batches gauge
stratoscope_regional_wal_batches 17.0
# TYPE stratoscope_regional_wal_oldest_unstored_seconds gauge
stratoscope_regional_wal_oldest_unstored_seconds 75.0
# TYPE stratoscope_regional_wal_written_batches counter
stratoscope_regional_wal_written_batches_total 40.0
# TYPE stratoscope_regional_wal_fsyncs counter
stratoscope_regional_wal_fsyncs_total 12.0
# TYPE stratoscope_regional_wal_replayed_batches counter
stratoscope_regional_wal_replayed_batches_total{outcome="restored"} 5.0
stratoscope_regional_wal_replayed_batches_total{outcome="already_stored"} 2.0
# TYPE stratoscope_regional_wal_corrupt_records counter
stratoscope_regional_wal_corrupt_records_total 1.0
# TYPE stratoscope_regional_wal_failed gauge
stratoscope_regional_wal_failed 0.0
# TYPE stratoscope_regional_wal_fsync_in_progress_seconds gauge
stratoscope_regional_wal_fsync_in_progress_seconds 0.0
# TYPE stratoscope_regional_wal_fsync_longest_seconds gauge
stratoscope_regional_wal_fsync_longest_seconds 0.25
"""


def test_regional_view_shows_the_write_ahead_log() -> None:
    text = _text(regional_view(parse("u", WAL)))
    assert "log 3 segments, 1,048,576 bytes of 8,589,934,592 (RETRY from 90 %)" in text
    assert "batches not yet stored by every sink 17" in text
    assert "oldest window not yet stored started 75.0 s ago" in text
    assert "logged 40 batches, 12 fsyncs" in text
    assert "replayed at start already_stored 2, restored 5" in text
    assert "corrupt records skipped at start 1" in text
    assert "write or fsync none in progress, longest recently 250 ms" in text
    assert "FAILED" not in text
    stuck = WAL.replace("stratoscope_regional_wal_fsync_in_progress_seconds 0.0",
                        "stratoscope_regional_wal_fsync_in_progress_seconds 42.0")
    assert "write or fsync in progress for 42.0 s, longest recently" in _text(regional_view(parse("u", stuck)))
    failed = WAL.replace("stratoscope_regional_wal_failed 0.0", "stratoscope_regional_wal_failed 1.0")
    assert "FAILED the log cannot be written" in _text(regional_view(parse("u", failed)))


def test_regional_view_shows_dead_letters_and_blocked_sinks() -> None:
    page = WAL + """# TYPE stratoscope_regional_sink_delivered_blocks counter
stratoscope_regional_sink_delivered_blocks_total{sink="clickhouse"} 90.0
stratoscope_regional_sink_delivered_blocks_total{sink="kafka"} 80.0
# TYPE stratoscope_regional_sink_dead_letter_blocks counter
stratoscope_regional_sink_dead_letter_blocks_total{sink="clickhouse"} 2.0
stratoscope_regional_sink_dead_letter_blocks_total{sink="kafka"} 0.0
# TYPE stratoscope_regional_sink_blocked gauge
stratoscope_regional_sink_blocked{reason="auth",sink="clickhouse"} 1.0
stratoscope_regional_sink_blocked{reason="auth",sink="kafka"} 0.0
# TYPE stratoscope_regional_sink_seconds_since_delivery gauge
stratoscope_regional_sink_seconds_since_delivery{sink="clickhouse"} 30.0
stratoscope_regional_sink_seconds_since_delivery{sink="kafka"} 0.0
"""
    text = _text(regional_view(parse("u", page)))
    assert "clickhouse 90 n/a n/a n/a n/a 2 auth for 30.0 s" in text
    assert "kafka 80 n/a n/a n/a n/a 0 no" in text
    assert "dead letter (on disk, not stored) clickhouse 2" in text


def test_edge_view_shows_the_spool() -> None:
    page = EDGE + """# TYPE stratoscope_edge_spool_batches gauge
stratoscope_edge_spool_batches 7.0
# TYPE stratoscope_edge_spool_bytes gauge
stratoscope_edge_spool_bytes 190000.0
# TYPE stratoscope_edge_spool_oldest_age_seconds gauge
stratoscope_edge_spool_oldest_age_seconds 70.0
# TYPE stratoscope_edge_batches_in_doubt gauge
stratoscope_edge_batches_in_doubt 2.0
# TYPE stratoscope_edge_spool_replayed_batches counter
stratoscope_edge_spool_replayed_batches_total 5.0
# TYPE stratoscope_edge_batches_dropped counter
stratoscope_edge_batches_dropped_total{reason="full"} 3.0
stratoscope_edge_batches_dropped_total{reason="age"} 0.0
# TYPE stratoscope_edge_forwarder_errors counter
stratoscope_edge_forwarder_errors_total{reason="tls"} 1.0
stratoscope_edge_forwarder_errors_total{reason="spool"} 0.0
# TYPE stratoscope_edge_in_doubt_released counter
stratoscope_edge_in_doubt_released_total 4.0
"""
    text = _text(edge_view(parse("u", page), now=1002.5))
    assert "spool 7 batches not yet acknowledged, 190,000 bytes, oldest 70.0 s" in text
    assert "in doubt (held for their regional) 2" in text
    assert "replayed from the spool at start 5" in text
    assert "forwarder errors tls 1" in text
    assert "batches dropped from the spool full 3" in text
    assert "in-doubt batches released (may count twice) spool 4" in text


def test_regional_view_shows_hung_child_processes() -> None:
    page = WAL + """# TYPE stratoscope_regional_child_hangs counter
stratoscope_regional_child_hangs_total{process="merge"} 1.0
stratoscope_regional_child_hangs_total{process="ingest"} 0.0
stratoscope_regional_child_hangs_total{process="sink-clickhouse"} 2.0
"""
    assert "processes hung and killed merge 1, sink-clickhouse 2" in _text(regional_view(parse("u", page)))
    assert "hung" not in _text(regional_view(parse("u", WAL)))
