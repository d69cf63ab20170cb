"""The stderr tap that counts refused TLS handshakes (regional/handshakes.py): which lines
count and as what, on lines grpcio wrote; that every other byte is passed on in order;
the rate limit on the lines it passes on; and, in a process of its own, that a stderr
nobody reads never blocks the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from stratoscope.regional.handshakes import (
    MAX_LINE,
    REASONS,
    LineSorter,
    classify,
    drain,
    lowest_shown,
)
from stratoscope.regional.ingest import _own_address

ROOT = Path(__file__).resolve().parents[2]

# Written by grpcio 1.85.4's server (the ingest's settings: mTLS, dynamic credentials) for
# the client named, each on its own connection.
CAPTURED = [
    ("no_certificate", "a client without a certificate",
     b"I1207 21:19:06.541471    9138 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: error:100000c0:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid certificate verification context\n"),
    ("unknown_ca", "a certificate from another CA",
     b"I1207 21:19:07.733318    9139 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate\n"),
    ("expired", "the fleet CA's certificate, expired",
     b"I1207 21:19:08.837402    9138 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired\n"),
    ("not_tls", "a plaintext gRPC client (HTTP/2 preface); an SSH banner says the same",
     b"I1207 21:19:09.935764    9138 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context\n"),
    ("not_tls", "an HTTP/1 request",
     b"I1207 21:19:12.170480    9138 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: error:1000009c:SSL routines:OPENSSL_internal:HTTP_REQUEST: Invalid certificate verification context\n"),
    ("not_tls", "an HTTP proxy's CONNECT",
     b"I1207 21:30:09.872414     792 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: error:1000009b:SSL routines:OPENSSL_internal:HTTPS_PROXY_REQUEST: Invalid certificate verification context\n"),
    ("other", "the fleet CA's certificate, not valid yet",
     b"I1207 21:22:00.466306   16930 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate is not yet valid\n"),
    ("other", "the fleet CA's certificate for servers (serverAuth only)",
     b"I1207 21:22:01.745376   16931 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unsupported certificate purpose\n"),
    ("other", "a TLS record header announcing a message too large",
     b"I1207 21:30:09.878805     792 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: error:10000096:SSL routines:OPENSSL_internal:EXCESSIVE_MESSAGE_SIZE: Invalid certificate verification context\n"),
    # Releases before abseil logging (gpr_log, level ERROR, "fatal error", no verify
    # detail), as their users quote them:
    ("no_certificate", "an older grpcio, a client without a certificate",
     b"E0301 12:10:55.011000000  1136 ssl_transport_security.cc:1455] Handshake failed with fatal error SSL_ERROR_SSL: error:100000c0:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE.\n"),
    ("not_tls", "an older grpcio, a plaintext client",
     b"E0823 11:39:51.621816329  142786 ssl_transport_security.cc:1495] Handshake failed with fatal error SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER.\n"),
    ("other", "an older grpcio, a certificate that does not verify (no detail: CA or dates)",
     b"E1113 10:00:00.000000000  4242 ssl_transport_security.cc:1468] Handshake failed with fatal error SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED.\n"),
]

NO_CERT = CAPTURED[0][2]
OTHER_CA = CAPTURED[1][2]
PLAIN = CAPTURED[3][2]


@pytest.mark.parametrize(("reason", "client", "line"), CAPTURED, ids=[c[1] for c in CAPTURED])
def test_a_refused_handshake_is_counted_under_its_reason(reason: str, client: str, line: bytes) -> None:
    assert reason in REASONS
    assert classify(line) == reason
    assert classify(line.rstrip(b"\n")) == reason


@pytest.mark.parametrize("line", [
    # gRPC's own warning when GRPC_VERBOSITY=INFO
    b"W1207 21:22:21.423888   20104 log.cc:102] Log level INFO is not suitable for production. Prefer WARNING or ERROR.\n",
    # a log line of ours quoting a client's text that imitates one
    b"2026-12-07 21:28:10,524 WARNING [ingest 27753] stratoscope.regional: rejected batch (identity) from node "
    + b"'" + NO_CERT.rstrip(b"\n") + b"'\n",
    # the line, not at a line's start
    b"x" + NO_CERT,
    # another file's line about a handshake
    b"D0823 11:39:51.621928779  142786 security_handshaker.cc:206] Security handshake failed: UNKNOWN:Tls handshake failed\n",
    b"", b"\n",
])
def test_other_lines_are_not_counted(line: bytes) -> None:
    assert classify(line) is None


@pytest.mark.parametrize(("listen", "probed"), [
    ("0.0.0.0:7400", "localhost"), ("[::]:7400", "localhost"), ("127.0.0.1:0", "127.0.0.1"),
    ("[::1]:7400", "::1"), ("regional-1.example:7400", "regional-1.example")])
def test_the_ingest_process_probes_its_own_port_where_it_listens(listen: str, probed: str) -> None:
    assert _own_address(listen) == probed


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _note(text: str) -> bytes:
    return f"NOTE {text}\n".encode()


OTHER_OUTPUT = (b"2026-12-07 21:28:10,524 INFO [ingest 1] stratoscope.regional: ingest listening\n"
                b"Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: \xff\xfe bytes\n")


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 16])
def test_every_byte_is_passed_on_in_order_however_the_reads_split_it(chunk: int) -> None:
    sorter = LineSorter(every_s=0.0, note=_note)  # no rate limit: every line shown
    data = OTHER_OUTPUT + NO_CERT + OTHER_OUTPUT + PLAIN + OTHER_CA + b"a partial line"
    out = b"".join(sorter.feed(data[i:i + chunk]) for i in range(0, len(data), chunk))
    out += sorter.finish()
    assert out == data + b"\n"
    assert sorter.refused == {"no_certificate": 1, "unknown_ca": 1, "expired": 0, "not_tls": 1, "other": 0}


def test_a_flood_shows_one_line_per_reason_per_interval_and_counts_them_all() -> None:
    clock = Clock()
    sorter = LineSorter(every_s=10.0, clock=clock, note=_note)
    out = sorter.feed(NO_CERT * 500 + OTHER_OUTPUT + PLAIN * 3)
    assert out == NO_CERT + OTHER_OUTPUT + PLAIN  # the first of each, and all other output
    assert sorter.refused["no_certificate"] == 500 and sorter.refused["not_tls"] == 3
    assert sorter.held_back == 499 + 2
    clock.t += 9.9
    assert sorter.idle() == b""
    assert sorter.feed(NO_CERT) == b""
    clock.t += 0.1  # 10 s after the first line shown: a note of how many were held back
    notes = sorter.idle()
    assert notes == (_note("500 more TLS handshakes refused (no_certificate) in the last 10 s: gRPC's "
                           "lines about them held back, all counted in "
                           "stratoscope_regional_tls_handshakes_refused_total")
                     + _note("2 more TLS handshakes refused (not_tls) in the last 10 s: gRPC's lines "
                             "about them held back, all counted in "
                             "stratoscope_regional_tls_handshakes_refused_total"))
    assert sorter.idle() == b""
    assert sorter.feed(NO_CERT) == NO_CERT  # the next one is shown in full again
    assert sorter.refused["no_certificate"] == 502 and sorter.held_back == 500 + 2


def test_a_note_never_lands_inside_a_line() -> None:
    clock = Clock()
    sorter = LineSorter(every_s=10.0, clock=clock, note=_note)
    sorter.feed(NO_CERT * 2)
    clock.t += 11
    assert sorter.feed(b"half a li") == b""  # held, and the note waits with it
    assert sorter.feed(b"ne\n").startswith(b"half a line\nNOTE 1 more")


def test_a_partial_line_is_passed_on_after_a_while_and_its_rest_follows_unread() -> None:
    clock = Clock()
    sorter = LineSorter(clock=clock, note=_note)
    assert sorter.feed(b"Password: ") == b""
    assert sorter.waiting()
    assert sorter.idle() == b""
    clock.t += 0.2
    assert sorter.idle() == b"Password: "
    # the rest of that line is not read as a line of its own, whatever it says
    assert sorter.feed(NO_CERT) == NO_CERT
    assert sorter.refused["no_certificate"] == 0
    assert sorter.feed(NO_CERT) == NO_CERT and sorter.refused["no_certificate"] == 1


def test_a_line_too_long_to_hold_is_passed_on_unread() -> None:
    sorter = LineSorter(note=_note)
    long = b"x" * (MAX_LINE + 1)
    assert sorter.feed(long) == long
    assert sorter.feed(b"y\n" + PLAIN) == b"y\n" + PLAIN
    assert sorter.refused["not_tls"] == 1


def test_the_probes_line_is_taken_neither_counted_nor_shown_and_markers_are_noted() -> None:
    sorter = LineSorter(every_s=0.0, note=_note, marker=b"marker 1234\n")
    sorter.probes = 1
    assert sorter.feed(NO_CERT + PLAIN + b"marker 1234\n" + PLAIN + b"marker 12345\n") \
        == NO_CERT + PLAIN + b"marker 12345\n"
    assert (sorter.probed, sorter.probes, sorter.markers) == (1, 0, 1)
    assert sorter.refused == {**dict.fromkeys(REASONS, 0), "no_certificate": 1, "not_tls": 1}


GRPC_INFO = b"I1207 21:22:21.423888   20104 chttp2_transport.cc:123] some INFO line of gRPC's\n"
GRPC_WARNING = b"W1207 21:22:21.423888   20104 log.cc:102] Log level INFO is not suitable for production.\n"
GRPC_ERROR = b"E1207 21:22:21.423888   20104 server.cc:77] an ERROR line of gRPC's\n"


@pytest.mark.parametrize(("verbosity", "shown"), [
    (None, "I"), ("", "I"), ("info", "I"), ("DEBUG", "I"), ("error", "E"), (" NONE ", None),
    ("verbose", "I")])
def test_grpc_verbosity_says_which_lines_of_grpc_are_shown(verbosity: str | None, shown: str | None) -> None:
    assert lowest_shown(verbosity) == shown


@pytest.mark.parametrize(("show", "out"), [
    ("I", GRPC_INFO + GRPC_WARNING + GRPC_ERROR + NO_CERT + OTHER_OUTPUT),
    ("E", GRPC_ERROR + NO_CERT + OTHER_OUTPUT),  # the handshake line too: it is why we look
    (None, OTHER_OUTPUT),
])
def test_grpc_lines_are_shown_as_grpc_verbosity_asked_and_handshakes_counted_anyway(
        show: str | None, out: bytes) -> None:
    sorter = LineSorter(note=_note, show=show)
    assert sorter.feed(GRPC_INFO + GRPC_WARNING + GRPC_ERROR + NO_CERT + OTHER_OUTPUT + NO_CERT) == out
    assert sorter.refused["no_certificate"] == 2
    assert sorter.finish() == (b"" if show is None else _note(
        "1 more TLS handshakes refused (no_certificate) in the last 0 s: gRPC's lines about them "
        "held back, all counted in stratoscope_regional_tls_handshakes_refused_total"))


def test_what_a_dead_process_left_in_the_pipe_is_passed_on_and_counted() -> None:
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    os.write(w, OTHER_OUTPUT + NO_CERT * 3 + b"Fatal Python error: Aborted\n\nno newline at the end")
    os.close(w)
    counted: list[tuple[dict[str, int], int, int]] = []
    drain(r, lambda *c: counted.append(c), out_fd=out_w)
    os.close(out_w)
    with os.fdopen(out_r, "rb") as f:
        assert f.read() == (OTHER_OUTPUT + NO_CERT * 3 + b"Fatal Python error: Aborted\n\n"
                            b"no newline at the end\n")
    assert counted == [({"no_certificate": 3}, 0, 0)]
    with pytest.raises(OSError):
        os.fstat(r)  # closed


# A process that taps its own stderr and writes to it as gRPC's threads do (one write per
# line, from C: os.write on fd 2) and as Python does; prints what the tap reported.
_CHILD = textwrap.dedent("""
    import json, os, sys, threading, time
    from stratoscope.regional.handshakes import Tap
    total = {"refused": {}, "held_back": 0, "dropped_bytes": 0}
    lock = threading.Lock()
    def on_counts(refused, held_back, dropped):
        with lock:
            for r, n in refused.items():
                total["refused"][r] = total["refused"].get(r, 0) + n
            total["held_back"] += held_back
            total["dropped_bytes"] += dropped
    tap = Tap(on_counts)
    tap.start()
    lines = json.loads(sys.argv[1])
    repeat, filler = int(sys.argv[2]), int(sys.argv[3])
    t0 = time.monotonic()
    for _ in range(repeat):
        for line in lines:
            os.write(2, line.encode())
        print("python's stderr", file=sys.stderr)
        if filler:
            os.write(2, b"f" * filler + b"\\n")
    wrote_s = time.monotonic() - t0
    tap.close(timeout_s=1.0)
    with lock:
        print(json.dumps({**total, "wrote_s": wrote_s}), flush=True)
""")


def _run_child(stderr: int, lines: list[bytes], repeat: int, filler: int = 0,
               timeout_s: float = 60) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps([x.decode() for x in lines]), str(repeat), str(filler)],
        stdout=subprocess.PIPE, stderr=stderr, timeout=timeout_s, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0
    return json.loads(proc.stdout.decode().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_tapped_stderr_gets_every_byte_but_the_held_back_lines(tmp_path: Path) -> None:
    err = tmp_path / "stderr"
    with open(err, "wb") as f:
        result = _run_child(f.fileno(), [NO_CERT, OTHER_CA, PLAIN], repeat=200)
    assert result["refused"] == {"no_certificate": 200, "unknown_ca": 200, "not_tls": 200}
    assert result["held_back"] == 3 * 199 and result["dropped_bytes"] == 0
    text = err.read_bytes()
    assert text.count(b"python's stderr\n") == 200
    assert text.count(b"] Handshake failed with error") == 3  # one per reason
    # the lines held back are noted when the tap closes (the process exits)
    assert text.count(b" 199 more TLS handshakes refused (") == 3
    assert text.startswith(NO_CERT + OTHER_CA + PLAIN + b"python's stderr\n")


def test_a_stderr_nobody_reads_never_blocks_the_process() -> None:
    """8 MiB written to a stderr that is a full pipe nobody reads: the writes return, what
    does not fit waits up to PENDING_BYTES and the rest is dropped and counted; the
    handshake lines among them are all counted."""
    r, w = os.pipe()
    try:  # nobody reads r
        result = _run_child(w, [NO_CERT], repeat=2000, filler=4000, timeout_s=60)
    finally:
        os.close(w)
        os.close(r)
    assert result["refused"] == {"no_certificate": 2000}
    assert result["dropped_bytes"] > 4 << 20  # most of the 8 MiB
    assert result["wrote_s"] < 30


_PROBE = textwrap.dedent("""
    import json, socket, sys, threading
    from stratoscope.regional.handshakes import Tap
    counted = {}
    tap = Tap(lambda refused, held, dropped: counted.update(refused))
    tap.start()
    # not gRPC: a server that closes every connection and writes no line about it
    server = socket.create_server(("127.0.0.1", 0))
    def serve():
        while True:
            conn, _ = server.accept()
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    problem = tap.probe("127.0.0.1", server.getsockname()[1], timeout_s=5)
    refused = socket.create_server(("127.0.0.1", 0))
    port = refused.getsockname()[1]
    refused.close()
    no_server = tap.probe("127.0.0.1", port, timeout_s=5)
    sys.stderr.write(sys.argv[1])  # a line like gRPC's after the probes: counted, not taken
    sys.stderr.flush()
    tap.close()
    print(json.dumps({"problem": problem, "no_server": no_server, "counted": counted}))
""")


def test_a_probe_that_gets_no_line_says_so_and_takes_none_later(tmp_path: Path) -> None:
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.run([sys.executable, "-c", _PROBE, PLAIN.decode()], stdout=subprocess.PIPE,
                              stderr=err, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()
    result = json.loads(proc.stdout.decode().splitlines()[-1])
    assert result["problem"] == "gRPC wrote no line about it"
    assert result["no_server"].startswith("the connection to 127.0.0.1:")
    assert result["counted"] == {"not_tls": 1}
    assert (tmp_path / "stderr").read_bytes() == PLAIN  # the tap's marker lines are not passed on
