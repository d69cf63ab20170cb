"""Secrets planted in a regional's settings never come out: not in what ``stratoscope
regional --check`` or a failed start prints, not in a running regional's log while its
sinks fail and retry, not on /metrics, not in ``stratoscope status`` (docs/SECURITY.md,
"Secrets"). Real processes, debug logging on (every library's lines included).

Planted: a ClickHouse password in the DSN and in a password file, a Kafka SASL password in
the settings file and in the environment, the regional's TLS key and an edge's bearer
token. A ClickHouse server is not available here, and a regional whose sink cannot start
exits (one line, exit 1): so the ClickHouse passwords are exercised by ``--check`` and a
failed start against a port that takes the connection and hangs up, and the running
regional is one whose Kafka broker (a broker of this test's own, demanding SASL) goes
away after the regional started.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from stratoscope.edge.batch import BatchBuilder
from stratoscope.edge.forward import ClientTls
from stratoscope.pki import issue_certificates, issue_tokens
from stratoscope.v1 import ingest_pb2
from tests.conftest import free_port, stable_port, wait_for
from tests.integration.regional_proc import ROOT, _group_alive
from tests.integration.synthetic_edges import SyntheticFleet

KAFKA_USER = "stratoscope"


class Planted:
    """Distinctive secrets (new ones per test) and the files that hold some of them."""

    def __init__(self, directory: Path) -> None:
        tag = uuid.uuid4().hex[:10]
        self.ch_dsn = f"chdsn{tag}"
        self.ch_file = f"chfile{tag}"
        self.kafka_yaml = f"kyaml{tag}"
        self.kafka_env = f"kenv{tag}"
        issue_certificates(directory, servers=["localhost"], days=2)
        issue_tokens(directory / "tokens", ["sec-000"])  # SyntheticFleet("sec", 1)'s node
        self.pki = directory
        self.cert, self.key = directory / "localhost.crt", directory / "localhost.key"
        self.tokens = directory / "tokens" / "tokens"
        self.token_file = directory / "tokens" / "sec-000.token"
        self.ch_password_file = directory / "ch-password"
        self.ch_password_file.write_text(self.ch_file + "\n")
        self.ch_password_file.chmod(0o600)

    def values(self) -> list[str]:
        """Every secret, the TLS key as its whole text and as each of its base64 lines."""
        key = self.key.read_text()
        key_lines = [ln for ln in key.splitlines() if ln and not ln.startswith("-----")]
        return [self.ch_dsn, self.ch_file, self.kafka_yaml, self.kafka_env,
                self.token_file.read_text().strip(), key.strip(), *key_lines]

    def assert_absent(self, where: str, text: str) -> None:
        found = [v[:12] + "..." for v in self.values() if v in text]
        assert not found, f"secrets {found} in {where}"


def _stratoscope(*argv: str, env: dict[str, str] | None = None,
                 timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stratoscope.cli", *argv], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout_s, env={**os.environ, **(env or {})})


class HangUp:
    """A port that takes connections, keeps the first bytes of each and closes it: what a
    ClickHouse client sends first (a TLS ClientHello for https://, a request otherwise)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.first_bytes: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hang-up", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                try:
                    self.first_bytes.append(conn.recv(65536))
                except OSError:
                    self.first_bytes.append(b"")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close()


def _settings(path: Path, planted: Planted, tmp: Path, **sections: object) -> Path:
    """A regional's settings with TLS and edge tokens (the key and tokens planted) and
    ``sections`` over them."""
    data = {"listen": f"127.0.0.1:{free_port()}", "metrics_port": 0, "query_listen": None,
            "wal_dir": str(tmp / "wal"), "tls": {"cert": str(planted.cert), "key": str(planted.key)},
            "auth_tokens": str(planted.tokens), "resolution": "5s", "lateness": "1s",
            "stop_timeout": "5s", **sections}
    path.write_text(yaml.safe_dump(data))
    return path


def test_check_and_a_failed_start_print_no_secret(tmp_path: Path) -> None:
    planted = Planted(tmp_path / "pki")
    hang_up = HangUp()
    try:
        in_the_dsn = _settings(tmp_path / "dsn.yaml", planted, tmp_path, clickhouse={
            "dsn": f"https://writer:{planted.ch_dsn}@127.0.0.1:{hang_up.port}/stratoscope"},
            kafka={"bootstrap": "127.0.0.1:1", "security_protocol": "SASL_PLAINTEXT",
                   "sasl_username": KAFKA_USER, "sasl_password": planted.kafka_yaml,
                   "request_timeout": "5s"})
        check = _stratoscope("-v", "regional", "--config", str(in_the_dsn), "--check")
        assert check.returncode == 1, check.stdout + check.stderr[-3000:]
        assert re.search(r"^clickhouse: FAILED: connecting to ClickHouseSink\('https://127\.0\.0\.1:\d+/"
                         r"stratoscope'", check.stdout, re.MULTILINE), check.stdout
        assert "kafka: FAILED: cannot connect to Kafka at 127.0.0.1:1" in check.stdout, check.stdout
        planted.assert_absent("the output of --check (password in the DSN and the settings file)",
                              check.stdout + check.stderr)
        with pytest.raises(AssertionError, match="secrets"):  # the search finds what is there
            planted.assert_absent("the settings file", in_the_dsn.read_text())
        # https:// on a port other than 443/8443 is TLS: the password never went out in the clear
        wait_for("the ClickHouse client to connect", lambda: hang_up.first_bytes, 30, every_s=0.1)
        for first in hang_up.first_bytes:
            assert first.startswith(b"\x16\x03"), first[:40]  # a TLS handshake record
            assert planted.ch_dsn.encode() not in first
    finally:
        hang_up.close()

    env = {"STRATOSCOPE_TEST_KAFKA_PW": planted.kafka_env}
    from_files = _settings(tmp_path / "files.yaml", planted, tmp_path, clickhouse={
        "dsn": "https://127.0.0.1:1/stratoscope", "user": "writer",
        "password_file": str(planted.ch_password_file)},
        kafka={"bootstrap": "127.0.0.1:1", "security_protocol": "SASL_PLAINTEXT",
               "sasl_username": KAFKA_USER, "sasl_password_env": "STRATOSCOPE_TEST_KAFKA_PW",
               "request_timeout": "5s"})
    check = _stratoscope("-v", "regional", "--config", str(from_files), "--check", env=env)
    assert check.returncode == 1, check.stdout + check.stderr[-3000:]
    assert "clickhouse: FAILED: connecting to ClickHouseSink('https://127.0.0.1:1/stratoscope'" in check.stdout
    assert "kafka: FAILED" in check.stdout
    planted.assert_absent("the output of --check (password file and environment)", check.stdout + check.stderr)
    run = _stratoscope("-v", "regional", "--config", str(from_files), env=env)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "stratoscope: error: cannot start the regional: connecting to ClickHouseSink(" in run.stderr
    planted.assert_absent("the output of a failed start", run.stdout + run.stderr)


@pytest.fixture
def sasl_broker(tmp_path: Path) -> Iterator[tuple[str, dict[str, str], str]]:
    """A broker of this test's own that demands SASL (PLAIN) on one port: (its SASL
    address, the environment scripts/kafka.sh needs to halt it, the user's password)."""
    password = f"kbroker{uuid.uuid4().hex[:10]}"
    port = stable_port(span=3)  # PLAINTEXT, the controller (port + 1), SASL_PLAINTEXT
    sasl_port = port + 2
    env = {**os.environ, "KAFKA_PORT": str(port), "KAFKA_DATA": str(tmp_path / "kafka"),
           "KAFKA_SASL_PORT": str(sasl_port), "KAFKA_SASL_USERS": f"{KAFKA_USER}={password}"}
    script = str(ROOT / "scripts/kafka.sh")
    started = subprocess.run(["bash", script, "start"], env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        yield f"127.0.0.1:{sasl_port}", env, password
    finally:
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True, timeout=120)


def _refused_with_a_wrong_token(port: int, ca: Path) -> grpc.StatusCode:
    creds = grpc.ssl_channel_credentials(ca.read_bytes())
    b = BatchBuilder("sec-000", "boot", 1, time.time_ns() - 10**9, time.time_ns(), {})
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        call = channel.stream_stream("/stratoscope.v1.Ingest/Stream", request_serializer=lambda x: x,
                                     response_deserializer=ingest_pb2.Ack.FromString)
        try:
            list(call(iter([b.build().SerializeToString()]),
                      metadata=(("authorization", "Bearer " + "0" * 64),), timeout=30))
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.kafka
def test_a_running_regional_whose_kafka_goes_away_shows_no_secret(
        tmp_path: Path, sasl_broker: tuple[str, dict[str, str], str]) -> None:
    bootstrap, broker_env, broker_password = sasl_broker
    planted = Planted(tmp_path / "pki")
    planted.kafka_yaml = broker_password  # the settings file holds the broker's real password
    metrics_port = free_port()
    settings = _settings(tmp_path / "regional.yaml", planted, tmp_path, metrics_port=metrics_port,
                         metrics_addr="127.0.0.1", clickhouse=None,
                         kafka={"bootstrap": bootstrap, "security_protocol": "SASL_PLAINTEXT",
                                "sasl_username": KAFKA_USER, "sasl_password": broker_password,
                                "request_timeout": "5s", "topic_prefix": f"sec-{uuid.uuid4().hex[:8]}",
                                "dead_letter_dir": str(tmp_path / "dead-letter")})
    port = int(yaml.safe_load(settings.read_text())["listen"].rsplit(":", 1)[1])
    log = tmp_path / "regional.log"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stratoscope.cli", "-v", "regional", "--config",
                                 str(settings)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    fleet: SyntheticFleet | None = None
    try:
        def listening() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for("the regional to listen", listening, 120, every_s=0.1)
        fleet = SyntheticFleet("sec", 1, [f"127.0.0.1:{port}"], interval_s=0.5,
                               tls=ClientTls(planted.pki / "ca.crt"), token_file=planted.token_file)
        fleet.start()
        assert _refused_with_a_wrong_token(port, planted.pki / "ca.crt") == grpc.StatusCode.UNAUTHENTICATED

        def delivered() -> float:
            return _sample(_scrape(metrics_url), 'stratoscope_regional_sink_delivered_blocks_total{sink="kafka"}')

        wait_for("blocks delivered to Kafka over SASL", delivered, 120)
        halted = subprocess.run(["bash", str(ROOT / "scripts/kafka.sh"), "halt"], env=broker_env,
                                capture_output=True, text=True, timeout=120)
        assert halted.returncode == 0, halted.stderr[-2000:]
        failing = re.compile(r"sink kafka: delivery of \d+ block\(s\) failed")
        wait_for("a failed Kafka delivery in the log", lambda: failing.search(log.read_text()), 180)
        metrics = _scrape(metrics_url)
        assert _sample(metrics, 'stratoscope_regional_sink_retried_total{sink="kafka"}') > 0
        assert _sample(metrics, 'stratoscope_regional_refused_total{reason="bad_token"}') >= 1
        status = _stratoscope("status", "--regional", metrics_url)
        assert status.returncode == 0 and "kafka" in status.stdout, status.stdout + status.stderr
        stats = fleet.stop(ack_timeout_s=120)
        fleet = None
        assert stats["acked"] > 0, stats
    finally:
        if fleet is not None:
            fleet.stop(ack_timeout_s=5)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
        wait_for("the regional's children to exit", lambda: not _group_alive(proc.pid), 30, every_s=0.1)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "Authenticated as stratoscope via PLAIN" in text  # the password from the file reached the broker
    for where, shown in (("the regional's log", text), ("/metrics", metrics), ("stratoscope status",
                         status.stdout + status.stderr)):
        planted.assert_absent(where, shown)
    for letter in (tmp_path / "dead-letter").glob("*.json"):
        planted.assert_absent(str(letter), letter.read_text())
    with pytest.raises(AssertionError, match="secrets"):  # the search finds what is there
        planted.assert_absent("the settings file", settings.read_text() + planted.key.read_text())


def _scrape(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()  # type: ignore[no-any-return]


def _sample(text: str, key: str) -> float:
    """The value of the sample written ``key`` (name and labels as on the page), else 0."""
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
