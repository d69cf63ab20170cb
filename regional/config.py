"""The regional's settings: one typed model, every default here and nowhere else.

``stratoscope regional --config FILE`` reads a YAML file shaped like this model
(deploy/regional.example.yaml lists every setting with its default); flags are laid
over the file (stratoscope/settings.py). The model is validated once, in the parent
process, before any child process starts: a mistake is one line naming the key and
where it came from, and the CLI exits 2.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stratoscope.regional.liveness import DEFAULT_TIMEOUT_S
from stratoscope.regional.ratelimit import RateSettings
from stratoscope.regional.rollups import Rollup
from stratoscope.regional.sinks.config import ClickHouseSettings, KafkaSettings, SinkSettings
from stratoscope.regional.walwriter import DEFAULT_FSYNC_TIMEOUT_S, SLOW_S
from stratoscope.settings import Duration, NonNegativeDuration, readable_file

__all__ = [
    "DEFAULT_DSN",
    "DEFAULT_WAL_DIR",
    "DEFAULT_MAX_HELD_BYTES",
    "DEFAULT_MAX_HELD_POINTS",
    "QUEUE_MAX",
    "QUEUE_RETRY",
    "RegionalConfig",
    "TlsSettings",
]

#: The embedded store a regional writes to unless told otherwise.
DEFAULT_DSN = "chdb:///var/lib/stratoscope/clickhouse"
#: Where a regional logs accepted batches unless told otherwise.
DEFAULT_WAL_DIR = Path("/var/lib/stratoscope/wal")

#: Sink backlog (blocks) at which edges are told to RETRY, and the queue's hard bound.
#: Backpressure before memory: edges get RETRY once a sink is QUEUE_RETRY blocks behind
#: (they keep their batches and back off); the queue itself drops oldest only past
#: QUEUE_MAX. In a saturation benchmark a 50k-block allowance let the regional grow to
#: 14.7 GB while ClickHouse fell behind.
QUEUE_RETRY = 3000
QUEUE_MAX = 6000

#: Default bound on points held in windows (Regional.max_held_points). A window is held
#: from its first batch until its last frame is queued for the sinks: at 500 k points/s,
#: 60 s windows, 15 s lateness and ~15-25 s to reduce and queue a closed window, that
#: peaks near 50 M. 64 M leaves room for that; in the benchmark a held point costs
#: ~200-300 bytes of the regional's RSS (docs/BENCHMARKS.md), so ~13-19 GB.
DEFAULT_MAX_HELD_POINTS = 64_000_000

#: Default bound on the bytes windows hold (Regional.max_held_bytes, as the merge
#: accounts them: regional/merge.py). Windows hold their aggregates, so this follows
#: distinct series, not points received (docs/BENCHMARKS.md: bytes per held series).
DEFAULT_MAX_HELD_BYTES = 2 * 1024**3

#: The shortest ``wal_fsync_timeout``: under saturation an ordinary group commit took
#: seconds (README: ack p99 2.6 s, each fsync committing the filesystem's journal), and a
#: deadline under the slow-call warning's threshold would stop a regional unwarned.
MIN_FSYNC_TIMEOUT_S = SLOW_S


class TlsSettings(BaseModel):
    """TLS of the ingest server; with ``client_ca``, mTLS and node identity from the
    client certificate (regional/auth.py). The files are re-read when they change."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)
    cert: Path | None = None
    key: Path | None = None
    #: CA of edge certificates: requires mTLS; a batch's node_id must be one of the
    #: certificate's subjectAltName DNS or URI entries (its CN when it has none).
    client_ca: Path | None = None

    @model_validator(mode="after")
    def _pairs(self) -> TlsSettings:
        if self.cert is None and self.key is None:
            raise ValueError("tls.client_ca needs tls.cert and tls.key (the server's certificate)"
                             if self.client_ca is not None else
                             "tls needs cert and key (or leave tls out for plaintext)")
        if self.cert is None or self.key is None:
            raise ValueError("tls.cert and tls.key go together")
        readable_file(self.cert, "tls.cert")
        readable_file(self.key, "tls.key")
        if self.client_ca is not None:
            readable_file(self.client_ca, "tls.client_ca")
        return self


def _sink_section(value: Any, required: str, default: str | None) -> Any:
    """A sink's section as a mapping: "none" (or null) disables it, a string is the
    ``required`` setting's value, and ``default`` fills it in when absent."""
    if isinstance(value, str):
        return None if value.strip().lower() == "none" else {required: value}
    if isinstance(value, dict) and default is not None and required not in value:
        return {required: default, **value}
    return value


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not (sep and host and port.isdigit() and int(port) < 65536):
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


class RegionalConfig(BaseModel):
    """Every setting of a regional (see deploy/regional.example.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    #: gRPC ingest address, HOST:PORT (port 0: any free port).
    listen: str = "0.0.0.0:7400"
    #: Port for /metrics; 0 disables it.
    metrics_port: int = Field(default=9432, ge=0, le=65535)
    metrics_addr: str = "0.0.0.0"
    #: The read endpoint (regional/queryapi.py: cookbook queries only), HOST:PORT; None
    #: (``none`` on the command line) disables it. Loopback by default: with an embedded
    #: store it is how ``stratoscope query`` on this machine reads while the regional runs.
    query_listen: str | None = "127.0.0.1:9433"
    #: Read-endpoint queries run at once; more are answered 429. A query runs in the
    #: ClickHouse sink process, which answers one request at a time: while it runs,
    #: the sink's inserts wait (up to the endpoint's 10 s of server time per query).
    query_max_concurrent: int = Field(default=1, ge=1, le=16)
    #: Names this regional in its logs and in the roll-ups it writes (not in block
    #: identities: those depend on their sources only).
    regional_id: str = Field(default_factory=socket.gethostname, min_length=1)
    #: Output window (whole seconds).
    resolution: Duration = 60.0
    #: How long a window stays open after its end for late batches.
    lateness: NonNegativeDuration = 15.0
    #: Reduce closed windows in a forked child (its own GIL and core), not a thread.
    fork_frames: bool = True
    #: Nodes per frame a closed window is reduced and stored in; the ClickHouse sink
    #: inserts a delivery's frames together, and a delivery takes up to two frames.
    frame_nodes: int = 250
    #: Points (series points and event rows) the merge may hold in windows not yet
    #: stored; past it (checked every 0.2 s, so a soft bound) edges are answered RETRY
    #: until windows close. ~200-300 bytes of RSS each.
    max_held_points: int = Field(default=DEFAULT_MAX_HELD_POINTS, ge=1)
    #: Bytes the merge may hold in windows not yet stored (its own account of their
    #: arrays and objects); past it edges are answered RETRY, like max_held_points.
    max_held_bytes: int = Field(default=DEFAULT_MAX_HELD_BYTES, ge=1)
    #: Program descriptions whose declared roll-ups apply: the edges' programs directory
    #: when it holds programs beside the packaged ones; None: the packaged bpf/.
    programs_dir: Path | None = None
    #: Roll-ups across nodes; None: those the descriptions in ``programs_dir`` declare
    #: (regional/rollups.py).
    rollups: tuple[Rollup, ...] | None = None

    @field_validator("programs_dir")
    @classmethod
    def _programs_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not any(value.glob("*.yaml")):
            raise ValueError(f"no program descriptions (*.yaml) in {str(value)!r}")
        return value
    #: The write-ahead log (regional/wal.py): a batch is acknowledged once it is in
    #: this directory, and windows are rebuilt from it after a crash. None (``none`` on
    #: the command line) keeps acknowledged batches in memory only: a crash loses them.
    wal_dir: Path | None = DEFAULT_WAL_DIR
    #: ``ack``: fsync before acknowledging (group commit: one fsync for the batches that
    #: arrived meanwhile); ``interval``: acknowledge once written, fsync every second (a
    #: crash of the machine, not of the process, may lose the last second).
    wal_fsync: Literal["ack", "interval"] = "ack"
    #: Bytes the log may hold; from 90 % of it, edges are answered RETRY (they keep
    #: their batches in their spool) until sinks confirm what the log holds.
    wal_max_bytes: int = Field(default=8 * 1024**3, ge=1024**2)
    #: How long one write or fsync of the log may stay in progress before its disk is
    #: taken for stuck (regional/walwriter.py): the regional then stops taking batches and
    #: exits 1 (the exit completes when the kernel returns the call). Meanwhile the
    #: batches waiting on it are not answered, so edges fail over after their ack_timeout.
    wal_fsync_timeout: Duration = DEFAULT_FSYNC_TIMEOUT_S
    @property
    def wal_segment_bytes(self) -> int:
        """Segments of at most 1/16 of the bound (64 KiB..64 MiB): the segment being
        written is never deleted, so it must stay well under the bound's RETRY point."""
        return max(64 * 1024, min(64 * 1024**2, self.wal_max_bytes // 16))

    #: On SIGTERM: how long to go on storing what is held before exiting; what is not
    #: stored by then stays in the log and is stored after the next start.
    stop_timeout: NonNegativeDuration = 30.0
    #: How long a child process (ingest, a sink) may leave the regional's ping unanswered
    #: before it is taken for hung (regional/liveness.py): a sink process is killed and
    #: replaced, its deliveries retried; a hung ingest process stops the regional (exit 1).
    #: The ingest process watches the merge process (the regional) with the same deadline:
    #: a hung one is killed (SIGKILL), for its supervisor to restart it.
    child_timeout: Duration = DEFAULT_TIMEOUT_S

    @field_validator("wal_fsync_timeout")
    @classmethod
    def _wal_fsync_timeout(cls, value: float) -> float:
        if value < MIN_FSYNC_TIMEOUT_S:
            raise ValueError(f"must be at least {MIN_FSYNC_TIMEOUT_S:g}s (a busy disk's fsync takes "
                             f"seconds), got {value:g}s")
        return value

    @field_validator("wal_dir", mode="before")
    @classmethod
    def _wal_dir(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
            return None
        return value

    #: TLS of the ingest server; None: plaintext (only with ``insecure``).
    tls: TlsSettings | None = None
    #: Bearer tokens, one per node (``<node_id> <token>`` lines; regional/auth.py): the
    #: way to authenticate edges without a PKI. Needs ``tls`` unless ``insecure``.
    auth_tokens: Path | None = None
    #: Take batches without authenticating edges (no ``tls.client_ca``, no
    #: ``auth_tokens``): any client may send as any node. For loopback demos and tests;
    #: warned about at start and on /metrics (stratoscope_regional_insecure).
    insecure: bool = False
    #: Per node: batches and bytes (as received) per second, the seconds of the ingest
    #: process's CPU per second its batches may take to open and validate, and the seconds
    #: of burst above them (regional/ratelimit.py); a node over them is answered RETRY.
    #: 0: no limit.
    node_max_batches_per_s: float = Field(default=50.0, ge=0)
    node_max_bytes_per_s: float = Field(default=32 * 1024**2, ge=0)
    node_max_cpu: float = Field(default=0.1, ge=0, le=1)
    node_burst: Duration = 10.0
    #: The ClickHouse sink; None (``none`` on the command line) disables it.
    clickhouse: ClickHouseSettings | None = ClickHouseSettings(dsn=DEFAULT_DSN)
    #: The Kafka sink; None (the default) disables it.
    kafka: KafkaSettings | None = None

    @field_validator("clickhouse", mode="before")
    @classmethod
    def _clickhouse(cls, value: Any) -> Any:
        return _sink_section(value, "dsn", DEFAULT_DSN)

    @field_validator("kafka", mode="before")
    @classmethod
    def _kafka(cls, value: Any) -> Any:
        return _sink_section(value, "bootstrap", None)

    @field_validator("resolution")
    @classmethod
    def _whole_seconds(cls, value: float) -> float:
        if value != int(value):
            raise ValueError(f"must be whole seconds, got {value:g}s")
        return value

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return _host_port(value)

    @field_validator("query_listen", mode="before")
    @classmethod
    def _query_listen(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        return _host_port(str(value))

    @field_validator("frame_nodes")
    @classmethod
    def _frame_nodes(cls, value: int) -> int:
        # A frame is a delivery's worth of blocks (one per node): past a third of the
        # RETRY backlog, two frames in the queue would send edges RETRY.
        if not 1 <= value <= QUEUE_RETRY // 3:
            raise ValueError(f"frame_nodes must be 1..{QUEUE_RETRY // 3}, got {value}")
        return value

    @model_validator(mode="after")
    def _tokens(self) -> RegionalConfig:
        if self.auth_tokens is not None:
            readable_file(self.auth_tokens, "auth_tokens")
            if self.tls is not None and self.tls.client_ca is not None:
                raise ValueError("tls.client_ca and auth_tokens are two ways to authenticate edges: "
                                 "set one (mTLS or tokens)")
        return self

    def ingest_auth_error(self) -> str | None:
        """Why this regional may not serve ingest as configured, or None: edges are
        authenticated unless ``insecure`` says otherwise, and every half-configured
        combination is one line naming the fix. Checked by whatever serves ingest
        (the ``regional`` command, RunningRegional), not by the model: the other
        commands read these settings without serving."""
        if self.insecure:
            return None
        if self.tls is None:
            if self.auth_tokens is not None:
                return ("auth_tokens need TLS (a token in plaintext can be read off the network): "
                        "set tls.cert and tls.key (--tls-cert, --tls-key), or insecure: true "
                        "(--insecure) on a trusted network")
            return ("the ingest port needs TLS and authenticated edges: set tls.cert, tls.key and "
                    "tls.client_ca or auth_tokens (--tls-cert, --tls-key, --tls-client-ca or "
                    "--auth-tokens), or insecure: true (--insecure) on a trusted network")
        if self.tls.client_ca is None and self.auth_tokens is None:
            return ("edges are not authenticated: set tls.client_ca (--tls-client-ca, mTLS) or "
                    "auth_tokens (--auth-tokens), or insecure: true (--insecure) on a trusted network")
        return None

    @property
    def rate_settings(self) -> RateSettings:
        return RateSettings(batches_per_s=self.node_max_batches_per_s,
                            bytes_per_s=self.node_max_bytes_per_s, cpu_per_s=self.node_max_cpu,
                            burst_s=self.node_burst)

    @property
    def resolution_s(self) -> int:
        return int(self.resolution)

    def held_secrets(self) -> list[str]:
        """The sinks' passwords these settings hold in memory (stratoscope.redact)."""
        return [secret for s in self.sinks for secret in s.held_secrets()]

    @property
    def sinks(self) -> list[SinkSettings]:
        """The enabled sinks, in the order they start."""
        return [s for s in (self.clickhouse, self.kafka) if s is not None]
