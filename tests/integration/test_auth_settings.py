"""Half-configured TLS and authentication, on the command line of `stratoscope regional`
and `stratoscope edge`: one line naming the fix, exit 2, nothing started; and the
`certs`/`tokens` commands' files work together."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stratoscope.regional.auth import parse_tokens

CLI = [sys.executable, "-m", "stratoscope.cli"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    r = subprocess.run([*CLI, "certs", str(d), "--server", "regional1", "--node", "node-a"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*CLI, "tokens", str(d), "node-a"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return d


def _one_line_exit_2(argv: list[str]) -> str:
    r = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize(("flags", "message"), [
    ([], "the ingest port needs TLS and authenticated edges: set tls.cert, tls.key and tls.client_ca "
         "or auth_tokens (--tls-cert, --tls-key, --tls-client-ca or --auth-tokens), or insecure: true "
         "(--insecure) on a trusted network"),
    (["--tls-cert", "{d}/regional1.crt", "--tls-key", "{d}/regional1.key"],
     "edges are not authenticated: set tls.client_ca (--tls-client-ca, mTLS) or auth_tokens "
     "(--auth-tokens), or insecure: true (--insecure) on a trusted network"),
    (["--auth-tokens", "{d}/tokens"],
     "auth_tokens need TLS (a token in plaintext can be read off the network): set tls.cert and "
     "tls.key (--tls-cert, --tls-key), or insecure: true (--insecure) on a trusted network"),
    (["--tls-client-ca", "{d}/ca.crt"],
     "setting 'tls' on the command line (--tls-client-ca): tls.client_ca needs tls.cert and tls.key "
     "(the server's certificate)"),
    (["--tls-cert", "{d}/regional1.crt"],
     "setting 'tls' on the command line (--tls-cert): tls.cert and tls.key go together"),
    (["--tls-cert", "{d}/regional1.crt", "--tls-key", "{d}/regional1.key", "--tls-client-ca",
      "{d}/ca.crt", "--auth-tokens", "{d}/tokens"],
     "tls.client_ca and auth_tokens are two ways to authenticate edges: set one (mTLS or tokens) "
     "(on the command line)"),
])
def test_regional_half_configured_auth_is_one_line_exit_2(pki: Path, flags: list[str], message: str) -> None:
    argv = ["regional", "--clickhouse", "none", "--wal-dir", "none", *[f.format(d=pki) for f in flags]]
    assert _one_line_exit_2(argv) == f"stratoscope: error: {message}"


@pytest.mark.parametrize(("flags", "message"), [
    ([], "forwarding to a regional needs TLS: set tls_ca (--tls-ca) and tls_cert/tls_key or "
         "auth_token_file, or insecure: true (--insecure) on a trusted network"),
    (["--tls-cert", "{d}/node-a.crt", "--tls-key", "{d}/node-a.key"],
     "tls_cert and tls_key need tls_ca (--tls-ca: the CA that signed the regional's certificate)"),
    (["--tls-ca", "{d}/ca.crt", "--tls-cert", "{d}/node-a.crt"],
     "tls_cert and tls_key go together (--tls-cert, --tls-key)"),
    (["--tls-ca", "{d}/ca.crt", "--auth-token-file", "{d}/missing.token"],
     "auth_token_file '{d}/missing.token' is not a readable file"),
])
def test_edge_half_configured_tls_is_one_line_exit_2(pki: Path, flags: list[str], message: str) -> None:
    argv = ["edge", "--once", "--programs", "syscalls", "--metrics-port", "0",
            "--regional", "127.0.0.1:1", *[f.format(d=pki) for f in flags]]
    line = _one_line_exit_2(argv)
    assert line.startswith("stratoscope: error: "), line
    assert line.endswith(message.format(d=pki) + " (on the command line)"), line


def test_certs_and_tokens_files(pki: Path) -> None:
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(pki / "ca.crt"),
                             str(pki / "regional1.crt"), str(pki / "node-a.crt")],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName,extendedKeyUsage",
                           "-in", str(pki / "node-a.crt")], capture_output=True, text=True, check=True).stdout
    assert "DNS:node-a" in text and "TLS Web Client Authentication" in text
    for secret in ("ca.key", "node-a.key", "regional1.key", "tokens", "node-a.token"):
        assert (pki / secret).stat().st_mode & 0o777 == 0o600, secret
    table = parse_tokens((pki / "tokens").read_text(), "tokens")
    assert sorted(table.values()) == ["node-a"]
    # issuing again keeps the CA and node-a's token
    ca = (pki / "ca.crt").read_bytes()
    token = (pki / "node-a.token").read_text()
    subprocess.run([*CLI, "certs", str(pki), "--node", "node-b"], check=True, capture_output=True, timeout=60)
    subprocess.run([*CLI, "tokens", str(pki), "node-a", "node-b"], check=True, capture_output=True, timeout=60)
    assert (pki / "ca.crt").read_bytes() == ca
    assert (pki / "node-a.token").read_text() == token
    assert sorted(parse_tokens((pki / "tokens").read_text(), "tokens").values()) == ["node-a", "node-b"]
