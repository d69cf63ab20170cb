"""Who an edge is: its client certificate or its bearer token, checked per stream.

The ingest server (regional/server.py) asks an ``Authenticator`` once per stream which
node names the client may send as; the gate then refuses a batch whose node_id is not
one of them. Two ways to authenticate, chosen by the settings (regional/config.py):

- **mTLS** (``tls.client_ca``): the TLS handshake verifies the client certificate
  against the CA (a client without one, or with one from another CA, never gets a
  request through: gRPC refuses the handshake, and regional/handshakes.py counts it). The
  names are the certificate's subjectAltName DNS and URI entries, or its CN when it has
  neither.
- **Tokens** (``auth_tokens``): a file of ``<node_id> <token>`` lines; a stream carries
  ``authorization: Bearer <token>`` and may send as that node_id only.

Both are re-read when their files change, at most once a second, without a restart: a
rotated certificate applies to the next handshake, a changed token file to the next
stream. A file that cannot be read or parsed keeps the previous contents, with one
error line per change (an operator's half-written file must not lock the fleet out).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("stratoscope.regional")

__all__ = [
    "MIN_TOKEN_CHARS",
    "REFUSALS",
    "Authenticator",
    "CertificateFiles",
    "Refused",
    "TokenTable",
    "parse_tokens",
    "peer_names",
]

#: Shortest token accepted in a token file: 128 bits as hex.
MIN_TOKEN_CHARS = 32
#: The label values of ``stratoscope_regional_refused_total`` (a fixed set).
REFUSALS = ("no_credentials", "bad_token", "node_mismatch")
#: Files are checked for changes at most this often.
RELOAD_CHECK_S = 1.0


class Refused(Exception):
    """A stream or batch refused for who sent it: ``reason`` is one of REFUSALS, ``code``
    the gRPC status the stream ends with."""

    def __init__(self, reason: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code


def peer_names(auth_context: dict[str, list[bytes]]) -> frozenset[str]:
    """The node names a verified client certificate vouches for: its subjectAltName DNS
    and URI entries, or its CN when it has neither (empty: no certificate)."""
    sans = [*auth_context.get("peer_dns", ()), *auth_context.get("peer_uri", ())]
    names = sans or list(auth_context.get("x509_common_name", ()))
    return frozenset(n.decode("utf-8", "replace") for n in names)


def _digest(token: str) -> bytes:
    # looked up by digest: a dict lookup on the digest reveals nothing of the token
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, source: str) -> dict[bytes, str]:
    """A token file's ``<node_id> <token>`` lines (``#`` comments and blank lines
    skipped) as digest -> node_id; ValueError naming the line and no field of it (with
    the columns swapped, the "node_id" would be the token)."""
    table: dict[bytes, str] = {}
    lines: dict[bytes, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{source} line {n}: expected '<node_id> <token>'")
        node, token = fields
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"{source} line {n}: the token (second field) is shorter than "
                             f"{MIN_TOKEN_CHARS} characters")
        digest = _digest(token)
        if digest in table:
            raise ValueError(f"{source} line {n}: the same token as line {lines[digest]}")
        table[digest] = node
        lines[digest] = n
    if not table:
        raise ValueError(f"{source}: no tokens")
    return table


class _Watched:
    """A file's contents, re-read when its (inode, size, mtime) changes."""

    def __init__(self, paths: tuple[Path, ...], clock: Callable[[], float] = time.monotonic) -> None:
        self.paths = paths
        self.clock = clock
        self._stamp: tuple[tuple[int, int, int], ...] | None = None
        self._checked = float("-inf")
        self._lock = threading.Lock()
        #: Times the files changed and were taken, and changes refused (kept the old).
        self.reloads = 0
        self.reload_errors = 0

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for p in self.paths:
            st = os.stat(p)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def changed(self) -> tuple[tuple[int, int, int], ...] | None:
        """The new stamp if the files changed since the last load (checked at most once
        per RELOAD_CHECK_S), else None."""
        now = self.clock()
        with self._lock:
            if now - self._checked < RELOAD_CHECK_S:
                return None
            self._checked = now
            try:
                stamp = self._stat()
            except OSError:
                return None  # mid-rotation; the next check sees the new file
            if stamp == self._stamp:
                return None
            self._stamp = stamp
            return stamp


class TokenTable(_Watched):
    """The token file (see the module docstring); ``node_of`` reloads it when changed."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__((path,), clock)
        self.path = path
        # read now: a token file that cannot be read stops the start, not the first stream
        self.changed()
        self._table = parse_tokens(path.read_text(), str(path))

    def __len__(self) -> int:
        return len(self._table)

    def node_of(self, token: str) -> str | None:
        if self.changed() is not None:
            try:
                self._table = parse_tokens(self.path.read_text(), str(self.path))
                self.reloads += 1
                log.info("auth tokens reloaded from %s: %d nodes", self.path, len(self._table))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                self.reload_errors += 1
                log.error("auth tokens: %s; keeping the %d tokens loaded before", exc, len(self._table))
        return self._table.get(_digest(token))


@dataclass(frozen=True)
class CertificateFiles:
    """The server's certificate, key and (mTLS) client CA as files."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.client_ca.read_bytes() if self.client_ca else None)


class CertificateReloader(_Watched):
    """gRPC's certificate fetcher: called before each handshake; a new configuration
    when the files changed (else None: keep the current one)."""

    def __init__(self, files: CertificateFiles, clock: Callable[[], float] = time.monotonic) -> None:
        paths = tuple(p for p in (files.cert, files.key, files.client_ca) if p is not None)
        super().__init__(paths, clock)
        self.files = files
        self.changed()
        self.initial = files.configuration()

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        if self.changed() is None:
            return None
        try:
            config = self.files.configuration()
        except (OSError, ValueError) as exc:
            self.reload_errors += 1
            log.error("TLS files changed but cannot be read (%s); keeping the ones loaded before", exc)
            return None
        self.reloads += 1
        log.info("TLS certificate files changed: new handshakes use them")
        return config


class Authenticator:
    """Who a stream's client may send as (see the module docstring)."""

    def __init__(self, client_ca: bool, tokens: TokenTable | None) -> None:
        self.client_ca = client_ca
        self.tokens = tokens

    def names(self, context: grpc.aio.ServicerContext) -> frozenset[str] | None:
        """The node names this stream may send as; None when no authentication is
        configured (insecure). Raises Refused."""
        if self.client_ca:
            names = peer_names(context.auth_context())
            if not names:  # the handshake requires a certificate; this is defence in depth
                raise Refused("no_credentials", grpc.StatusCode.UNAUTHENTICATED,
                              "a client certificate is required")
            return names
        if self.tokens is None:
            return None
        auth = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        if not isinstance(auth, str) or not auth.startswith("Bearer "):
            raise Refused("no_credentials", grpc.StatusCode.UNAUTHENTICATED,
                          "a bearer token is required (authorization: Bearer <token>)")
        node = self.tokens.node_of(auth[len("Bearer "):].strip())
        if node is None:
            raise Refused("bad_token", grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        return frozenset((node,))
