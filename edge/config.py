"""Edge configuration: typed, defaults in code, YAML laid over them, typos refused.

Command-line flags are laid over the file. Every error names the key and the
file, in one line, so the CLI can print it and exit 2.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stratoscope.edge.errors import ConfigError
from stratoscope.edge.spec import default_programs, discover
from stratoscope.settings import (
    COMMAND_LINE,
    Duration,
    parse_duration,
    read_yaml,
    validate_settings,
)

__all__ = ["ConfigError", "Duration", "EdgeConfig", "Limits", "load_config", "parse_duration"]


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
    #: Batch compression to the regional: zstd (sealed body, stratoscope/wire.py), gzip
    #: (gRPC's, for regionals older than the sealed form) or none.
    compression: Literal["zstd", "gzip", "none"] = "zstd"
    #: Numeric columns to the regional: raw little-endian arrays (the ``_le`` fields), or
    #: packed for regionals that predate them (they would read raw columns as empty).
    wire_columns: Literal["raw", "packed"] = "raw"
    metrics_port: int = Field(default=9431, ge=0, le=65535)
    metrics_addr: str = "0.0.0.0"
    bpf_dir: Path | None = None
    #: Turns on kernel.bpf_stats_enabled for per-program run time (costs ~80 ns/event).
    bpf_stats: bool = False
    duration: Duration | None = None
    once: bool = False

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
