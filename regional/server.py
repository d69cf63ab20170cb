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

from stratoscope.v1 import batch_pb2 as pb
from stratoscope.v1 import ingest_pb2

log = logging.getLogger("stratoscope.regional")

MAX_MESSAGE = 32 * 1024 * 1024


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    key: Path
    #: CA for client certificates: set -> mTLS required, node identity = certificate CN.
    client_ca: Path | None = None


class Admission(Protocol):
    """What answers a batch: the ack to send (ingest.Admission: the Gate, then the
    hand-over to the merge)."""

    async def accept(self, batch: pb.Batch, peer_node: str | None, wire: bytes) -> ingest_pb2.Ack:
        """``peer_node``: the client certificate's CN under mTLS; ``wire``: the batch's
        bytes as received (what the write-ahead log keeps)."""
        ...


def _peer_node(context: grpc.aio.ServicerContext) -> str | None:
    auth = context.auth_context()
    names = auth.get("x509_common_name") if auth else None
    return names[0].decode() if names else None


def _deserialize(data: bytes) -> tuple[bytes, pb.Batch]:
    """Keep the wire bytes beside the message: their size is checked (recomputing it with
    ByteSize costs ~250 us a batch)."""
    return data, pb.Batch.FromString(data)


class IngestService:
    """stratoscope.v1.Ingest; registered by hand so requests keep their wire size."""

    def __init__(self, admission: Admission, require_identity: bool) -> None:
        self.admission = admission
        self.require_identity = require_identity

    async def Stream(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[tuple[bytes, pb.Batch]],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ingest_pb2.Ack]:
        peer = _peer_node(context) if self.require_identity else None
        if self.require_identity and peer is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        async for raw, batch in request_iterator:
            yield await self.admission.accept(batch, peer, raw)

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


async def serve(admission: Admission, listen: str, tls: ServerTls | None = None
                ) -> tuple[grpc.aio.Server, int]:
    """Start the server; returns it running and the port it listens on. The caller
    stops it."""
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
    service = IngestService(admission, require_identity=bool(tls and tls.client_ca))
    server.add_generic_rpc_handlers((service.handler(),))
    try:
        if tls is None:
            port = server.add_insecure_port(listen)
        else:
            creds = grpc.ssl_server_credentials(
                [(tls.key.read_bytes(), tls.cert.read_bytes())],
                root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
                require_client_auth=tls.client_ca is not None,
            )
            port = server.add_secure_port(listen, creds)
    except RuntimeError:  # grpcio >= 1.55 raises where older ones returned 0
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {listen} (in use, or not an address of this host)")
    await server.start()
    log.info("ingest listening on %s (port %d)%s", listen, port, " with TLS" if tls else "")
    return server, port
