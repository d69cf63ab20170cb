"""gRPC ingest (grpc.aio on uvloop): one bidirectional stream per edge, acks by seq.

Runs in the ingest process (regional/ingest.py); it answers each batch with what an
``Admission`` says, and knows nothing of what happens to accepted batches.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
from google.protobuf.message import DecodeError

from stratoscope.regional.auth import (
    Authenticator,
    CertificateFiles,
    CertificateReloader,
    Refused,
    TokenTable,
)
from stratoscope.v1 import batch_pb2 as pb
from stratoscope.v1 import ingest_pb2

log = logging.getLogger("stratoscope.regional")

MAX_MESSAGE = 32 * 1024 * 1024


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    key: Path
    #: CA for client certificates: set -> mTLS required, node identity from the
    #: certificate (regional/auth.py).
    client_ca: Path | None = None


@dataclass(frozen=True)
class ServerAuth:
    """How the ingest server authenticates (paths only: it crosses to the ingest
    process). Neither ``tls`` nor ``tokens``: plaintext, anyone may send as anyone
    (``insecure``)."""

    tls: ServerTls | None = None
    #: Token file (regional/auth.py): a bearer token per node.
    tokens: Path | None = None


class Admission(Protocol):
    """What answers a batch: the ack to send (ingest.Admission: the Gate, then the
    hand-over to the merge)."""

    async def accept(self, batch: pb.Batch, peer: frozenset[str] | None, wire: bytes) -> ingest_pb2.Ack:
        """``peer``: the node names the stream authenticated as (None: no
        authentication configured); ``wire``: the batch's bytes as received (what the
        write-ahead log keeps). Raises auth.Refused for a node_id not in ``peer``."""
        ...

    def refused(self, reason: str) -> None:
        """Count a stream or batch refused for who sent it (one of auth.REFUSALS)."""
        ...

    def undecodable(self, size: int) -> ingest_pb2.Ack:
        """The answer to a message that is not a Batch (counted as rejected, "encoding")."""
        ...


def _deserialize(data: bytes) -> tuple[bytes, pb.Batch | None]:
    """Keep the wire bytes beside the message: their size is checked (recomputing it with
    ByteSize costs ~250 us a batch). None: not a Batch message (answered REJECTED and
    counted; raised here, gRPC would end the stream and log a traceback per message)."""
    try:
        return data, pb.Batch.FromString(data)
    except DecodeError:
        return data, None


class IngestService:
    """stratoscope.v1.Ingest; registered by hand so requests keep their wire size."""

    def __init__(self, admission: Admission, auth: Authenticator) -> None:
        self.admission = admission
        self.auth = auth

    async def Stream(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[tuple[bytes, pb.Batch | None]],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ingest_pb2.Ack]:
        try:
            peer = self.auth.names(context)
        except Refused as exc:
            self.admission.refused(exc.reason)
            await context.abort(exc.code, str(exc))
        async for raw, batch in request_iterator:
            if batch is None:
                yield self.admission.undecodable(len(raw))
                continue
            try:
                ack = await self.admission.accept(batch, peer, raw)
            except Refused as exc:
                # the whole stream: every later batch on it would claim the same node
                self.admission.refused(exc.reason)
                await context.abort(exc.code, str(exc))
            yield ack

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "stratoscope.v1.Ingest",
            {
                "Stream": grpc.stream_stream_rpc_method_handler(
                    self.Stream,
                    request_deserializer=_deserialize,
                    response_serializer=ingest_pb2.Ack.SerializeToString,
                )
            },
        )


#: HTTP/2 flow control with a fixed window instead of BDP probing. With probing, gRPC
#: answers incoming data with PING frames to size the window: more frames and thread
#: wake-ups per batch on both sides (server CPU per batch 0.82-0.90 ms with it,
#: 0.69-0.75 ms without, against an ack-only server: loadtest/ingest_cost.py). The 1 MiB
#: per-stream window holds ~35 ordinary sealed batches (~27 KiB); for a larger message
#: gRPC still opens the window to the rest of that message, so a 16 MiB batch is not
#: held to 1 MiB per round trip. (With probing, gRPC's window starts at 4 MiB or more.)
FLOW_CONTROL = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1 << 20)]


async def serve(admission: Admission, listen: str, auth: ServerAuth | None = None
                ) -> tuple[grpc.aio.Server, int]:
    """Start the server; returns it running and the port it listens on. The caller
    stops it. Certificates and tokens are re-read when their files change
    (regional/auth.py)."""
    auth = auth or ServerAuth()
    tls = auth.tls
    # Acks go out uncompressed (a few bytes; gzip would set up a deflate stream per
    # ack). Requests in any encoding gRPC knows are inflated by gRPC itself.
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        # gRPC sets SO_REUSEPORT by default: a second regional on the same port would
        # start silently and take a share of the edges' connections
        ("grpc.so_reuseport", 0),
        *FLOW_CONTROL,
    ])
    tokens = TokenTable(auth.tokens) if auth.tokens is not None else None
    authenticator = Authenticator(client_ca=bool(tls and tls.client_ca), tokens=tokens)
    service = IngestService(admission, authenticator)
    server.add_generic_rpc_handlers((service.handler(),))
    try:
        if tls is None:
            port = server.add_insecure_port(listen)
        else:
            reloader = CertificateReloader(CertificateFiles(tls.cert, tls.key, tls.client_ca))
            creds = grpc.dynamic_ssl_server_credentials(
                reloader.initial, reloader, require_client_authentication=tls.client_ca is not None)
            port = server.add_secure_port(listen, creds)
    except RuntimeError:  # grpcio >= 1.55 raises where older ones returned 0
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {listen} (in use, or not an address of this host)")
    await server.start()
    how = ("mTLS" if tls and tls.client_ca else "TLS and tokens" if tls and tokens
           else "TLS, no authentication" if tls else "plaintext and tokens" if tokens
           else "plaintext, no authentication")
    log.info("ingest listening on %s (port %d), %s", listen, port, how)
    return server, port
