"""The ingest server is built with the regional's HTTP/2 flow-control options."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from stratoscope.regional import server


async def test_serve_uses_a_fixed_window_without_bdp_probing(monkeypatch: pytest.MonkeyPatch) -> None:
    """gRPC ignores channel arguments it does not know, so a lost or misspelt option would
    only show as CPU: check what ``serve`` hands gRPC, and that gRPC knows the names."""
    seen: list[dict[str, Any]] = []
    real = grpc.aio.server

    def recording_server(*args: Any, **kwargs: Any) -> Any:
        seen.append(dict(kwargs.get("options") or []))
        return real(*args, **kwargs)

    monkeypatch.setattr(server.grpc.aio, "server", recording_server)
    srv, port = await server.serve(object(), "127.0.0.1:0")  # type: ignore[arg-type]
    assert port > 0
    await srv.stop(0)
    assert len(seen) == 1
    assert seen[0]["grpc.http2.bdp_probe"] == 0
    assert seen[0]["grpc.http2.lookahead_bytes"] == 1 << 20
    assert set(dict(server.FLOW_CONTROL)) <= set(seen[0])
    # the names are gRPC core's own (GRPC_ARG_HTTP2_BDP_PROBE, ..._STREAM_LOOKAHEAD_BYTES):
    # they appear, NUL-terminated, in the gRPC library this process loaded
    from grpc._cython import cygrpc

    with open(cygrpc.__file__, "rb") as f:
        core = f.read()
    for name in dict(server.FLOW_CONTROL):
        assert name.encode() + b"\0" in core, name
