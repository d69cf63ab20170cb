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
