"""Edge configuration: typed, defaults in code, YAML laid over them, typos refused.

Command-line flags are laid over the file. Every error names the key and the
file, in one line, so the CLI can print it and exit 2.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from stratoscope.edge.errors import ConfigError
from stratoscope.edge.spec import default_programs, discover
from stratoscope.settings import (
    COMMAND_LINE,
    Duration,
    parse_duration,
    read_yaml,
    readable_file,
    validate_settings,
)

__all__ = ["ByteSize", "ConfigError", "Duration", "EdgeConfig", "Limits", "load_config", "parse_duration",
           "parse_size"]


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|TiB)?\s*$")
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def parse_size(value: Any) -> int:
    """'256MiB', '1GiB', '4096' or a number of bytes -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"invalid size {value!r} (use e.g. 256MiB, 1GiB or a number of bytes)")
    return int(m.group(1)) * _UNITS[m.group(2)]


ByteSize = Annotated[int, BeforeValidator(parse_size)]
#: Where the edge spools batches until a regional acknowledges them (edge/spool.py).
DEFAULT_SPOOL_DIR = Path("/var/lib/stratoscope/edge/spool")


class Limits(BaseModel):
    """Cardinality and size bounds; every one is a setting."""

    model_config = ConfigDict(extra="forbid")
    series_per_metric: int = Field(default=2000, ge=1)
    profile_rows: int = Field(default=5000, ge=1)
    events_per_batch: int = Field(default=10000, ge=1)


class EdgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_id: str = Field(default_factory=socket.gethostname, min_length=1)
    labels: dict[str, str] = Field(default_factory=dict)
    interval: Duration = 10.0
    #: Empty (the default): the programs whose description in bpf_dir says
    #: ``default: true`` (the default for a description).
    programs: list[str] = Field(default_factory=list)
    #: Whether `programs` was chosen by the user (attach failures are then fatal).
    programs_explicit: bool = False
    params: dict[str, dict[str, int]] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=lambda: Limits())
    output: str | None = None
    #: Regional aggregators, HOST:PORT, tried in order (failover).
    regional: list[str] = Field(default_factory=list)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    #: A file holding this node's bearer token (regional/auth.py), read for every stream.
    auth_token_file: Path | None = None
    #: Forward without TLS: for loopback and trusted networks only (the regional must be
    #: started with ``insecure`` too).
    insecure: bool = False
    #: Batch compression to the regional: zstd (sealed body, stratoscope/wire.py), gzip
    #: (gRPC's, for regionals older than the sealed form) or none.
    compression: Literal["zstd", "gzip", "none"] = "zstd"
    #: Numeric columns to the regional: raw little-endian arrays (the ``_le`` fields), or
    #: packed for regionals that predate them (they would read raw columns as empty).
    wire_columns: Literal["raw", "packed"] = "raw"
    #: The on-disk spool of batches not yet acknowledged (edge/spool.py): always on when
    #: batches go to a regional; survives restarts. Its bounds: bytes of unacknowledged
    #: batches and their age (past either the oldest is dropped and counted).
    spool_dir: Path = DEFAULT_SPOOL_DIR
    spool_max_bytes: ByteSize = Field(default=256 << 20, ge=1 << 20)
    spool_max_age: Duration = 24 * 3600.0
    #: How long a batch sent to a regional and not answered is held for that regional
    #: only (edge/forward.py: the failover rule that prevents double counting).
    in_doubt_timeout: Duration = 3600.0
    #: How long a regional may leave batches unanswered, with no answer at all, before
    #: the edge treats it as down and fails over (edge/forward.py: a hung regional keeps
    #: its TCP connection up, so only a deadline notices it). Its unanswered batches stay
    #: held for it (in_doubt_timeout).
    ack_timeout: Duration = 30.0
    metrics_port: int = Field(default=9431, ge=0, le=65535)
    metrics_addr: str = "0.0.0.0"
    bpf_dir: Path | None = None
    #: Turns on the kernel's BPF run-time statistics while the edge runs, for per-program
    #: run time (costs ~80 ns/event; needs CAP_SYS_ADMIN at start-up, edge/privileges.py).
    bpf_stats: bool = False
    duration: Duration | None = None
    once: bool = False

    @model_validator(mode="after")
    def _credentials(self) -> EdgeConfig:
        """Half-configured TLS is an error naming the fix, never a silent plaintext."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (--tls-cert, --tls-key)")
        if self.tls_ca is None:
            if self.tls_cert is not None:
                raise ValueError("tls_cert and tls_key need tls_ca (--tls-ca: the CA that signed the "
                                 "regional's certificate)")
            if self.tls_server_name is not None:
                raise ValueError("tls_server_name needs tls_ca (--tls-ca)")
            if self.regional and not self.insecure:
                raise ValueError("forwarding to a regional needs TLS: set tls_ca (--tls-ca) and "
                                 "tls_cert/tls_key or auth_token_file, or insecure: true "
                                 "(--insecure) on a trusted network")
        for name in ("tls_ca", "tls_cert", "tls_key", "auth_token_file"):
            path = getattr(self, name)
            if path is not None:
                readable_file(path, name)
        return self

    @model_validator(mode="after")
    def _default_programs(self) -> EdgeConfig:
        if not self.programs:
            self.programs = default_programs(self.bpf_dir)
        return self


def load_config(path: Path | None, overrides: dict[str, Any]) -> EdgeConfig:
    """File (if any) with command-line overrides on top, validated once."""
    data: dict[str, Any] = read_yaml(path, ConfigError) if path is not None else {}
    if "programs" in data or overrides.get("programs") is not None:
        data["programs_explicit"] = True
    data.update({k: v for k, v in overrides.items() if v is not None})
    cfg = validate_settings(EdgeConfig, data, str(path) if path else COMMAND_LINE, ConfigError)
    known = list(discover(cfg.bpf_dir))
    unknown = [p for p in cfg.programs if p not in known]
    if unknown:
        raise ConfigError(
            f"unknown program {unknown[0]!r} (known: {', '.join(known)})"
        )
    return cfg
