"""Edge configuration: typed, defaults in code, YAML laid over them, typos refused.

Command-line flags are laid over the file. Every error names the key and the
file, in one line, so the CLI can print it and exit 2.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from stratoscope.edge.errors import ConfigError
from stratoscope.edge.spec import default_programs, discover

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """'10s', '500ms', '2m', or a number of seconds -> seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(f"invalid duration {value!r} (use e.g. 10s, 500ms, 2m)")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


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
    data: dict[str, Any] = {}
    where = str(path) if path else "command line"
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path}: invalid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: top level must be a mapping")
        data.update(loaded)
    if "programs" in data or overrides.get("programs") is not None:
        data["programs_explicit"] = True
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = EdgeConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"config {where}: unknown key {loc!r}") from None
        raise ConfigError(f"config {where}: {loc}: {err['msg']}") from None
    known = list(discover(cfg.bpf_dir))
    unknown = [p for p in cfg.programs if p not in known]
    if unknown:
        raise ConfigError(
            f"unknown program {unknown[0]!r} (known: {', '.join(known)})"
        )
    return cfg
