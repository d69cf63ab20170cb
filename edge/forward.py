"""Ships batches to a regional over one gRPC bidirectional stream, acked by seq.

Unacked batches stay in a bounded in-memory buffer (oldest dropped first, and
counted) and are resent in order after a reconnect (a batch is compressed once, when written:
zstd by default, see stratoscope/wire.py); the regional
de-duplicates by (node_id, boot_id, seq), so resending is safe. Several
regionals may be given: the forwarder fails over in order, with jittered
exponential backoff between full rounds.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from stratoscope.columns import packed_copy
from stratoscope.edge.errors import ConfigError
from stratoscope.v1 import batch_pb2 as pb
from stratoscope.v1 import ingest_pb2, ingest_pb2_grpc
from stratoscope.wire import seal

log = logging.getLogger("stratoscope.edge.forward")


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
    dropped: int = 0
    reconnects: int = 0


class GrpcForwarder:
    def __init__(
        self,
        targets: list[str],
        max_unacked: int = 360,
        tls: ClientTls | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        compression: str = "zstd",
        wire_columns: str = "raw",
    ) -> None:
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
        self.targets = targets
        self.compression = compression
        #: "packed" for regionals older than raw columns: they would read a raw batch's
        #: numeric columns as empty (proto3 skips fields it does not know)
        self.wire_columns = wire_columns
        self.max_unacked = max_unacked
        self.tls = tls
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stats = ForwardStats()
        self._pending: OrderedDict[int, pb.Batch] = OrderedDict()
        self._sent: set[int] = set()
        self._hold_until = 0.0
        #: Number of the current stream; requests of an older one stop.
        self._stream = 0
        self._cv = threading.Condition()
        self._closing = threading.Event()
        self._call: grpc.Future | None = None
        self._thread = threading.Thread(target=self._run, name="forwarder", daemon=True)
        self._thread.start()

    @property
    def unacked(self) -> int:
        with self._cv:
            return len(self._pending)

    def counts(self) -> dict[str, int]:
        """The outcome tallies and the unacked depth, for /metrics (edge/metrics.py)."""
        with self._cv:
            s = self.stats
            return {"acked": s.acked, "duplicates": s.duplicates, "rejected": s.rejected,
                    "retries": s.retries, "dropped": s.dropped, "reconnects": s.reconnects,
                    "unacked": len(self._pending)}

    def write(self, batch: pb.Batch) -> None:
        if self.wire_columns == "packed":
            batch = packed_copy(batch)
        if self.compression == "zstd":
            batch = seal(batch)  # once: a resend reuses the sealed bytes
        with self._cv:
            self._pending[batch.seq] = batch
            while len(self._pending) > self.max_unacked:
                seq, _ = self._pending.popitem(last=False)
                self._sent.discard(seq)
                self.stats.dropped += 1
                log.warning("unacked buffer full (%d): dropped batch seq %d", self.max_unacked, seq)
            self._cv.notify_all()

    def close(self, timeout_s: float = 15.0) -> bool:
        """Wait up to timeout_s for every batch to be acked; True if none is left."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._pending and time.monotonic() < deadline:
                self._cv.wait(0.1)
            left = len(self._pending)
            self._closing.set()
            self._cv.notify_all()
        call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(timeout=5)
        if left:
            log.warning("%d batches were not acknowledged before shutdown", left)
        return left == 0

    # -- the stream ------------------------------------------------------------------
    def _channel(self, target: str) -> grpc.Channel:
        options = [
            ("grpc.max_send_message_length", 32 * 1024 * 1024),
            ("grpc.max_receive_message_length", 32 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 30_000),
        ]
        gzip = grpc.Compression.Gzip if self.compression == "gzip" else grpc.Compression.NoCompression
        if self.tls is None:
            return grpc.insecure_channel(target, options=options, compression=gzip)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.tls.ca.read_bytes(),
            private_key=self.tls.key.read_bytes() if self.tls.key else None,
            certificate_chain=self.tls.cert.read_bytes() if self.tls.cert else None,
        )
        if self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))  # type: ignore[arg-type]
        return grpc.secure_channel(target, creds, options=options, compression=gzip)

    def _requests(self, stream: int) -> Iterator[pb.Batch]:
        # gRPC may keep pulling from a dead stream's iterator for a while: one that is
        # not the current stream's any more must not take (and lose) a batch.
        while True:
            with self._cv:
                batch = None
                while batch is None:
                    if self._closing.is_set() or stream != self._stream:
                        return
                    if time.monotonic() >= self._hold_until:
                        batch = next(
                            (b for s, b in self._pending.items() if s not in self._sent), None
                        )
                    if batch is None:
                        self._cv.wait(0.2)
                self._sent.add(batch.seq)
                self.stats.sent += 1
            yield batch

    def _on_ack(self, ack: ingest_pb2.Ack) -> None:
        with self._cv:
            if ack.status == ingest_pb2.Ack.RETRY:
                self.stats.retries += 1
                self._sent.discard(ack.seq)
                self._hold_until = time.monotonic() + self.backoff_initial_s * random.uniform(1, 2)
                return
            if ack.status == ingest_pb2.Ack.REJECTED:
                self.stats.rejected += 1
                log.error("regional rejected batch seq %d: %s", ack.seq, ack.reason)
            elif ack.status == ingest_pb2.Ack.DUPLICATE:
                self.stats.duplicates += 1
            else:
                self.stats.acked += 1
            self._pending.pop(ack.seq, None)
            self._sent.discard(ack.seq)
            self._cv.notify_all()

    def _run(self) -> None:
        failures = 0
        index = 0
        while not self._closing.is_set():
            target = self.targets[index]
            got_ack = False
            try:
                with self._channel(target) as channel:
                    stub = ingest_pb2_grpc.IngestStub(channel)
                    with self._cv:
                        self._sent.clear()  # a new stream resends everything unacked, in order
                        self._stream += 1
                        stream = self._stream
                    call = stub.Stream(self._requests(stream))
                    self._call = call
                    for ack in call:
                        got_ack = True
                        failures = 0
                        self._on_ack(ack)
            except grpc.RpcError as exc:
                if self._closing.is_set():
                    return
                code = exc.code() if hasattr(exc, "code") else None
                log.warning("stream to %s ended: %s", target, code)
            finally:
                self._call = None
                with self._cv:  # retire this stream's request iterator now
                    self._stream += 1
                    self._cv.notify_all()
            if self._closing.is_set():
                return
            self.stats.reconnects += 1
            if not got_ack:
                failures += 1
                index = (index + 1) % len(self.targets)
            if failures and failures % len(self.targets) == 0:
                rounds = failures // len(self.targets)
                delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (rounds - 1))
                self._closing.wait(delay * random.uniform(0.5, 1.0))
