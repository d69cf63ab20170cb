"""TLS handshakes the ingest port refused, counted from the line gRPC writes for each.

Why a tap on stderr: gRPC refuses a client without a certificate, with one from another
CA or an expired one, or one speaking plaintext to the TLS port, inside its TLS layer,
before any request. None of the server's Python code runs for such a client
(interceptors and handlers see requests; grpcio has no callback per handshake, and
exposes neither custom certificate verifiers nor a log sink), so the RPC-level
``refused_total`` cannot count it. The one hook per connection, the certificate fetcher
of ``grpc.dynamic_ssl_server_credentials``, runs for every TCP connection, a bare
connect that never sends a byte included (a port check, a load balancer's probe):
connections minus streams would count those too, and a good client's idle reconnects.
What gRPC does do is write one line per handshake it refuses, from its TLS code
(ssl_transport_security.cc), to fd 2 (grpcio 1.85: level INFO; older releases: level
ERROR, "fatal error")::

    I1207 21:19:06.541471    9138 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: error:100000c0:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid certificate verification context

So the ingest process's fd 2 is a pipe, read by a thread of its own (``Tap``) that passes
every byte on to the stderr the process had (but for the lines below) and counts each such
line under one of REASONS (``classify``):

- **Exact.** gRPC writes the line where a handshake fails on a TLS verdict, once per
  handshake; nothing for a good client, a bare connect, or a client that goes away
  mid-handshake (no verdict: not counted). A line counts only whole, from a line's start,
  in gRPC's own format: a client's text quoted in another log line cannot pass for one.
  A write of a line to a pipe is atomic (under 4 KiB), so lines of other threads do not
  split it.
- **Never blocks the process.** The thread reads the pipe as fast as lines come and
  writes to the real stderr only what it takes without blocking (``poll`` first); what it
  does not take waits in memory up to PENDING_BYTES, past which output is dropped and
  counted (``dropped_bytes``) rather than making gRPC's threads wait on a stderr nobody
  reads.
- **A flood costs the log little.** Of the lines about refused handshakes, one per reason
  per SHOW_EVERY_S is passed on; the rest are held back (``held_back``), all of them
  counted, and a line of our own says how many were.
- **Whatever GRPC_VERBOSITY says.** gRPC reads it once, when it is imported, and at ERROR
  (the CLI's default) or NONE writes no INFO line at all. So the ingest process imports gRPC
  with it unset (regional/ingestboot.py), and the tap shows gRPC's lines as the verbosity
  asked for would have (``lowest_shown``): at ERROR, no INFO or WARNING line of gRPC's but
  the lines about refused handshakes (rate-limited, as above); at NONE, none of them.
  Each is counted in any case.
- **Checked at start.** A counter that silently stays at 0 would be worse than none: a
  grpcio that words its line differently, or no longer writes it, would do that. So the
  ingest process connects to its own port once it listens and speaks plaintext, as a
  misconfigured client would (``Tap.probe``). gRPC refuses it like any other; the tap takes
  the first ``not_tls`` line after that as the probe's (the lines are alike, so the count
  stays exact) and does not show it. No such line: the ingest process says so in one error
  line and ``stratoscope_regional_tls_handshakes_counted`` is 0.
- **Nothing is lost when the process dies.** The regional holds the pipe's read end too
  and, once the ingest process is gone, reads what it left there (``drain``): the last
  lines of a crash go where they always went.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import re
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["PENDING_BYTES", "REASONS", "SHOW_EVERY_S", "Handshakes", "LineSorter", "Tap", "classify",
           "drain", "lowest_shown"]

#: The label values of ``stratoscope_regional_tls_handshakes_refused_total`` (a fixed set).
REASONS = ("no_certificate", "unknown_ca", "expired", "not_tls", "other")
#: Of the lines about refused handshakes, one per reason per this many seconds is shown.
SHOW_EVERY_S = 10.0
#: Output waiting for a stderr that does not take it, past which it is dropped.
PENDING_BYTES = 1 << 20
#: A line longer than this is passed on unread (a line of gRPC's is ~250 bytes).
MAX_LINE = 16 << 10
#: A line without its end yet (a writer's partial write) is passed on after this long.
HOLD_PARTIAL_S = 0.2
#: The pipe's capacity asked for (the kernel's default is 64 KiB).
PIPE_BYTES = 1 << 20
#: What a plaintext gRPC client sends first (HTTP/2's connection preface): the probe's words.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: A write of at most this many bytes to a pipe that poll says is writable cannot block.
_CHUNK = select.PIPE_BUF

# Abseil's (and, before it, gpr_log's) prefix: severity, MMDD, time, thread id, file:line.
_GRPC = re.compile(rb"([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^\s\]]+:\d+\] ")
_SEVERITIES = b"IWEF"
_LINE = re.compile(rb"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ssl_transport_security\.cc:\d+\] "
                   rb"Handshake failed with (?:fatal )?error (?P<what>[^\n]*)\n?\Z")
# BoringSSL's reasons, as grpcio's wheels print them.
_NOT_TLS = (b":WRONG_VERSION_NUMBER", b":HTTP_REQUEST", b":HTTPS_PROXY_REQUEST")
# X509_verify_cert_error_string(): the chain does not lead to the client CA.
_UNKNOWN_CA = (b"unable to get local issuer certificate", b"unable to get issuer certificate",
               b"self signed certificate", b"self-signed certificate",
               b"certificate signature failure")


def classify(line: bytes) -> str | None:
    """The reason (one of REASONS) of a line gRPC writes about a handshake it refused;
    None for any other line. ``line`` is one whole line, with or without its newline."""
    m = _LINE.match(line)
    if m is None:
        return None
    what = m["what"]
    if b":PEER_DID_NOT_RETURN_A_CERTIFICATE" in what:
        return "no_certificate"
    if b":CERTIFICATE_VERIFY_FAILED" in what:
        if b"certificate has expired" in what:
            return "expired"
        if any(s in what for s in _UNKNOWN_CA):
            return "unknown_ca"
        return "other"  # not yet valid, wrong key usage, ...; older grpcio says no more
    if any(s in what for s in _NOT_TLS):
        return "not_tls"
    return "other"


def lowest_shown(verbosity: str | None) -> str | None:
    """The lowest severity of gRPC's lines (``I``, ``W``, ``E``, ``F``) that
    GRPC_VERBOSITY=``verbosity`` lets gRPC write; None: no line (NONE). Unset and values
    gRPC does not know leave abseil's default: every line."""
    value = (verbosity or "").strip().upper()
    return {"ERROR": "E", "NONE": None}.get(value, "I")


@dataclass(frozen=True, slots=True)
class Handshakes:
    """The tap's report, as its ``on_counts`` gets it: what changed since the last one
    (TLS handshakes refused, per reason; gRPC's lines about them held back; stderr bytes
    dropped). The ingest process sends it to the regional as it is."""

    refused: dict[str, int]
    held_back: int
    dropped_bytes: int


def _note(text: str) -> bytes:
    record = logging.LogRecord("stratoscope.regional", logging.WARNING, __file__, 0, text, None, None)
    return (_FORMATTER.format(record) + "\n").encode()


_FORMATTER = logging.Formatter("%(asctime)s %(levelname)s [ingest %(process)d] %(name)s: %(message)s")


class LineSorter:
    """The tap's bookkeeping, without I/O: bytes as read from the pipe in, bytes to pass on
    out; counts each line about a refused handshake (see the module docstring).

    Lines are passed on in order. A partial line is held until its end comes, or for
    HOLD_PARTIAL_S (``idle``), or until it is MAX_LINE long; then it is passed on as it is
    and the rest of that line follows unread.
    """

    def __init__(self, every_s: float = SHOW_EVERY_S, clock: Callable[[], float] = time.monotonic,
                 note: Callable[[str], bytes] = _note, marker: bytes = b"",
                 show: str | None = "I") -> None:
        """``marker``: a line that is neither passed on nor counted, only noted in
        ``markers`` (the tap's way to know what it has read). ``show``: gRPC's lines below
        this severity (``lowest_shown``) are not passed on, but those about refused
        handshakes, unless None (no line of gRPC's)."""
        self.every_s = every_s
        self.show = show
        self.clock = clock
        self.note = note
        self.marker = marker
        #: Marker lines read.
        self.markers = 0
        #: ``not_tls`` lines still to take as the tap's own probes' (not counted nor shown).
        self.probes = 0
        #: Lines taken as the probes'.
        self.probed = 0
        #: Refused handshakes per reason, since the start.
        self.refused = dict.fromkeys(REASONS, 0)
        #: Lines about refused handshakes not passed on, since the start.
        self.held_back = 0
        self._held: dict[str, int] = {}
        self._shown_at: dict[str, float] = {}
        self._partial = bytearray()
        self._partial_since = 0.0
        #: The start of the current line was passed on unread: its rest follows as it is.
        self._raw = False

    def feed(self, data: bytes) -> bytes:
        """``data`` read from the pipe; returns what to pass on."""
        out = bytearray()
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            piece = data[start:end + 1]
            start = end + 1
            if self._raw:
                out += piece
                self._raw = False
            elif self._partial:
                self._partial += piece
                out += self._line(bytes(self._partial))
                self._partial.clear()
            else:
                out += self._line(piece)
        rest = data[start:]
        if rest:
            if self._raw:
                out += rest
            else:
                if not self._partial:
                    self._partial_since = self.clock()
                self._partial += rest
                if len(self._partial) > MAX_LINE:
                    out += self._partial
                    self._partial.clear()
                    self._raw = True
        out += self._due()
        return bytes(out)

    def idle(self) -> bytes:
        """Called when the pipe has been quiet a while: a partial line held HOLD_PARTIAL_S
        is passed on, and the notes of lines held back that are due."""
        out = bytearray()
        if self._partial and self.clock() - self._partial_since >= HOLD_PARTIAL_S:
            out += self._partial
            self._partial.clear()
            self._raw = True
        out += self._due()
        return bytes(out)

    def finish(self) -> bytes:
        """The pipe ended: whatever is held, and a note of every line held back."""
        out = bytes(self._partial) + (b"\n" if self._partial else b"")
        self._partial.clear()
        self._raw = False
        return out + self._due(force=True)

    def waiting(self) -> bool:
        """Whether ``idle`` has something to do later (a partial line, lines held back)."""
        return bool(self._partial) or bool(self._held)

    def _line(self, line: bytes) -> bytes:
        if self.marker and line == self.marker:
            self.markers += 1
            return b""
        reason = classify(line)
        if reason is None:
            if self.show != "I" and (m := _GRPC.match(line)) is not None and (
                    self.show is None or _SEVERITIES.index(m[1]) < _SEVERITIES.index(self.show.encode())):
                return b""  # what GRPC_VERBOSITY would have kept gRPC from writing
            return line
        if reason == "not_tls" and self.probes:
            self.probes -= 1
            self.probed += 1
            return b""
        self.refused[reason] += 1
        now = self.clock()
        shown = self._shown_at.get(reason)
        if self.show is None:
            return b""  # GRPC_VERBOSITY=NONE: counted, not shown (and no note)
        if shown is not None and now - shown < self.every_s:
            self._held[reason] = self._held.get(reason, 0) + 1
            self.held_back += 1
            return b""
        self._shown_at[reason] = now
        return line

    def _due(self, force: bool = False) -> bytes:
        if not self._held or self._raw or self._partial:
            return b""  # never inside a line
        now = self.clock()
        out = bytearray()
        for reason in list(self._held):
            since = self._shown_at[reason]
            if force or now - since >= self.every_s:
                n = self._held.pop(reason)
                del self._shown_at[reason]  # the next one is shown in full
                out += self.note(
                    f"{n} more TLS handshakes refused ({reason}) in the last {now - since:.0f} s: "
                    f"gRPC's lines about them held back, all counted in "
                    f"stratoscope_regional_tls_handshakes_refused_total")
        return bytes(out)


def _counts(sorter: LineSorter) -> tuple[dict[str, int], int]:
    return dict(sorter.refused), sorter.held_back


class Tap:
    """fd 2 of this process made a pipe read by a thread of its own (see the module
    docstring). ``on_counts(refused, held_back, dropped_bytes)`` gets what changed since
    its last call (refused: per reason), from the tap's thread, after each read that
    changed something: it must not block nor write to stderr."""

    def __init__(self, on_counts: Callable[[dict[str, int], int, int], None],
                 read_fd: int | None = None, write_fd: int | None = None,
                 pending_bytes: int = PENDING_BYTES, show: str | None = "I") -> None:
        """``read_fd``/``write_fd``: the pipe (made here when not given; the regional makes
        it, to read what is left once the process is gone). ``show``: as LineSorter's."""
        if read_fd is None or write_fd is None:
            read_fd, write_fd = os.pipe()
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self.on_counts = on_counts
        self._marker = b"stratoscope stderr tap " + os.urandom(8).hex().encode() + b"\n"
        self.sorter = LineSorter(marker=self._marker, show=show)
        #: Held around the sorter: the tap's thread feeds it, ``probe`` reads it.
        self._lock = threading.Condition()
        self.pending_bytes = pending_bytes
        #: Bytes dropped because the real stderr did not take them, since the start.
        self.dropped_bytes = 0
        self._read_fd = read_fd
        self._write_fd: int | None = write_fd
        self._out_fd = -1
        self._closed = False
        self._pending = bytearray()
        self._unnoted = 0
        self._thread: threading.Thread | None = None
        self._writable = select.poll()
        self._reported: tuple[dict[str, int], int, int] = (dict.fromkeys(REASONS, 0), 0, 0)

    def start(self) -> None:
        """Put the pipe on fd 2 and start reading it; undone by ``close`` (also at exit)."""
        assert self._write_fd is not None and self._thread is None
        sys.stderr.flush()
        self._out_fd = os.dup(2)
        os.dup2(self._write_fd, 2)
        os.close(self._write_fd)
        self._write_fd = None
        self._thread = threading.Thread(target=self._run, name="stderr-tap", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def close(self, timeout_s: float = 5.0) -> None:
        """Give fd 2 back to the real stderr, and pass on what the pipe still holds.
        Idempotent."""
        if self._thread is None or self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(self._out_fd, 2)  # the pipe's last write end: the thread reads to its end
        self._thread.join(timeout_s)

    def probe(self, host: str, port: int, timeout_s: float = 10.0) -> str | None:
        """Check that gRPC's line about a refused handshake reaches the tap: a plaintext
        connection to the TLS port at ``host``:``port``, refused as any plaintext client is
        (see the module docstring). None if it does, else why not. Blocks up to about twice
        ``timeout_s``."""
        with self._lock:
            self.sorter.probes += 1
        problem = "gRPC wrote no line about it"
        try:
            with socket.create_connection((host, port), timeout=timeout_s) as s:
                s.sendall(H2_PREFACE)
                while s.recv(4096):  # until gRPC closes it: its line is written by then
                    pass
        except ConnectionResetError:
            pass
        except OSError as exc:
            problem = f"the connection to {host}:{port} failed ({exc})"
        # a marker written after it: once the tap has read the marker, it has read the line
        with self._lock:
            seen = self.sorter.markers
        os.write(2, self._marker)  # not under the lock: the tap's thread takes it to read
        with self._lock:
            self._lock.wait_for(lambda: self.sorter.markers > seen, timeout_s)
            if self.sorter.probed:
                return None
            self.sorter.probes = 0  # nothing came: take nothing for it later
            return problem

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug here must not leave fd 2 a pipe nobody reads
            self._closed = True
            os.dup2(self._out_fd, 2)
            with contextlib.suppress(OSError):
                os.write(self._out_fd, self.sorter.note(
                    f"the stderr tap failed ({exc!r}): stderr is passed on directly from now "
                    f"on, and refused TLS handshakes are no longer counted"))
            raise

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self._read_fd, select.POLLIN)
        self._writable = select.poll()
        self._writable.register(self._out_fd, select.POLLOUT)
        reading = True
        while reading or self._pending:
            if not reading:  # the pipe ended: what the real stderr still owes
                self._writable.poll(100)
            else:
                quiet = HOLD_PARTIAL_S if self.sorter.waiting() else 1.0
                if self._pending:
                    poller.register(self._out_fd, select.POLLOUT)
                try:
                    ready = dict(poller.poll(quiet * 1000))
                finally:
                    if self._pending:
                        poller.unregister(self._out_fd)
                out = b""
                if ready.get(self._read_fd, 0):
                    try:
                        data = os.read(self._read_fd, 1 << 16)
                    except OSError:
                        data = b""
                    with self._lock:
                        if data:
                            out = self.sorter.feed(data)
                        else:  # every write end closed (close(), or the process exits)
                            reading = False
                            out = self.sorter.finish()
                        self._lock.notify_all()
                else:
                    with self._lock:
                        out = self.sorter.idle()
                if out:
                    self._queue(out)
            self._flush()
            self._report()
        # a stderr that never takes the rest keeps this (daemon) thread until the exit
        os.close(self._read_fd)
        os.close(self._out_fd)

    def _queue(self, data: bytes) -> None:
        if len(self._pending) + len(data) > self.pending_bytes:
            self.dropped_bytes += len(data)
            self._unnoted += len(data)
            return
        self._pending += data

    def _flush(self) -> None:
        """Write what the real stderr takes without blocking."""
        while self._pending:
            if not self._writable.poll(0):
                return
            try:
                n = os.write(self._out_fd, self._pending[:_CHUNK])
            except BlockingIOError:  # someone made it non-blocking
                return
            except OSError:  # gone (EPIPE, EIO, ENOSPC...): nothing will take it
                self.dropped_bytes += len(self._pending)
                self._pending.clear()
                return
            del self._pending[:n]
            if not self._pending and self._unnoted:  # the gap, said where it is
                self._pending += self.sorter.note(
                    f"{self._unnoted} bytes of this process's stderr dropped here: stderr did "
                    f"not take them (stratoscope_regional_ingest_stderr_dropped_bytes_total)")
                self._unnoted = 0

    def _report(self) -> None:
        refused, held = _counts(self.sorter)
        now = (refused, held, self.dropped_bytes)
        if now == self._reported:
            return
        was_refused, was_held, was_dropped = self._reported
        self._reported = now
        delta = {r: refused[r] - was_refused[r] for r in REASONS if refused[r] != was_refused[r]}
        self.on_counts(delta, held - was_held, self.dropped_bytes - was_dropped)


def drain(read_fd: int, on_counts: Callable[[dict[str, int], int, int], None],
          out_fd: int = 2, show: str | None = "I") -> None:
    """What a dead process left in its tap's pipe, passed on to ``out_fd`` and counted
    (the regional's side: the process's own tap died with it). ``show``: as LineSorter's.
    Closes ``read_fd``."""
    try:
        os.set_blocking(read_fd, False)
        sorter = LineSorter(every_s=0.0, show=show)  # a dead process's last lines: all shown
        chunks = []
        while True:
            try:
                data = os.read(read_fd, 1 << 16)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(sorter.feed(data))
        chunks.append(sorter.finish())
        text = b"".join(chunks)
        view = memoryview(text)
        with contextlib.suppress(OSError):
            while view:
                view = view[os.write(out_fd, view):]
        refused, _ = _counts(sorter)
        if any(refused.values()):
            on_counts({r: n for r, n in refused.items() if n}, 0, 0)
    finally:
        os.close(read_fd)
