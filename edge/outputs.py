"""Where batches go: JSON lines (a file or stdout, for looking at them) or a regional over
gRPC (edge/forward.py), behind one ``Output`` protocol the collector loop writes to."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Protocol

from stratoscope.edge.batch import batch_to_dict
from stratoscope.edge.errors import ConfigError
from stratoscope.v1 import batch_pb2 as pb


class Output(Protocol):
    def write(self, batch: pb.Batch) -> None: ...
    def close(self) -> None: ...


class JsonlOutput:
    """One JSON object per batch, every string resolved; flushed per batch."""

    def __init__(self, target: str) -> None:
        self._own = target != "-"
        self._fh: IO[str] = open(Path(target), "a", encoding="utf-8") if self._own else sys.stdout  # noqa: SIM115

    def write(self, batch: pb.Batch) -> None:
        self._fh.write(json.dumps(batch_to_dict(batch), separators=(",", ":")) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._own and not self._fh.closed:
            self._fh.close()


class ForwardOutput:
    """Batches to one or more regionals over gRPC, through the spool (see edge/forward.py
    and edge/spool.py; without a spool, in memory only)."""

    def __init__(self, targets: list[str], tls: object | None = None, close_timeout_s: float = 15.0,
                 compression: str = "zstd", wire_columns: str = "raw", spool: object | None = None,
                 in_doubt_timeout_s: float = 3600.0, token_file: Path | None = None,
                 ack_timeout_s: float = 30.0) -> None:
        from stratoscope.edge.forward import ClientTls, GrpcForwarder
        from stratoscope.edge.spool import Spool

        assert tls is None or isinstance(tls, ClientTls)
        assert spool is None or isinstance(spool, Spool)
        self.forwarder = GrpcForwarder(targets, tls=tls, compression=compression,
                                       wire_columns=wire_columns, spool=spool,
                                       in_doubt_timeout_s=in_doubt_timeout_s, token_file=token_file,
                                       ack_timeout_s=ack_timeout_s)
        self.close_timeout_s = close_timeout_s

    def write(self, batch: pb.Batch) -> None:
        self.forwarder.write(batch)

    def close(self) -> None:
        self.forwarder.close(self.close_timeout_s)


class MultiOutput:
    def __init__(self, outputs: list[Output]) -> None:
        self.outputs = outputs

    def write(self, batch: pb.Batch) -> None:
        for o in self.outputs:
            o.write(batch)

    def close(self) -> None:
        for o in self.outputs:
            o.close()


def open_output(spec: str) -> Output:
    kind, _, target = spec.partition(":")
    if kind == "jsonl" and target:
        try:
            return JsonlOutput(target)
        except OSError as exc:
            raise ConfigError(f"cannot open output {target}: {exc.strerror}") from None
    raise ConfigError(f"unknown output {spec!r} (use jsonl:PATH or jsonl:-)")
