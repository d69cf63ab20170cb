"""mTLS between edge and regional: node identity comes from the client certificate."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from stratoscope.edge.batch import BatchBuilder
from stratoscope.edge.forward import ClientTls, GrpcForwarder
from stratoscope.regional.app import RunningRegional
from stratoscope.regional.config import RegionalConfig, TlsSettings


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    for name, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
                      ("node-a", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.crt"))
    return d


@pytest.fixture
async def regional(pki: Path) -> AsyncIterator[RunningRegional]:
    config = RegionalConfig(
        listen="127.0.0.1:0", metrics_port=0, clickhouse=None, wal_dir=pki / "wal",
        tls=TlsSettings(cert=pki / "server.crt", key=pki / "server.key", client_ca=pki / "ca.crt"),
    )
    running = RunningRegional(config)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


def _batch(node: str) -> object:
    now = time.time_ns()
    b = BatchBuilder(node, "boot", 1, now - 10**9, now, {})
    b.add_counters("syscalls_total", "calls", "", ["syscall"], {("read",): 1})
    return b.build()


def _send(port: int, batch: object, tls: ClientTls | None, wait_s: float = 20) -> object:
    fwd = GrpcForwarder([f"127.0.0.1:{port}"], tls=tls, backoff_initial_s=0.2)
    fwd.write(batch)  # type: ignore[arg-type]
    fwd.close(wait_s)
    return fwd.stats


async def test_certificate_identity_must_match_node_id(regional: RunningRegional, pki: Path) -> None:
    tls = ClientTls(pki / "ca.crt", pki / "node-a.crt", pki / "node-a.key")
    ok = await asyncio.to_thread(_send, regional.port, _batch("node-a"), tls)
    assert (ok.acked, ok.rejected) == (1, 0)  # type: ignore[attr-defined]
    spoofed = await asyncio.to_thread(_send, regional.port, _batch("node-b"), tls)
    assert (spoofed.acked, spoofed.rejected) == (0, 1)  # type: ignore[attr-defined]
    await regional.drain()  # the ingest process has handed over every outcome
    rejected = regional.regional.registry.get_sample_value(
        "stratoscope_regional_rejected_batches_total", {"reason": "identity"})
    assert rejected == 1.0


async def test_client_without_certificate_gets_nothing_in(regional: RunningRegional, pki: Path) -> None:
    tls = ClientTls(pki / "ca.crt")  # trusts the server, presents no certificate
    stats = await asyncio.to_thread(_send, regional.port, _batch("node-a"), tls, 3)
    assert (stats.acked, stats.rejected) == (0, 0)  # type: ignore[attr-defined]
    await regional.drain()
    accepted = regional.regional.registry.get_sample_value(
        "stratoscope_regional_batches_total", {"status": "accepted"})
    assert accepted is None
