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
        [*CLI, "regional", "--insecure", "--listen", "127.0.0.1:0", "--metrics-port", str(port),
         "--query-listen", "none", "--clickhouse", f"chdb://{tmp_path}/ch", "--wal-dir", f"{tmp_path}/wal"],
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


@pytest.mark.parametrize(("argv", "text", "message"), [
    (["--resolution", "soon"], None,
     "setting 'resolution' on the command line (--resolution): invalid duration 'soon' "
     "(use e.g. 10s, 500ms, 2m)"),
    ([], "kafka: {bootstrap: '127.0.0.1:9092', topci: x}\n", "unknown setting 'kafka.topci' in {cfg}"),
    (["--clickhouse", "http://h:8123/my-db"], None,
     "setting 'clickhouse.dsn' on the command line (--clickhouse): invalid ClickHouse database "
     "name 'my-db' in the DSN (letters, digits and _, not starting with a digit)"),
    (["--kafka", "h:9092", "--kafka-compression", "brotli"], None,
     "setting 'kafka.compression' on the command line (--kafka-compression): must be 'auto', "
     "'none', 'gzip', 'zstd', 'lz4' or 'snappy'"),
    ([], "resolution: [1\n", "config {cfg}: invalid YAML at line 2, column 1: expected ',' or ']', "
     "but got '<stream end>'"),
    (["--frame-nodes"], None,
     "stratoscope regional: error: argument --frame-nodes: expected one argument (see --help)"),
])
def test_bad_setting_is_one_line_exit_2(tmp_path: Path, argv: list[str], text: str | None,
                                        message: str) -> None:
    """Every setting a person can get wrong: one line on stderr, exit 2, no traceback, and
    no child process started (settings are validated in the parent)."""
    cfg = tmp_path / "regional.yaml"
    if text is not None:
        cfg.write_text(text)
        argv = ["--config", str(cfg), *argv]
    r = subprocess.run([*CLI, "regional", "--clickhouse", "none", *argv] if "--clickhouse" not in argv
                       else [*CLI, "regional", *argv], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    want = message.format(cfg=cfg)
    assert r.stderr.splitlines() == [want if want.startswith("stratoscope regional:")
                                     else f"stratoscope: error: {want}"]


def test_a_sink_that_cannot_start_is_one_line_exit_1(tmp_path: Path) -> None:
    r = subprocess.run([*CLI, "regional", "--insecure", "--listen", "127.0.0.1:0", "--metrics-port", "0",
                        "--clickhouse", "none", "--kafka", "127.0.0.1:1", "--wal-dir", f"{tmp_path}/wal"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith("stratoscope: error: cannot start the regional: cannot connect to Kafka "
                           "at 127.0.0.1:1: "), r.stderr


def test_the_config_file_runs_a_regional(tmp_path: Path) -> None:
    """--config FILE reaches the sinks (a --check run: health checks of what it names)."""
    cfg = tmp_path / "regional.yaml"
    cfg.write_text(f"clickhouse: {{dsn: 'chdb://{tmp_path}/ch', database: from_file}}\n"
                   f"kafka: {{bootstrap: '{kafka_bootstrap()}', compression: gzip}}\n")
    ok = subprocess.run([*CLI, "regional", "--check", "--config", str(cfg)],
                        capture_output=True, text=True, timeout=120)
    assert (ok.returncode, ok.stdout.splitlines()) == (0, ["clickhouse: ok", "kafka: ok"]), ok.stderr


async def test_regional_fails_fast_when_its_ingest_process_dies(tmp_path: Path) -> None:
    """A dead ingest process must not leave a regional that looks alive but acks nothing."""
    import asyncio

    from stratoscope.regional.app import RunningRegional
    from stratoscope.regional.config import RegionalConfig

    running = RunningRegional(RegionalConfig(insecure=True, listen="127.0.0.1:0", metrics_port=0, query_listen=None,
                                             clickhouse=f"chdb://{tmp_path}/ch", wal_dir=tmp_path / "wal"))
    await running.start()
    try:
        assert running.port > 0 and not running.failed.is_set()
        ingest = running._ingest
        assert ingest._proc is not None
        ingest._proc.kill()
        await asyncio.wait_for(running.failed.wait(), 20)
    finally:
        await running.stop()
    assert running.failed.is_set()


async def test_lifecycle_stop_is_idempotent_and_a_failed_start_stops_what_started(tmp_path: Path) -> None:
    """One owner: a sink that cannot start stops the sinks started before it; stop() is
    safe without start() and twice."""
    from stratoscope.regional.app import RunningRegional
    from stratoscope.regional.config import RegionalConfig
    from stratoscope.regional.sinks.base import SinkError

    never = RunningRegional(RegionalConfig(insecure=True, listen="127.0.0.1:0", metrics_port=0, clickhouse=None,
                                           wal_dir=tmp_path / "wal0"))
    await never.stop()
    await never.stop()

    running = RunningRegional(RegionalConfig(insecure=True, listen="127.0.0.1:0", metrics_port=0, query_listen=None,
                                             clickhouse=f"chdb://{tmp_path}/ch", wal_dir=tmp_path / "wal",
                                             kafka={"bootstrap": "127.0.0.1:1"}))  # type: ignore[arg-type]
    with pytest.raises(SinkError, match="cannot connect to Kafka at 127.0.0.1:1"):
        await running.start()
    assert [s.alive for s in running.sinks] == [False, False]  # clickhouse started, then stopped
    assert running.port == 0 and running._ingest._proc is None  # ingest never started
    await running.stop()  # again: nothing left to do


def test_a_second_regional_on_a_taken_port_fails_in_one_line(tmp_path: Path) -> None:
    """gRPC's SO_REUSEPORT is off: a second regional on the same port does not start
    silently beside the first (sharing its edges); it says so and exits 1."""
    port, metrics = 19533, 19534
    ingest = f"127.0.0.1:{port}"

    def argv(name: str, metrics_port: int) -> list[str]:
        return [*CLI, "regional", "--insecure", "--listen", ingest, "--metrics-port", str(metrics_port),
                "--query-listen", "none", "--clickhouse", "none", "--wal-dir", f"{tmp_path}/{name}"]

    first = subprocess.Popen(argv("wal1", metrics), stderr=subprocess.PIPE, text=True)
    try:
        body = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "stratoscope_regional" not in body:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=2).read().decode()
            except OSError:
                time.sleep(0.3)
        assert "stratoscope_regional" in body
        second = subprocess.run(argv("wal2", metrics + 1), capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        # (gRPC's core logs its own line about the bind as well)
        errors = [ln for ln in second.stderr.splitlines() if ln.startswith("stratoscope")]
        assert errors == [f"stratoscope: error: cannot start the regional: cannot listen on {ingest} "
                          "(in use, or not an address of this host)"], second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first one is unharmed
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
