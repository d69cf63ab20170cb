"""Ships batches to a regional over a gRPC bidirectional stream, acked per batch.

Every batch goes into the spool (edge/spool.py, on disk) before it is sent and leaves
it only when a regional answers it for good: ACCEPTED, DUPLICATE, or REJECTED (counted
and logged). A batch is compressed once, when written (zstd by default, see
stratoscope/wire.py), and the spool keeps those bytes, so a resend, also after an edge
restart, is the very same batch: the regional de-duplicates by (node_id, boot_id, seq).
Batches are keyed by (boot_id, seq), never seq alone: after a restart the spool holds the
old boot's batches beside the new boot's.

Pacing: at most ``max_in_flight`` batches are unanswered on a stream, so a reconnect
does not fire a 256 MiB backlog at once; after a RETRY (the regional is behind) nothing
more is sent for a jittered, doubling delay (``backoff_initial_s`` up to
``backoff_max_s``), reset by the next ACCEPTED.

Failover without double counting. Several regionals may be given: a stream that ends
without any answer moves to the next one. A batch sent to regional A and not answered
is *in doubt*: A may have logged and acked it and the ack been lost when A died; sent to
B too, it would be stored by both (A replays its durable log when it comes back) and
counted twice. So the first time a batch is sent to a target, a SENT record naming the
target is written (fsync'd, before the bytes leave) and from then on the batch goes
only to that target, also after an edge restart, until that target answers it:
ACCEPTED/DUPLICATE/REJECTED end it, RETRY frees it for any regional (the regional did
not store it). A batch is taken for a stream only once its channel is connected, so a
regional that was never reached holds nothing; one handed to a stream that was already
dying is in doubt like any other. New batches, never sent, go to the current regional at
once. While the
main stream is on B, a second thread retries A on short-lived streams, with backoff,
for the batches in doubt there. After ``in_doubt_timeout_s`` (default 1 h) an in-doubt
batch is released to any regional, counted (``in_doubt_released``) and logged: the one
case in which a count can be doubled (A comes back with the batch in its log later
than that).

Acknowledgement deadline. A regional can hang with its process alive and its TCP
connection up (stopped, its event loop stuck, its disk not returning from an fsync):
its stream then neither answers nor ends, and the edge would wait on it forever. So a
stream with unanswered batches that has had no answer for ``ack_timeout_s`` (default
30 s) is cancelled, counted (``errors.ack_timeout``) and treated as a regional that
cannot be reached: the main stream moves to the next regional. The clock runs from the
later of the stream's last answer and the sending of its oldest unanswered batch, so a
regional that answers slowly but steadily is not failed over; a watchdog thread checks
it and leaves out time in which the edge itself did not run (a suspended machine, a
stopped process). The cancelled stream's unanswered batches are in doubt at the hung
regional exactly like those of a stream that died: held for it, offered to it by the
second thread, released only by ``in_doubt_timeout_s``; new batches go to the next
regional. Streams opened after the deadline do not reuse the hung connection, and a
stopped regional never completes a new one (its HTTP/2 settings never arrive; a batch
is taken for a stream only once connected), so no further batch goes to it; one that
connects and stays silent is failed over again after the deadline.

The forwarder thread never ends on an error: whatever a round raises (a certificate file
missing during rotation, a spool write failing, anything unexpected) is logged with its
reason, counted under a fixed reason label (``ERROR_REASONS``) and followed by backoff
and another round.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from stratoscope.columns import packed_copy
from stratoscope.edge.errors import ConfigError
from stratoscope.edge.spool import DROP_REASONS, Key, Spool
from stratoscope.v1 import batch_pb2 as pb
from stratoscope.v1 import ingest_pb2
from stratoscope.wire import seal

log = logging.getLogger("stratoscope.edge.forward")

#: The label values of ``stratoscope_edge_forwarder_errors_total``: "tls" (reading the
#: certificate files), "auth" (reading the token file, or the regional refused this
#: node's credentials: UNAUTHENTICATED or PERMISSION_DENIED), "spool" (reading or
#: writing the spool), "ack_timeout" (a regional left batches unanswered past the
#: acknowledgement deadline), "internal" (anything else).
ERROR_REASONS = ("tls", "auth", "spool", "ack_timeout", "internal")
#: The ingest method, called with the spool's bytes as they are (no parse, no re-encode).
_METHOD = "/stratoscope.v1.Ingest/Stream"
#: How long a connection to a regional may take before the next one is tried.
CONNECT_TIMEOUT_S = 5.0
#: gRPC core's connectivity states (grpc_connectivity_state).
_READY, _TRANSIENT_FAILURE, _SHUTDOWN = 2, 3, 4
#: How long a stream that retries in-doubt batches at their regional may last.
DOUBT_STREAM_TIMEOUT_S = 30.0
#: How long a stream may leave batches unanswered without any answer before the regional
#: is treated as down. Generous: a healthy regional answers in milliseconds, and one that
#: is behind answers RETRY at once; this only has to tell a hung one from a slow one on
#: a busy machine.
DEFAULT_ACK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ClientTls:
    ca: Path
    cert: Path | None = None
    key: Path | None = None
    #: Override the name checked in the server certificate.
    server_name: str | None = None


@dataclass
class ForwardStats:
    sent: int = 0
    acked: int = 0
    duplicates: int = 0
    rejected: int = 0
    retries: int = 0
    reconnects: int = 0
    in_doubt_released: int = 0


@dataclass(frozen=True)
class _RoundResult:
    """How one stream ended: whether any answer came, and whether it was cancelled
    because answers stopped for longer than the acknowledgement deadline."""

    answered: bool = False
    timed_out: bool = False


def _identity(b: bytes) -> bytes:
    return b


class _Round(Exception):
    """A round failed for a counted reason (already logged)."""


class GrpcForwarder:
    def __init__(
        self,
        targets: list[str],
        tls: ClientTls | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        compression: str = "zstd",
        wire_columns: str = "raw",
        spool: Spool | None = None,
        max_in_flight: int = 32,
        in_doubt_timeout_s: float = 3600.0,
        token_file: Path | None = None,
        ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
    ) -> None:
        """``token_file``: this node's bearer token for a regional that authenticates
        edges by token (regional/auth.py), read again for every stream (a rotated
        token applies without a restart)."""
        if not targets:
            raise ConfigError("at least one --regional HOST:PORT is required")
        for t in targets:
            host, sep, port = t.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError(f"--regional {t!r}: use HOST:PORT")
        if compression not in ("zstd", "gzip", "none"):
            raise ConfigError(f"compression {compression!r}: use zstd, gzip or none")
        if wire_columns not in ("raw", "packed"):
            raise ConfigError(f"wire columns {wire_columns!r}: use raw or packed")
        if not ack_timeout_s > 0:
            raise ConfigError(f"ack timeout {ack_timeout_s!r}: must be positive")
        self.targets = targets
        self.compression = compression
        #: "packed" for regionals older than raw columns: they would read a raw batch's
        #: numeric columns as empty (proto3 skips fields it does not know)
        self.wire_columns = wire_columns
        self.tls = tls
        self.token_file = token_file
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.max_in_flight = max_in_flight
        self.in_doubt_timeout_s = in_doubt_timeout_s
        self.ack_timeout_s = ack_timeout_s
        #: In memory only when none is given (library use, tests): the edge command gives one.
        self.spool = spool if spool is not None else Spool(None)
        self.stats = ForwardStats()
        #: Errors of the forwarder's rounds, by reason (ERROR_REASONS).
        self.errors: Counter[str] = Counter()
        #: Batches on a stream and not answered yet: key -> stream number.
        self._inflight: dict[Key, int] = {}
        #: Streams whose request iterators may still send; an older one's stop.
        self._live: set[int] = set()
        #: Streams with unanswered batches: since when each has waited for an answer
        #: (time.monotonic(); the later of its last answer and its oldest unanswered send).
        self._waiting: dict[int, float] = {}
        #: Streams cancelled by the watchdog because answers stopped (ack_timeout_s).
        self._timed_out: set[int] = set()
        #: Ack timeouts per target: streams opened after one use a new connection.
        self._hung_at: Counter[str] = Counter()
        self._streams = 0
        self._calls: dict[int, Any] = {}
        self._main_target: str | None = None
        self._hold_until = 0.0
        self._retry_delay = backoff_initial_s
        self._cv = threading.Condition()
        self._closing = threading.Event()
        self._threads = [threading.Thread(target=self._guarded, args=(self._run,), name="forwarder",
                                          daemon=True),
                         threading.Thread(target=self._guarded, args=(self._run_doubt,),
                                          name="forwarder-doubt", daemon=True),
                         threading.Thread(target=self._guarded, args=(self._watch_acks,),
                                          name="forwarder-ack-watchdog", daemon=True)]
        for thread in self._threads:
            thread.start()

    @property
    def unacked(self) -> int:
        with self._cv:
            return len(self.spool)

    def counts(self) -> dict[str, float]:
        """Outcome tallies and spool state, for /metrics (edge/metrics.py); labelled ones
        as ``name.label``."""
        with self._cv:
            s, sp = self.stats, self.spool
            out: dict[str, float] = {
                "acked": s.acked, "duplicates": s.duplicates, "rejected": s.rejected,
                "retries": s.retries, "reconnects": s.reconnects,
                "in_doubt_released": s.in_doubt_released,
                "spool_batches": len(sp), "spool_bytes": sp.depth_bytes,
                "spool_oldest_age_s": sp.oldest_age_s(), "spool_replayed": sp.replayed,
                "spool_corrupt_records": sp.corrupt_records, "spool_corrupt_bytes": sp.corrupt_bytes,
                "in_doubt": sp.in_doubt(),
            }
            for r in DROP_REASONS:
                out[f"dropped.{r}"] = sp.dropped[r]
            for r in ERROR_REASONS:
                out[f"errors.{r}"] = self.errors[r]
            return out

    def write(self, batch: pb.Batch) -> None:
        """Spool the batch (on disk before it is sent); never raises for a spool failure:
        collection goes on, the batch is counted as dropped ("unwritable")."""
        if self.wire_columns == "packed":
            batch = packed_copy(batch)
        if self.compression == "zstd":
            batch = seal(batch)  # once: a resend reuses the sealed bytes
        data = batch.SerializeToString()
        with self._cv:
            try:
                self.spool.append((batch.boot_id, batch.seq), data)
            except OSError as exc:
                self.errors["spool"] += 1
                self.spool.drop_unwritable()
                log.error("cannot write batch seq %d to the spool (dropped): %s", batch.seq, exc)
            self._cv.notify_all()

    def close(self, timeout_s: float = 15.0) -> bool:
        """Wait up to timeout_s for every batch to be answered; True if none is left (the
        rest stays in the spool for the next start)."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while len(self.spool) and time.monotonic() < deadline:
                self._cv.wait(0.1)
            left = len(self.spool)
            self._closing.set()
            self._cv.notify_all()
            calls = list(self._calls.values())
        for call in calls:
            call.cancel()
        for thread in self._threads:
            thread.join(timeout=5)
        with self._cv:
            self.spool.close()
        if left:
            where = "in the spool for the next start" if self.spool.directory else "lost (no spool)"
            log.warning("%d batches were not acknowledged before shutdown: %s", left, where)
        return left == 0

    # -- errors ----------------------------------------------------------------------
    def _error(self, reason: str, what: str, exc: BaseException) -> None:
        with self._cv:
            self.errors[reason] += 1
        log.error("forwarder: %s: %s: %s", what, type(exc).__name__, exc)

    def _guarded(self, loop: Any) -> None:
        """Run a loop forever: an exception that escapes it is counted and the loop goes on."""
        delay = self.backoff_initial_s
        while not self._closing.is_set():
            try:
                loop()
                return
            except Exception as exc:  # the thread must not die silently
                self._error("internal", "unexpected error (the loop goes on)", exc)
                self._closing.wait(delay * random.uniform(0.5, 1.0))
                delay = min(self.backoff_max_s, delay * 2)

    # -- streams ---------------------------------------------------------------------
    def _channel(self, target: str) -> grpc.Channel:
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", 32 * 1024 * 1024),
            ("grpc.max_receive_message_length", 32 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 30_000),
        ]
        if self._hung_at[target]:
            # gRPC shares one connection per target and channel arguments across channels:
            # after an ack timeout, a new stream would reuse the connection to the hung
            # regional, "ready" while it never answers. A new value here is a new
            # connection. (Not a connection per channel always: with one per forwarder, a
            # process that also forks -- the tests run a regional, whose frame child is
            # forked, beside their edges -- saw one forked child in ten crash at the fork.)
            options.append(("stratoscope.after_ack_timeouts", self._hung_at[target]))
        gzip = grpc.Compression.Gzip if self.compression == "gzip" else grpc.Compression.NoCompression
        if self.tls is None:
            return grpc.insecure_channel(target, options=options, compression=gzip)
        try:
            creds = grpc.ssl_channel_credentials(
                root_certificates=self.tls.ca.read_bytes(),
                private_key=self.tls.key.read_bytes() if self.tls.key else None,
                certificate_chain=self.tls.cert.read_bytes() if self.tls.cert else None,
            )
        except OSError as exc:  # e.g. a certificate file missing during rotation
            self._error("tls", f"reading the TLS files for {target}", exc)
            raise _Round from None
        if self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return grpc.secure_channel(target, creds, options=options, compression=gzip)

    def _metadata(self, target: str) -> tuple[tuple[str, str], ...] | None:
        if self.token_file is None:
            return None
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:  # e.g. mid-rotation: this round fails, the next reads again
            self._error("auth", f"reading the token file for {target}", exc)
            raise _Round from None
        return (("authorization", f"Bearer {token}"),)

    def _next_key(self, stream: int, target: str, doubt_only: bool) -> Key | None:
        """The oldest batch this stream may send now (under the lock)."""
        if sum(1 for s in self._inflight.values() if s == stream) >= self.max_in_flight:
            return None
        if not doubt_only and time.monotonic() < self._hold_until:
            return None
        now = self.spool.clock()
        release: list[Key] = []
        found = None
        for key, where, since in self.spool.targets():
            if key in self._inflight:
                continue
            if where and where != target and now - since > self.in_doubt_timeout_s:
                release.append(key)
                where = ""
            if (where == target) if doubt_only else (where in ("", target)):
                found = key
                break
        for key in release:
            self.spool.mark_sent(key, "")
            self.stats.in_doubt_released += 1
            log.warning("batch %s/%d was in doubt at a regional for over %.0f s: released to any "
                        "regional (it may be counted twice if that one still has it)",
                        key[0], key[1], self.in_doubt_timeout_s)
        return found

    def _requests(self, stream: int, target: str, doubt_only: bool) -> Iterator[bytes]:
        # gRPC may keep pulling from a dead stream's iterator for a while: one that is
        # not live any more must not take a batch.
        while True:
            with self._cv:
                data = None
                while data is None:
                    if self._closing.is_set() or stream not in self._live:
                        return
                    key = self._next_key(stream, target, doubt_only)
                    if key is None:
                        if doubt_only:
                            return  # half-close: the regional answers what it got, then ends
                        self._cv.wait(0.2)
                        continue
                    try:
                        self.spool.mark_sent(key, target)  # durable before the bytes leave
                        data = self.spool.read(key)
                    except OSError as exc:
                        self.errors["spool"] += 1
                        log.error("forwarder: reading the spool: %s", exc)
                        raise
                    if data is not None:
                        self._inflight[key] = stream
                        self._waiting.setdefault(stream, time.monotonic())
                        self.stats.sent += 1
            yield data

    def _on_ack(self, ack: ingest_pb2.Ack, stream: int | None = None) -> None:
        key = (ack.boot_id, ack.seq)
        with self._cv:
            self._inflight.pop(key, None)
            if stream is not None:  # any answer shows the regional is alive: its clock restarts
                if stream in self._inflight.values():
                    self._waiting[stream] = time.monotonic()
                else:
                    self._waiting.pop(stream, None)
            if ack.status == ingest_pb2.Ack.RETRY:
                self.stats.retries += 1
                if key in self.spool:
                    self.spool.mark_sent(key, "")  # not stored there: free for any regional
                now = time.monotonic()
                if now >= self._hold_until:  # one doubling per hold, not one per RETRY
                    self._hold_until = now + self._retry_delay * random.uniform(1.0, 1.5)
                    self._retry_delay = min(self.backoff_max_s, self._retry_delay * 2)
                self._cv.notify_all()
                return
            if ack.status == ingest_pb2.Ack.REJECTED:
                self.stats.rejected += 1
                log.error("regional rejected batch %s/%d: %s", ack.boot_id, ack.seq, ack.reason)
            elif ack.status == ingest_pb2.Ack.DUPLICATE:
                self.stats.duplicates += 1
            else:
                self.stats.acked += 1
                self._retry_delay = self.backoff_initial_s
            self.spool.ack(key)
            self._cv.notify_all()

    def _connect(self, channel: grpc.Channel) -> bool:
        """Wait until the channel is connected (TLS handshake done) before any batch is
        taken for it: a batch marked as sent to a regional that was never reached would be
        held for that regional for nothing (in doubt, see the module docstring). False on a
        failed connection attempt (refused, unreachable) or after CONNECT_TIMEOUT_S.

        Polled, not with grpc.channel_ready_future: its watcher thread raises ("Cannot
        monitor channel state: Channel closed!") when the channel closes under it."""
        check = getattr(getattr(channel, "_channel", None), "check_connectivity_state", None)
        if check is None:  # not grpc's own channel class: let the stream find out
            return True
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not self._closing.is_set() and time.monotonic() < deadline:
            state = check(True)
            if state == _READY:
                return True
            if state in (_TRANSIENT_FAILURE, _SHUTDOWN):
                return False
            self._closing.wait(0.02)
        return False

    def _stream_round(self, target: str, doubt_only: bool) -> _RoundResult:
        """One stream to ``target`` until it ends: whether any answer came, and whether
        the watchdog cancelled it because answers stopped (``_watch_acks``)."""
        with self._cv:
            self._streams += 1
            stream = self._streams
            self._live.add(stream)
        got_ack = False
        what = " (in-doubt batches)" if doubt_only else ""
        try:
            with self._channel(target) as channel:
                if not self._connect(channel):
                    log.warning("cannot connect to %s%s", target, what)
                    return _RoundResult()
                method = channel.stream_stream(_METHOD, request_serializer=_identity,
                                               response_deserializer=ingest_pb2.Ack.FromString)
                call = method(self._requests(stream, target, doubt_only),
                              timeout=DOUBT_STREAM_TIMEOUT_S if doubt_only else None,
                              metadata=self._metadata(target))
                with self._cv:
                    self._calls[stream] = call
                    if not doubt_only:
                        self._main_target = target
                for ack in call:
                    got_ack = True
                    self._on_ack(ack, stream)
        except grpc.RpcError as exc:
            if not self._closing.is_set() and stream not in self._timed_out:
                code = exc.code() if hasattr(exc, "code") else None
                if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    # the batches stay in the spool until the credentials are fixed
                    self._error("auth", f"stream to {target} refused", exc)
                else:
                    log.warning("stream to %s%s ended: %s", target, what, code)
        finally:
            with self._cv:  # retire this stream: its unanswered batches may go again
                self._live.discard(stream)
                self._calls.pop(stream, None)
                self._waiting.pop(stream, None)
                unanswered = [k for k, s in self._inflight.items() if s == stream]
                for key in unanswered:
                    del self._inflight[key]
                timed_out = stream in self._timed_out
                self._timed_out.discard(stream)
                if timed_out:
                    self._hung_at[target] += 1
                self._cv.notify_all()
        if timed_out and not self._closing.is_set():
            log.warning("regional %s%s did not answer for %g s (ack_timeout): treated as down; "
                        "its %d unanswered batches stay in doubt there%s", target, what,
                        self.ack_timeout_s, len(unanswered),
                        "" if doubt_only or len(self.targets) == 1 else ", new ones go to the next regional")
        return _RoundResult(answered=got_ack, timed_out=timed_out)

    def _watch_acks(self) -> None:
        """Cancel every stream whose answers stopped for longer than ``ack_timeout_s``
        while it had batches unanswered (see the module docstring). Checked a few times
        per deadline; a check that comes late (the edge was suspended or stopped, or
        starved of CPU) moves the clocks forward by the delay, so only time in which the
        edge ran and waited counts."""
        every = min(1.0, self.ack_timeout_s / 4)
        last = time.monotonic()
        while not self._closing.wait(every):
            now = time.monotonic()
            late = now - last - every
            last = now
            hung = []
            with self._cv:
                if late > every:
                    for stream in self._waiting:
                        self._waiting[stream] += late
                for stream, since in self._waiting.items():
                    call = self._calls.get(stream)
                    if (now - since > self.ack_timeout_s and call is not None
                            and stream not in self._timed_out):
                        self._timed_out.add(stream)
                        self.errors["ack_timeout"] += 1
                        hung.append(call)
            for call in hung:
                call.cancel()  # the stream's round ends and says why (_stream_round)

    def _run(self) -> None:
        failures = 0
        index = 0
        while not self._closing.is_set():
            target = self.targets[index]
            result = _RoundResult()
            try:
                result = self._stream_round(target, doubt_only=False)
            except _Round:
                pass  # counted and logged where it happened
            except OSError as exc:  # the TLS files are read in _channel: this is the spool
                self._error("spool", f"stream to {target}", exc)
            except Exception as exc:
                self._error("internal", f"stream to {target}", exc)
            if self._closing.is_set():
                return
            with self._cv:
                self.stats.reconnects += 1
            if result.answered and not result.timed_out:
                failures = 0
            else:  # never answered, or answers stopped: the next regional
                failures += 1
                index = (index + 1) % len(self.targets)
            if failures and failures % len(self.targets) == 0:
                rounds = failures // len(self.targets)
                delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (rounds - 1))
                self._closing.wait(delay * random.uniform(0.5, 1.0))

    def _run_doubt(self) -> None:
        """Retry batches in doubt at a regional other than the main stream's, there only."""
        delay = self.backoff_initial_s
        while not self._closing.wait(delay * random.uniform(0.5, 1.0)):
            with self._cv:
                main = self._main_target
                where = list(dict.fromkeys(
                    t for k, t, _ in self.spool.targets()
                    if t and t != main and k not in self._inflight))
            if not where:
                delay = self.backoff_initial_s
                continue
            answered = False
            for target in where:
                try:
                    answered |= self._stream_round(target, doubt_only=True).answered
                except _Round:
                    pass
                except OSError as exc:
                    self._error("spool", f"in-doubt stream to {target}", exc)
                except Exception as exc:
                    self._error("internal", f"in-doubt stream to {target}", exc)
            delay = self.backoff_initial_s if answered else min(self.backoff_max_s, delay * 2)
