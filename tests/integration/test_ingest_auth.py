"""Who may send: mTLS (node identity from the client certificate) and bearer tokens,
against a real regional storing into embedded ClickHouse. Refused clients store nothing
and are counted on the regional, those refused in the TLS handshake too; a good client on
the same regional keeps flowing with exact totals; credentials are re-read without a
restart."""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stratoscope.edge.batch import BatchBuilder
from stratoscope.edge.forward import ClientTls, GrpcForwarder
from stratoscope.pki import issue_certificates, issue_tokens
from stratoscope.regional.app import RunningRegional
from stratoscope.regional.auth import REFUSALS
from stratoscope.regional.config import RegionalConfig, TlsSettings
from stratoscope.regional.handshakes import REASONS
from stratoscope.regional.sinks.config import ClickHouseSettings
from stratoscope.v1 import batch_pb2 as pb
from stratoscope.v1 import ingest_pb2
from tests.conftest import free_port, wait_for
from tests.integration.regional_proc import RegionalProcess, read_metrics

READS_PER_BATCH = 7
GOOD_BATCHES = 40


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fleet CA with a regional certificate (localhost, 127.0.0.1) and node-a, node-b;
    a second CA that also issued a node-a; a node-a the fleet CA issued that expired
    yesterday; tokens for node-t and node-u."""
    d = tmp_path_factory.mktemp("pki")
    issue_certificates(d, servers=["localhost"], nodes=["node-a", "node-b"], days=2)
    issue_certificates(d / "other", nodes=["node-a"], days=2)
    _expired(d, "node-a", d / "expired")
    issue_tokens(d / "tokens", ["node-t", "node-u"])
    return d


def _expired(ca_dir: Path, node: str, out: Path) -> None:
    """``out/<node>.crt``/``.key``: a client certificate of ``ca_dir``'s CA, valid from three
    days ago until yesterday."""
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=3))
            .not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out.mkdir()
    (out / f"{node}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (out / f"{node}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _batch(node: str, seq: int, boot: str = "boot") -> pb.Batch:
    now = time.time_ns()
    b = BatchBuilder(node, boot, seq, now - 10**9, now, {})
    b.add_counters("syscalls_total", "calls", "", ["syscall"], {("read",): READS_PER_BATCH})
    return b.build()


def _regional(tmp: Path, metrics_port: int = 0, **auth: Any) -> RunningRegional:
    db = f"auth_{uuid.uuid4().hex[:10]}"
    return RunningRegional(RegionalConfig(
        listen="127.0.0.1:0", metrics_port=metrics_port, metrics_addr="127.0.0.1", query_listen=None,
        wal_dir=tmp / "wal", clickhouse=ClickHouseSettings(dsn=f"chdb://{tmp}/ch", database=db), **auth))


def _raw(port: int, creds: grpc.ChannelCredentials | None, batch: pb.Batch,
         token: str | None = None) -> tuple[grpc.StatusCode, list[ingest_pb2.Ack]]:
    """One stream, one batch, as a client that does not retry: (how the stream ended, acks).
    A connection of its own: gRPC would share one among channels to the same target (a
    plaintext client's, at least), and the server would see one handshake for many."""
    target = f"127.0.0.1:{port}"
    options = [("grpc.use_local_subchannel_pool", 1)]
    channel = (grpc.secure_channel(target, creds, options) if creds is not None
               else grpc.insecure_channel(target, options))
    with channel:
        call = channel.stream_stream("/stratoscope.v1.Ingest/Stream",
                                     request_serializer=lambda b: b,
                                     response_deserializer=ingest_pb2.Ack.FromString)
        metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
        try:
            acks = list(call(iter([batch.SerializeToString()]), metadata=metadata, timeout=30))
        except grpc.RpcError as exc:
            return exc.code(), []
    return grpc.StatusCode.OK, acks


def _creds(pki: Path, node: str | None = None, ca: Path | None = None, where: Path | None = None
           ) -> grpc.ChannelCredentials:
    where = where or pki
    return grpc.ssl_channel_credentials(
        (ca or pki / "ca.crt").read_bytes(),
        private_key=(where / f"{node}.key").read_bytes() if node else None,
        certificate_chain=(where / f"{node}.crt").read_bytes() if node else None)


class GoodEdge:
    """A real edge forwarder sending GOOD_BATCHES batches, one every 50 ms, the whole
    time the hostile clients try their luck."""

    def __init__(self, port: int, node: str, tls: ClientTls, token_file: Path | None = None) -> None:
        self.fwd = GrpcForwarder([f"127.0.0.1:{port}"], tls=tls, backoff_initial_s=0.2,
                                 token_file=token_file)
        self.node = node
        self._thread = threading.Thread(target=self._run, name="good-edge")

    def _run(self) -> None:
        for seq in range(1, GOOD_BATCHES + 1):
            self.fwd.write(_batch(self.node, seq))
            time.sleep(0.05)  # pacing the workload, not waiting for a condition

    def __enter__(self) -> GoodEdge:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join()
        self.fwd.close(60)


async def _stored(regional: RunningRegional) -> dict[str, int]:
    await regional.drain()
    db = regional.config.clickhouse.database  # type: ignore[union-attr]
    rows = await regional.sink("clickhouse").query(
        f"SELECT node, sum(value) FROM {db}.metrics WHERE metric = 'syscalls_total' "
        "AND labels['syscall'] = 'read' AND node != '' GROUP BY node ORDER BY node")
    return {n: int(v) for n, v in rows}


def _sample(regional: RunningRegional, name: str, **labels: str) -> float:
    return regional.regional.registry.get_sample_value(name, labels) or 0.0


def _metrics(port: int) -> dict[str, float]:
    """The regional's /metrics as served, ``name{labels}`` -> value."""
    return read_metrics(port)


HANDSHAKES = "stratoscope_regional_tls_handshakes_refused_total"


def _handshakes(metrics: dict[str, float]) -> dict[str, float]:
    """``tls_handshakes_refused_total`` by reason."""
    prefix = HANDSHAKES + '{reason="'
    return {k[len(prefix):-2]: v for k, v in metrics.items() if k.startswith(prefix)}


@pytest.fixture
async def mtls(tmp_path: Path, pki: Path) -> AsyncIterator[RunningRegional]:
    regional = _regional(tmp_path, tls=TlsSettings(cert=pki / "localhost.crt", key=pki / "localhost.key",
                                                   client_ca=pki / "ca.crt"))
    await regional.start()
    try:
        yield regional
    finally:
        await regional.stop()


async def test_mtls_refuses_strangers_and_impostors_while_a_good_node_flows(
        mtls: RunningRegional, pki: Path) -> None:
    port = mtls.port
    with GoodEdge(port, "node-a", ClientTls(pki / "ca.crt", pki / "node-a.crt", pki / "node-a.key")) as good:
        # no client certificate, and a certificate from another CA: the handshake fails
        no_cert = await asyncio.to_thread(_raw, port, _creds(pki), _batch("node-a", 10_001, "x"))
        other_ca = await asyncio.to_thread(_raw, port, _creds(pki, "node-a", where=pki / "other"),
                                           _batch("node-a", 10_002, "x"))
        # plaintext to a TLS port
        plain = await asyncio.to_thread(_raw, port, None, _batch("node-a", 10_003, "x"))
        # a valid certificate (node-b) claiming node-a: PERMISSION_DENIED, counted
        impostor = await asyncio.to_thread(_raw, port, _creds(pki, "node-b"), _batch("node-a", 10_004, "x"))
    assert no_cert[0] == other_ca[0] == plain[0] == grpc.StatusCode.UNAVAILABLE
    assert impostor == (grpc.StatusCode.PERMISSION_DENIED, [])
    assert (good.fwd.stats.acked, good.fwd.stats.rejected) == (GOOD_BATCHES, 0)
    # node-b with its own node_id is welcome
    assert (await asyncio.to_thread(_raw, port, _creds(pki, "node-b"), _batch("node-b", 1)))[1][0].status \
        == ingest_pb2.Ack.ACCEPTED
    assert await _stored(mtls) == {"node-a": GOOD_BATCHES * READS_PER_BATCH, "node-b": READS_PER_BATCH}
    assert _sample(mtls, "stratoscope_regional_refused_total", reason="node_mismatch") == 1
    assert _sample(mtls, "stratoscope_regional_batches_total", status="accepted") == GOOD_BATCHES + 1
    assert _sample(mtls, "stratoscope_regional_insecure") == 0


#: Strangers refused in the TLS handshake, by what they present.
NO_CERT, OTHER_CA, EXPIRED, PLAINTEXT = 5, 4, 3, 6


async def test_refused_handshakes_are_counted_exactly_on_metrics_while_a_good_node_flows(
        tmp_path: Path, pki: Path, capfd: pytest.CaptureFixture[str]) -> None:
    metrics_port = free_port()
    regional = _regional(tmp_path, metrics_port,
                         tls=TlsSettings(cert=pki / "localhost.crt", key=pki / "localhost.key",
                                         client_ca=pki / "ca.crt"))
    await regional.start()
    expected = {"no_certificate": NO_CERT, "unknown_ca": OTHER_CA, "expired": EXPIRED,
                "not_tls": PLAINTEXT, "other": 0}
    try:
        port = regional.port
        before = _metrics(metrics_port)
        assert before["stratoscope_regional_tls_handshakes_counted"] == 1
        assert _handshakes(before) == dict.fromkeys(REASONS, 0)
        strangers = ([_creds(pki)] * NO_CERT + [_creds(pki, "node-a", where=pki / "other")] * OTHER_CA
                     + [_creds(pki, "node-a", where=pki / "expired")] * EXPIRED + [None] * PLAINTEXT)
        with GoodEdge(port, "node-a", ClientTls(pki / "ca.crt", pki / "node-a.crt", pki / "node-a.key")) as good:
            results = await asyncio.gather(*(
                asyncio.to_thread(_raw, port, creds, _batch("node-a", 20_000 + i, "x"))
                for i, creds in enumerate(strangers)))
        assert [code for code, _ in results] == [grpc.StatusCode.UNAVAILABLE] * len(strangers)
        # each stranger saw its refusal, so gRPC had written its line: the count follows
        await asyncio.to_thread(
            wait_for, "the refused handshakes on /metrics",
            lambda: sum(_handshakes(_metrics(metrics_port)).values()) >= sum(expected.values()), 30, 0.1)
        after = _metrics(metrics_port)
        assert _handshakes(after) == expected
        # the good node was never refused, and its totals are exact
        assert (good.fwd.stats.acked, good.fwd.stats.rejected) == (GOOD_BATCHES, 0)
        assert await _stored(regional) == {"node-a": GOOD_BATCHES * READS_PER_BATCH}
        after = _metrics(metrics_port)
        assert after['stratoscope_regional_batches_total{status="accepted"}'] == GOOD_BATCHES
        assert {r: after[f'stratoscope_regional_refused_total{{reason="{r}"}}'] for r in REFUSALS} \
            == dict.fromkeys(REFUSALS, 0)
        assert _handshakes(after) == expected  # nothing more: the good node's handshakes count none
        held_back = after["stratoscope_regional_tls_handshake_log_lines_held_back_total"]
        assert after["stratoscope_regional_ingest_stderr_dropped_bytes_total"] == 0
    finally:
        await regional.stop()
    _assert_lines_shown_or_noted(capfd.readouterr().err, sum(expected.values()), held_back)


def _state(pid: int) -> str:
    """A process's state letter (R, S, T for stopped...), from /proc."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _assert_lines_shown_or_noted(err: str, refused: int, held_back: float) -> int:
    """Every line gRPC wrote about a refused handshake reached stderr or was held back, and
    those held back were noted; returns how many were shown."""
    shown = sum(1 for line in err.splitlines() if "] Handshake failed with error" in line)
    assert shown + held_back == refused, err[-3000:]
    noted = sum(int(line.split(" more TLS handshakes refused")[0].rsplit(" ", 1)[1])
                for line in err.splitlines() if " more TLS handshakes refused (" in line)
    assert noted == held_back, err[-3000:]
    return shown


#: What a plaintext gRPC client sends first (HTTP/2's connection preface).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FLOOD = 2000


def _plaintext_clients(port: int, n: int) -> None:
    """``n`` connections, one after another, each sending what a plaintext gRPC client
    sends and reading until the regional closes it (by then gRPC has written its line)."""
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(H2_PREFACE)
            while s.recv(4096):
                pass


async def test_a_flood_of_refused_handshakes_is_counted_exactly_and_costs_the_log_a_few_lines(
        tmp_path: Path, pki: Path, capfd: pytest.CaptureFixture[str]) -> None:
    metrics_port = free_port()
    regional = _regional(tmp_path, metrics_port,
                         tls=TlsSettings(cert=pki / "localhost.crt", key=pki / "localhost.key",
                                         client_ca=pki / "ca.crt"))
    await regional.start()
    try:
        port = regional.port
        with GoodEdge(port, "node-a", ClientTls(pki / "ca.crt", pki / "node-a.crt", pki / "node-a.key")) as good:
            await asyncio.gather(*(asyncio.to_thread(_plaintext_clients, port, FLOOD // 4) for _ in range(4)))
        await asyncio.to_thread(
            wait_for, "the flood on /metrics",
            lambda: _handshakes(_metrics(metrics_port))["not_tls"] >= FLOOD, 60, 0.1)
        assert (good.fwd.stats.acked, good.fwd.stats.rejected) == (GOOD_BATCHES, 0)
        assert await _stored(regional) == {"node-a": GOOD_BATCHES * READS_PER_BATCH}
        after = _metrics(metrics_port)
        assert _handshakes(after) == {**dict.fromkeys(REASONS, 0), "not_tls": FLOOD}
        held_back = after["stratoscope_regional_tls_handshake_log_lines_held_back_total"]
        assert after["stratoscope_regional_ingest_stderr_dropped_bytes_total"] == 0
    finally:
        await regional.stop()
    # one line per 10 s, and a note of how many were held back
    assert _assert_lines_shown_or_noted(capfd.readouterr().err, FLOOD, held_back) <= 6


async def test_what_a_killed_ingest_process_left_on_stderr_is_passed_on_and_counted(
        tmp_path: Path, pki: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The ingest process's tap dies with it; the regional reads what was left in the pipe:
    here, lines written to the process's stderr while it was stopped, before a SIGKILL."""
    regional = _regional(tmp_path, tls=TlsSettings(cert=pki / "localhost.crt", key=pki / "localhost.key",
                                                   client_ca=pki / "ca.crt"))
    await regional.start()
    try:
        proc = regional._ingest._proc
        assert proc is not None and proc.pid is not None
        os.kill(proc.pid, signal.SIGSTOP)  # its tap reads nothing once it is stopped
        pid = proc.pid
        await asyncio.to_thread(wait_for, "the ingest process to stop",
                                lambda: _state(pid) == "T", 30, 0.01)
        line = ("I1207 21:19:06.541471    9138 ssl_transport_security.cc:2563] Handshake failed with "
                "error SSL_ERROR_SSL: error:100000c0:SSL routines:OPENSSL_internal:"
                "PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid certificate verification context\n")
        with open(f"/proc/{proc.pid}/fd/2", "w") as stderr:  # the pipe's write end
            stderr.write(line * 3 + "the last words of a crash\n")
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(regional.failed.wait(), 60)
        await asyncio.to_thread(
            wait_for, "the leftover lines counted",
            lambda: _sample(regional, HANDSHAKES, reason="no_certificate") >= 3, 30, 0.1)
        assert _sample(regional, HANDSHAKES, reason="no_certificate") == 3
    finally:
        await regional.stop()
    err = capfd.readouterr().err
    assert err.count(line) == 3 and "the last words of a crash\n" in err, err[-3000:]


@pytest.mark.parametrize("verbosity", ["ERROR", "NONE"])
async def test_refused_handshakes_are_counted_whatever_grpc_verbosity_says(
        tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str], verbosity: str) -> None:
    """At GRPC_VERBOSITY=ERROR (the CLI's default) or NONE gRPC writes no INFO line: the
    ingest process imports gRPC without it, counts, and shows gRPC's lines as the verbosity
    asked (ERROR: the lines about refused handshakes only; NONE: none)."""
    monkeypatch.setenv("GRPC_VERBOSITY", verbosity)
    metrics_port = free_port()
    regional = _regional(tmp_path, metrics_port,
                         tls=TlsSettings(cert=pki / "localhost.crt", key=pki / "localhost.key",
                                         client_ca=pki / "ca.crt"))
    await regional.start()
    try:
        assert _metrics(metrics_port)["stratoscope_regional_tls_handshakes_counted"] == 1
        for _ in range(3):
            assert (await asyncio.to_thread(_raw, regional.port, _creds(pki), _batch("node-a", 1)))[0] \
                == grpc.StatusCode.UNAVAILABLE
        assert (await asyncio.to_thread(_raw, regional.port, _creds(pki, "node-a"), _batch("node-a", 1)))[0] \
            == grpc.StatusCode.OK
        await asyncio.to_thread(
            wait_for, "the refused handshakes on /metrics",
            lambda: _handshakes(_metrics(metrics_port))["no_certificate"] >= 3, 30, 0.1)
        assert _handshakes(_metrics(metrics_port)) == {**dict.fromkeys(REASONS, 0), "no_certificate": 3}
    finally:
        await regional.stop()
    err = capfd.readouterr().err
    grpc_lines = [line for line in err.splitlines() if re.match(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ", line)]
    if verbosity == "ERROR":  # the first one, the rest held back and noted
        assert len(grpc_lines) == 1 and "PEER_DID_NOT_RETURN_A_CERTIFICATE" in grpc_lines[0], err[-3000:]
        assert " 2 more TLS handshakes refused (no_certificate)" in err, err[-3000:]
    else:
        assert grpc_lines == [] and "more TLS handshakes refused" not in err, err[-3000:]


def test_a_regional_run_by_the_command_counts_refused_handshakes(tmp_path: Path, pki: Path) -> None:
    """``stratoscope regional``, as a service runs it (the CLI sets GRPC_VERBOSITY=ERROR)."""
    regional = RegionalProcess(tmp_path, "--tls-cert", str(pki / "localhost.crt"), "--tls-key",
                               str(pki / "localhost.key"), "--tls-client-ca", str(pki / "ca.crt"),
                               secure=True)
    regional.start()
    try:
        metrics = wait_for("the regional's /metrics", lambda: _served(regional), 60, 0.1)
        assert metrics["stratoscope_regional_tls_handshakes_counted"] == 1
        for creds in (_creds(pki), _creds(pki), None, _creds(pki, "node-a", where=pki / "other")):
            assert _raw(regional.port, creds, _batch("node-a", 1))[0] == grpc.StatusCode.UNAVAILABLE
        assert _raw(regional.port, _creds(pki, "node-a"), _batch("node-a", 1))[0] == grpc.StatusCode.OK
        wait_for("the refused handshakes on /metrics",
                 lambda: sum(_handshakes(regional.metrics()).values()) >= 4, 30, 0.1)
        assert _handshakes(regional.metrics()) == {**dict.fromkeys(REASONS, 0), "no_certificate": 2,
                                                   "not_tls": 1, "unknown_ca": 1}
    finally:
        assert regional.stop() == 0
    log = regional.tail(100_000)
    assert log.count("] Handshake failed with error") == 3, log[-3000:]  # one per reason
    assert " 1 more TLS handshakes refused (no_certificate)" in log, log[-3000:]


def _served(regional: RegionalProcess) -> dict[str, float] | None:
    try:
        return regional.metrics()
    except OSError:
        return None


@pytest.fixture
def token_dir(tmp_path: Path, pki: Path) -> Path:
    d = tmp_path / "tokens"
    shutil.copytree(pki / "tokens", d)
    return d


async def test_tokens_refuse_missing_wrong_and_borrowed_tokens_and_reload(
        tmp_path: Path, pki: Path, token_dir: Path) -> None:
    regional = _regional(tmp_path, tls=TlsSettings(cert=pki / "localhost.crt", key=pki / "localhost.key"),
                         auth_tokens=token_dir / "tokens")
    await regional.start()
    try:
        port = regional.port
        tls = ClientTls(pki / "ca.crt")  # trusts the regional; no client certificate
        server_only = _creds(pki)
        with GoodEdge(port, "node-t", tls, token_file=token_dir / "node-t.token") as good:
            missing = await asyncio.to_thread(_raw, port, server_only, _batch("node-t", 10_001, "x"))
            wrong = await asyncio.to_thread(_raw, port, server_only, _batch("node-t", 10_002, "x"),
                                            token="f" * 64)
            borrowed = await asyncio.to_thread(_raw, port, server_only, _batch("node-t", 10_003, "x"),
                                               token=(token_dir / "node-u.token").read_text().strip())
        assert missing == wrong == (grpc.StatusCode.UNAUTHENTICATED, [])
        assert borrowed == (grpc.StatusCode.PERMISSION_DENIED, [])
        assert (good.fwd.stats.acked, good.fwd.stats.rejected) == (GOOD_BATCHES, 0)
        for reason in ("no_credentials", "bad_token", "node_mismatch"):
            assert _sample(regional, "stratoscope_regional_refused_total", reason=reason) == 1, reason

        # a node added to the token file gets in without a restart
        issue_tokens(token_dir, ["node-v"])
        token_v = (token_dir / "node-v.token").read_text().strip()
        deadline = time.monotonic() + 30
        while True:
            code, acks = await asyncio.to_thread(_raw, port, server_only, _batch("node-v", 1), token=token_v)
            if code == grpc.StatusCode.OK:
                break
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert time.monotonic() < deadline, "the new token was not taken within 30 s"
            await asyncio.sleep(0.2)
        assert [a.status for a in acks] == [ingest_pb2.Ack.ACCEPTED]
        assert await _stored(regional) == {"node-t": GOOD_BATCHES * READS_PER_BATCH,
                                           "node-v": READS_PER_BATCH}
    finally:
        await regional.stop()


async def test_a_rotated_certificate_and_ca_apply_without_a_restart(tmp_path: Path, pki: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    for name in ("localhost.crt", "localhost.key", "ca.crt"):
        shutil.copy(pki / name, live / name)
    regional = _regional(tmp_path, tls=TlsSettings(cert=live / "localhost.crt", key=live / "localhost.key",
                                                   client_ca=live / "ca.crt"))
    await regional.start()
    try:
        port = regional.port
        assert (await asyncio.to_thread(_raw, port, _creds(pki, "node-a"), _batch("node-a", 1)))[0] \
            == grpc.StatusCode.OK
        # a new CA for the whole fleet: regional certificate, key and client CA replaced
        new = tmp_path / "new-ca"
        issue_certificates(new, servers=["localhost"], nodes=["node-a"], days=2)
        for name in ("localhost.crt", "localhost.key", "ca.crt"):
            shutil.copy(new / name, live / (name + ".tmp"))
            (live / (name + ".tmp")).replace(live / name)
        deadline = time.monotonic() + 30
        while (code := (await asyncio.to_thread(
                _raw, port, _creds(new, "node-a"), _batch("node-a", 2)))[0]) != grpc.StatusCode.OK:
            assert code == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() < deadline, "the rotated certificate was not served within 30 s"
            await asyncio.sleep(0.2)
        # the old CA's nodes are out
        old = await asyncio.to_thread(_raw, port, _creds(pki, "node-a"), _batch("node-a", 3))
        assert old[0] == grpc.StatusCode.UNAVAILABLE
        assert await _stored(regional) == {"node-a": 2 * READS_PER_BATCH}
    finally:
        await regional.stop()


def test_an_insecure_regional_says_so(tmp_path: Path) -> None:
    regional = _regional(tmp_path, insecure=True)
    assert _sample(regional, "stratoscope_regional_insecure") == 1


def test_an_unauthenticated_configuration_is_refused_before_anything_starts(tmp_path: Path,
                                                                            pki: Path) -> None:
    with pytest.raises(ValueError, match="the ingest port needs TLS and authenticated edges"):
        _regional(tmp_path)
    with pytest.raises(ValueError, match="edges are not authenticated"):
        _regional(tmp_path, tls=TlsSettings(cert=pki / "localhost.crt", key=pki / "localhost.key"))
