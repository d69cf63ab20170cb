"""`stratoscope regional`: health checks, start-up and shutdown as a process."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import kafka_bootstrap

pytestmark = pytest.mark.kafka
CLI = [sys.executable, "-m", "stratoscope.cli"]




def test_check_reports_each_sink(tmp_path: Path) -> None:
    ok = subprocess.run([*CLI, "regional", "--check", "--clickhouse", f"chdb://{tmp_path}/ch",
                         "--kafka", kafka_bootstrap()], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == ["clickhouse: ok", "kafka: ok"]
    bad = subprocess.run([*CLI, "regional", "--check", "--clickhouse", "none",
                          "--kafka", "127.0.0.1:1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stdout.startswith("kafka: FAILED: ")


def test_regional_serves_metrics_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = 19532
    proc = subprocess.Popen(
        [*CLI, "regional", "--listen", "127.0.0.1:0", "--metrics-port", str(port),
         "--clickhouse", f"chdb://{tmp_path}/ch"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        body = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "stratoscope_regional" not in body:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                time.sleep(0.3)
        assert "stratoscope_regional_window_lag_seconds" in body
        assert 'stratoscope_regional_sink_queued_blocks{sink="clickhouse"} 0.0' in body
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopping: flushing every window" in err


def test_bad_setting_is_one_line_exit_2(tmp_path: Path) -> None:
    r = subprocess.run([*CLI, "regional", "--resolution", "soon", "--clickhouse", "none"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "stratoscope: error: invalid duration 'soon' (use e.g. 10s, 500ms, 2m)"


async def test_regional_fails_fast_when_its_ingest_process_dies(tmp_path: Path) -> None:
    """A dead ingest process must not leave a regional that looks alive but acks nothing."""
    import asyncio

    from stratoscope.regional.app import RegionalOptions, RunningRegional

    running = RunningRegional(RegionalOptions(listen="127.0.0.1:0", metrics_port=0,
                                              clickhouse=f"chdb://{tmp_path}/ch"))
    await running.start()
    try:
        assert running.port > 0 and not running.failed.is_set()
        ingest = running._ingest
        assert ingest is not None and ingest._proc is not None
        ingest._proc.kill()
        await asyncio.wait_for(running.failed.wait(), 20)
    finally:
        await running.stop()
    assert running.failed.is_set()
