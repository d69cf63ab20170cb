"""Credentials for a fleet: a CA with server and node certificates, or bearer tokens.

``stratoscope certs DIR --server NAME --node NODE ...`` makes (or reuses) ``DIR/ca.crt``
and ``DIR/ca.key`` and issues, signed by it:

- ``<server>.crt``/``.key``: a regional's certificate, extendedKeyUsage serverAuth,
  subjectAltName the server name (DNS), any ``--server-ip`` and 127.0.0.1;
- ``<node>.crt``/``.key`` per node: extendedKeyUsage clientAuth, subjectAltName
  ``DNS:<node>`` (regional/auth.py: the node_id such a client may send as).

``stratoscope tokens DIR NODE ...`` writes ``DIR/tokens`` (the regional's
``auth_tokens`` file, ``<node> <token>`` lines; existing nodes keep their token) and
``DIR/<node>.token`` per node (the edge's ``auth_token_file``).

Keys are ECDSA P-256; private keys and token files are written 0600. This is a tool for
test fleets and small sites: a large site issues node certificates from its own PKI.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Issued", "add_parser", "issue_certificates", "issue_tokens"]

Issued = list[Path]


def _write(path: Path, data: bytes, private: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(directory: Path, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bool]:
    """The CA in ``directory``, made if absent; (certificate, key, made now)."""
    crt, key_path = directory / "ca.crt", directory / "ca.key"
    if crt.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: not an ECDSA key")
        return cert, key, False
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name("stratoscope fleet CA")).issuer_name(_name("stratoscope fleet CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(key_path, _key_pem(key), private=True)
    _write(crt, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return cert, key, True


def _leaf(directory: Path, name: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier,
          ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, days: int) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    crt, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    _write(key_path, _key_pem(key), private=True)
    _write(crt, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return [crt, key_path]


def _safe(name: str, what: str) -> str:
    if not name or "/" in name or name.startswith(".") or len(name) > 253:
        raise ValueError(f"{what} {name!r}: 1-253 characters, no '/', not starting with '.'")
    return name


def issue_certificates(directory: Path, servers: Iterable[str] = (), server_ips: Iterable[str] = (),
                       nodes: Iterable[str] = (), days: int = 397) -> tuple[Issued, bool]:
    """Make (or reuse) the CA in ``directory`` and issue the certificates named; returns
    (files written, whether the CA was made now). See the module docstring."""
    directory.mkdir(parents=True, exist_ok=True)
    servers, nodes = [_safe(s, "server") for s in servers], [_safe(n, "node") for n in nodes]
    ips = [ipaddress.ip_address(ip) for ip in server_ips]
    ca, ca_key, made = _ca(directory, days)
    written: Issued = [directory / "ca.crt", directory / "ca.key"] if made else []
    for server in servers:
        sans: list[x509.GeneralName] = [x509.DNSName(server)]
        if server != "localhost":
            sans.append(x509.DNSName("localhost"))
        sans += [x509.IPAddress(ip) for ip in [*ips, ipaddress.ip_address("127.0.0.1")]]
        written += _leaf(directory, server, list(dict.fromkeys(sans)), ExtendedKeyUsageOID.SERVER_AUTH,
                         ca, ca_key, days)
    for node in nodes:
        written += _leaf(directory, node, [x509.DNSName(node)], ExtendedKeyUsageOID.CLIENT_AUTH,
                         ca, ca_key, days)
    return written, made


def issue_tokens(directory: Path, nodes: Iterable[str]) -> Issued:
    """Add a token per node to ``directory/tokens`` (nodes already there keep theirs)
    and write ``directory/<node>.token``; returns the files written."""
    from stratoscope.regional.auth import parse_tokens

    directory.mkdir(parents=True, exist_ok=True)
    table_path = directory / "tokens"
    lines: dict[str, str] = {}
    if table_path.exists():
        text = table_path.read_text()
        parse_tokens(text, str(table_path))  # refuse to extend a broken file
        for raw in text.splitlines():
            fields = raw.split("#", 1)[0].split()
            if len(fields) == 2:
                lines[fields[0]] = fields[1]
    written: Issued = []
    for node in (_safe(n, "node") for n in nodes):
        token = lines.setdefault(node, secrets.token_hex(32))
        _write(directory / f"{node}.token", (token + "\n").encode(), private=True)
        written.append(directory / f"{node}.token")
    body = "# <node_id> <token>: stratoscope regional --auth-tokens (regional/auth.py)\n"
    body += "".join(f"{n} {t}\n" for n, t in lines.items())
    _write(table_path, body.encode(), private=True)
    return [table_path, *written]


def add_parser(sub: Any) -> None:
    """``stratoscope certs`` and ``stratoscope tokens`` (see the module docstring)."""
    c = sub.add_parser("certs", help="make a CA and regional/node certificates for a fleet (mTLS)")
    c.add_argument("directory", type=Path, help="where the CA is (made if absent) and certificates go")
    c.add_argument("--server", action="append", default=[], metavar="NAME",
                   help="a regional's certificate, for this DNS name (repeatable)")
    c.add_argument("--server-ip", action="append", default=[], metavar="IP",
                   help="an address the regional's certificates are also valid for (repeatable)")
    c.add_argument("--node", action="append", default=[], metavar="NODE_ID",
                   help="a node's client certificate, for this node_id (repeatable)")
    c.add_argument("--days", type=int, default=397, help="validity of what is made (default 397)")
    c.set_defaults(func=_run_certs)
    t = sub.add_parser("tokens", help="bearer tokens per node (the alternative to node certificates)")
    t.add_argument("directory", type=Path, help="where the tokens file and <node>.token files go")
    t.add_argument("nodes", nargs="+", metavar="NODE_ID")
    t.set_defaults(func=_run_tokens)


def _run_certs(args: argparse.Namespace) -> int:
    from stratoscope.settings import ConfigError

    if not args.server and not args.node and (args.directory / "ca.crt").exists():
        raise ConfigError("nothing to issue: give --server NAME and/or --node NODE_ID")
    try:
        written, made = issue_certificates(args.directory, args.server, args.server_ip, args.node,
                                           args.days)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(("made a new CA; " if made else f"using the CA in {args.directory}; ")
          + f"wrote {len(written)} files:")
    for p in written:
        print(f"  {p}")
    return 0


def _run_tokens(args: argparse.Namespace) -> int:
    from stratoscope.settings import ConfigError

    try:
        written = issue_tokens(args.directory, args.nodes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(f"wrote {len(written)} files (regional: --auth-tokens {written[0]}; "
          "each edge: --auth-token-file <its .token>):")
    for p in written:
        print(f"  {p}")
    return 0
