"""Regional settings: defaults in one place, the file, the flags over it, one line per
mistake; and what the options bound."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stratoscope.cli import _regional_config, build_parser
from stratoscope.regional.config import (
    DEFAULT_DSN,
    DEFAULT_MAX_HELD_BYTES,
    DEFAULT_MAX_HELD_POINTS,
    QUEUE_RETRY,
    RegionalConfig,
)
from stratoscope.regional.sinks.config import SINKS, ClickHouseSettings, KafkaSettings
from stratoscope.settings import ConfigError, load_settings, parse_duration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "regional.example.yaml"


def config(*argv: str) -> RegionalConfig:
    """The RegionalConfig ``stratoscope regional ARGV`` would run with."""
    return _regional_config(build_parser().parse_args(["regional", *argv]))  # type: ignore[no-any-return]


def test_frame_nodes_default_and_cli() -> None:
    assert RegionalConfig().frame_nodes == 250
    assert config("--frame-nodes", "500", "--clickhouse", "none").frame_nodes == 500
    assert config("--clickhouse", "none").frame_nodes == 250


@pytest.mark.parametrize("bad", [0, -1, QUEUE_RETRY // 3 + 1])
def test_frame_nodes_out_of_range_is_a_config_error(bad: int) -> None:
    with pytest.raises(ConfigError, match="frame_nodes must be 1..1000"):
        config("--frame-nodes", str(bad), "--clickhouse", "none")


def test_wal_fsync_timeout_default_and_flag() -> None:
    assert RegionalConfig().wal_fsync_timeout == 120.0
    assert config("--wal-fsync-timeout", "30s", "--clickhouse", "none").wal_fsync_timeout == 30.0


def test_the_example_file_lists_every_setting_with_its_default() -> None:
    assert load_settings(RegionalConfig, EXAMPLE, {}) == RegionalConfig()
    text = EXAMPLE.read_text()
    for key in RegionalConfig.model_fields:
        assert f"\n{key}:" in text or f"\n# {key}:" in text, key
    # the commented Kafka section, uncommented, is KafkaSettings' defaults
    section = text.split("\nkafka: null\n", 1)[1]
    kafka = yaml.safe_load("\n".join(line[4:] for line in section.splitlines() if line.startswith("#   ")))
    assert set(kafka) == set(KafkaSettings.model_fields)
    kafka["bootstrap"] = "k1:9092"
    assert KafkaSettings(**kafka) == KafkaSettings(bootstrap="k1:9092")
    # the ClickHouse section lists every ClickHouseSettings key
    clickhouse = yaml.safe_load(text)["clickhouse"]
    assert set(clickhouse) == set(ClickHouseSettings.model_fields)
    assert set(SINKS) == {"clickhouse", "kafka"}
    assert RegionalConfig().clickhouse == ClickHouseSettings(dsn=DEFAULT_DSN)


def test_flags_override_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "regional.yaml"
    cfg.write_text("resolution: 10s\nlateness: 0\nclickhouse: {database: one}\n"
                   "kafka: {bootstrap: 'k1:9092', topic_prefix: a}\n")
    c = config("--config", str(cfg), "--resolution", "30s", "--kafka-topic-prefix", "b")
    assert (c.resolution_s, c.lateness) == (30, 0.0)
    assert c.clickhouse == ClickHouseSettings(dsn=DEFAULT_DSN, database="one")
    assert c.kafka == KafkaSettings(bootstrap="k1:9092", topic_prefix="b")
    assert config("--config", str(cfg), "--clickhouse", "none", "--kafka", "none").sinks == []


def test_every_kafka_setting_has_a_flag(tmp_path: Path) -> None:
    ca, cert, key, pw = (tmp_path / n for n in ("ca.crt", "c.crt", "c.key", "pw"))
    for f in (ca, cert, key):
        f.write_text("x")
    pw.write_text("s3cret\n")
    c = config("--kafka", "k1:9092,k2:9092", "--kafka-topic-prefix", "t", "--kafka-compression", "gzip",
               "--kafka-request-timeout", "5s", "--kafka-security-protocol", "SASL_SSL",
               "--kafka-ssl-cafile", str(ca), "--kafka-ssl-certfile", str(cert),
               "--kafka-ssl-keyfile", str(key), "--kafka-sasl-mechanism", "SCRAM-SHA-512",
               "--kafka-sasl-username", "u", "--kafka-sasl-password-file", str(pw))
    assert c.kafka == KafkaSettings(
        bootstrap="k1:9092,k2:9092", topic_prefix="t", compression="gzip", request_timeout=5.0,
        security_protocol="SASL_SSL", ssl_cafile=ca, ssl_certfile=cert, ssl_keyfile=key,
        sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password_file=pw)
    assert c.kafka is not None and c.kafka.password() == "s3cret"
    # every field but the password itself (a command line is visible to every user)
    flagged = {a.dest.split(".", 1)[1] for a in build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
               .choices["regional"]._actions if a.dest.startswith("set:kafka.")}
    assert flagged == set(KafkaSettings.model_fields) - {"sasl_password"}


def test_a_password_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_PW", "from-env")
    k = KafkaSettings(bootstrap="k:9092", security_protocol="SASL_PLAINTEXT", sasl_username="u",
                      sasl_password="hunter2")  # type: ignore[arg-type]
    assert "hunter2" not in repr(k) and "hunter2" not in str(RegionalConfig(kafka=k))
    assert k.password() == "hunter2"
    e = KafkaSettings(bootstrap="k:9092", security_protocol="SASL_PLAINTEXT", sasl_username="u",
                      sasl_password_env="KAFKA_PW")
    assert e.password() == "from-env"


@pytest.mark.parametrize(("argv", "text", "message"), [
    (["--resolution", "soon"], None,
     "setting 'resolution' on the command line (--resolution): invalid duration 'soon' "
     "(use e.g. 10s, 500ms, 2m)"),
    (["--resolution", "1.5s"], None,
     "setting 'resolution' on the command line (--resolution): must be whole seconds, got 1.5s"),
    ([], "kafka: {bootstrap: 'h:9092', topci: x}\n", "unknown setting 'kafka.topci' in {cfg}"),
    ([], "lateness: -1s\n", "setting 'lateness' in {cfg}: invalid duration '-1s' (use e.g. 10s, 500ms, 2m)"),
    ([], "kafka: {topic_prefix: x}\n", "setting 'kafka.bootstrap' in {cfg}: required, and not given"),
    (["--kafka-topic-prefix", "x"], None,
     "setting 'kafka.bootstrap' on the command line: required, and not given"),
    (["--clickhouse", "http://h:8123/my-db"], None,
     "setting 'clickhouse.dsn' on the command line (--clickhouse): invalid ClickHouse database "
     "name 'my-db' in the DSN (letters, digits and _, not starting with a digit)"),
    (["--clickhouse", "chdb://relative/dir"], None,
     "setting 'clickhouse.dsn' on the command line (--clickhouse): a chdb DSN is "
     "chdb:///absolute/dir, got 'chdb://relative/dir'"),
    (["--clickhouse-database", "my-db"], None,
     "setting 'clickhouse.database' on the command line (--clickhouse-database): invalid "
     "ClickHouse database name 'my-db' (letters, digits and _, not starting with a digit)"),
    (["--wal-fsync-timeout", "2s"], None,
     "setting 'wal_fsync_timeout' on the command line (--wal-fsync-timeout): must be at least 5s "
     "(a busy disk's fsync takes seconds), got 2s"),
    (["--max-held-points", "0"], None,
     "setting 'max_held_points' on the command line (--max-held-points): must be greater than "
     "or equal to 1"),
    (["--tls-client-ca", "/etc/hostname"], None,
     "setting 'tls' on the command line (--tls-client-ca): tls.client_ca needs tls.cert and "
     "tls.key (the server's certificate)"),
    (["--tls-cert", "/nonexistent.crt", "--tls-key", "/nonexistent.key"], None,
     "setting 'tls' on the command line (--tls-cert): tls.cert '/nonexistent.crt' is not a "
     "readable file"),
    (["--kafka", "h"], None,
     "setting 'kafka.bootstrap' on the command line (--kafka): expected host:port[,host:port...], "
     "got 'h'"),
    (["--kafka", "h:9092", "--kafka-compression", "brotli"], None,
     "setting 'kafka.compression' on the command line (--kafka-compression): must be 'auto', "
     "'none', 'gzip', 'zstd', 'lz4' or 'snappy'"),
    (["--kafka", "h:9092", "--kafka-security-protocol", "SASL_SSL"], None,
     "setting 'kafka' on the command line (--kafka): security_protocol SASL_SSL needs "
     "sasl_username and a password (sasl_password, sasl_password_file or sasl_password_env)"),
    (["--kafka", "h:9092", "--kafka-security-protocol", "SASL_SSL", "--kafka-sasl-username", "u",
      "--kafka-sasl-password-env", "STRATOSCOPE_TEST_UNSET"], None,
     "setting 'kafka' on the command line (--kafka): the environment variable that "
     "sasl_password_env names is not set (in the regional's environment)"),
    (["--kafka", "h:9092", "--kafka-ssl-cafile", "/etc/hostname"], None,
     "setting 'kafka' on the command line (--kafka): ssl_cafile/ssl_certfile/ssl_keyfile need "
     "security_protocol SSL or SASL_SSL"),
])
def test_a_bad_setting_is_one_line(tmp_path: Path, argv: list[str], text: str | None, message: str) -> None:
    cfg = tmp_path / "regional.yaml"
    if text is not None:
        cfg.write_text(text)
        argv = ["--config", str(cfg), *argv]
    with pytest.raises(ConfigError) as err:
        config(*argv)
    assert str(err.value) == message.format(cfg=cfg)


def test_durations() -> None:
    assert [parse_duration(v) for v in ("10s", "500ms", "1m", "2h", 3, "0.5")] == [
        10.0, 0.5, 60.0, 7200.0, 3.0, 0.5]
    assert parse_duration("0s", allow_zero=True) == 0.0
    for bad in ("soon", "0", "-1s", "10 parsecs"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_demote_merge_threads_sets_nice_on_named_threads_only() -> None:
    """A thread named like ClickHouse's merge pool gets MERGE_NICE; others keep theirs."""
    import os
    import threading

    from stratoscope.regional.sinks.process import MERGE_NICE, demote_merge_threads

    named, stop = threading.Barrier(3, timeout=5), threading.Event()
    tids: dict[str, int] = {}

    def worker(name: str) -> None:
        tids[name] = threading.get_native_id()
        with open(f"/proc/self/task/{tids[name]}/comm", "w") as f:
            f.write(name)
        named.wait()  # both threads carry their names before the test looks
        stop.wait(10)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("MergeMutate", "QueryPullPipeEx")]
    for t in threads:
        t.start()
    try:
        named.wait()
        base = os.getpriority(os.PRIO_PROCESS, tids["QueryPullPipeEx"])
        seen: set[int] = set()
        # The process may hold chdb's own merge threads too (an earlier test opened a
        # store), so count at least ours and look at our two threads by id.
        assert demote_merge_threads(seen) >= 1
        assert tids["MergeMutate"] in seen and tids["QueryPullPipeEx"] not in seen
        assert os.getpriority(os.PRIO_PROCESS, tids["MergeMutate"]) == MERGE_NICE
        assert os.getpriority(os.PRIO_PROCESS, tids["QueryPullPipeEx"]) == base
        os.setpriority(os.PRIO_PROCESS, tids["MergeMutate"], base)
        demote_merge_threads(seen)  # once per thread: a thread already seen is left alone
        assert os.getpriority(os.PRIO_PROCESS, tids["MergeMutate"]) == base
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_max_held_points_default_cli_and_bounds() -> None:
    assert RegionalConfig().max_held_points == DEFAULT_MAX_HELD_POINTS == 64_000_000
    assert config("--max-held-points", "1000", "--clickhouse", "none").max_held_points == 1000
    with pytest.raises(ConfigError, match="max_held_points.*must be greater than or equal to 1"):
        config("--max-held-points", "0", "--clickhouse", "none")


def test_max_held_bytes_default_cli_bounds_and_what_it_bounds() -> None:
    """The bytes bound is checked against the merge's account of its windows."""
    from stratoscope.edge.batch import BatchBuilder
    from stratoscope.regional.merge import MergeSettings
    from stratoscope.regional.service import Regional

    assert RegionalConfig().max_held_bytes == DEFAULT_MAX_HELD_BYTES == 2 * 1024**3
    assert config("--max-held-bytes", "5000", "--clickhouse", "none").max_held_bytes == 5000
    with pytest.raises(ConfigError, match="max_held_bytes.*must be greater than or equal to 1"):
        config("--max-held-bytes", "0", "--clickhouse", "none")
    end = 1_800_000_030 * 1_000_000_000
    b = BatchBuilder("n1", "boot", 1, end - 10_000_000_000, end, {})
    b.add_counters("c", "", "", ["k"], {(f"v{i}",): i for i in range(100)})
    regional = Regional(MergeSettings(resolution_s=60, lateness_s=0), [], max_held_bytes=10_000)
    assert not regional.held_full
    regional.aggregator.record(b.build())
    held = regional.held_bytes
    # 100 rows of (node, label) keys and a value, the strings, the batch's identity
    assert 100 * (8 + 8) < held < 100 * (8 + 8) + 120 * 110 + 1000
    assert regional.held_full and regional.held_points == 100
    assert regional.registry.get_sample_value("stratoscope_regional_held_bytes") == held
    assert regional.registry.get_sample_value("stratoscope_regional_held_series") == 100
    assert regional.registry.get_sample_value("stratoscope_regional_held_bytes_per_series") == held / 100


def test_gate_answers_retry_while_windows_are_full_or_draining_and_remembers_nothing() -> None:
    """A RETRY is not a delivery: the same batch is accepted once the bound clears, then
    is a duplicate."""
    import time

    from stratoscope.edge.batch import BatchBuilder
    from stratoscope.regional.gate import Gate
    from stratoscope.v1 import ingest_pb2

    now = time.time_ns()
    b = BatchBuilder("gate-node", "boot", 7, now - 10_000_000_000, now, {})
    b.add_counters("syscalls_total", "calls", "h", ["syscall"], {("read",): 5})
    batch = b.build()
    gate = Gate()
    gate.held_full = True
    ack, cols, _ = gate.admit(batch, None, None)
    assert (ack.status, ack.seq, cols) == (ingest_pb2.Ack.RETRY, 7, None)
    assert "max held points" in ack.reason
    gate.held_full, gate.closed = False, True  # the owner drains
    ack, cols, _ = gate.admit(batch, None, None)
    assert (ack.status, ack.reason, cols) == (ingest_pb2.Ack.RETRY, "regional is draining its windows", None)
    gate.closed = False
    ack, cols, _ = gate.admit(batch, None, None)
    assert ack.status == ingest_pb2.Ack.ACCEPTED and cols is not None and cols.points == 1
    assert gate.admit(batch, None, None)[0].status == ingest_pb2.Ack.DUPLICATE


def test_the_ingest_process_imports_only_what_it_runs() -> None:
    """The ingest child (spawned: a fresh interpreter) imports regional/ingest.py; the
    merge, the delivery queues, the frame child and the sinks are not its business."""
    probe = (
        "import sys, stratoscope.regional.ingest\n"
        "mods = [m for m in sys.modules if m.startswith('stratoscope.regional.')]\n"
        "print(' '.join(sorted(mods)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split()
    for unwanted in ("merge", "delivery", "forkframe", "sinks", "service", "config", "app", "frame"):
        assert f"stratoscope.regional.{unwanted}" not in out, out
    assert not [m for m in out if m.startswith("stratoscope.regional.sinks")], out
    assert "stratoscope.regional.gate" in out and "stratoscope.regional.server" in out
