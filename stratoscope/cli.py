"""`stratoscope` command line: one entry point, a subcommand per component.

Every error a person can fix prints one line (what is wrong, how to fix it) and
exits 2 without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

EXIT_USAGE = 2


def _edge_parser(sub: Any) -> None:
    p = sub.add_parser("edge", help="run the edge collector on this node")
    p.add_argument("--config", type=Path, help="YAML configuration file")
    p.add_argument("--interval", help="drain interval, e.g. 10s (default 10s)")
    p.add_argument("--programs", help="comma-separated: syscalls,sched,tcp,block,process,profile")
    p.add_argument("--output", help="jsonl:PATH or jsonl:- for stdout (default: jsonl:- unless --regional)")
    p.add_argument("--regional", action="append", default=None, metavar="HOST:PORT",
                   help="regional aggregator; repeat for failover in order")
    p.add_argument("--compression", choices=("zstd", "gzip", "none"),
                   help="batch compression to the regional (default zstd)")
    p.add_argument("--wire-columns", choices=("raw", "packed"),
                   help="numeric columns as raw little-endian arrays (default) or packed, "
                        "for regionals older than raw columns")
    p.add_argument("--tls-ca", type=Path, help="CA that signed the regional's certificate (enables TLS)")
    p.add_argument("--tls-cert", type=Path, help="this node's client certificate (mTLS)")
    p.add_argument("--tls-key", type=Path, help="this node's client key (mTLS)")
    p.add_argument("--auth-token-file", type=Path,
                   help="file holding this node's bearer token, for a regional that authenticates "
                        "edges by token (needs --tls-ca)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="forward without TLS (or without credentials): trusted networks only")
    p.add_argument("--spool-dir", type=Path,
                   help="on-disk spool of batches not yet acknowledged by a regional "
                        "(default /var/lib/stratoscope/edge/spool)")
    p.add_argument("--spool-max-bytes", help="spool size bound, e.g. 256MiB (default); past it "
                   "the oldest batch is dropped and counted")
    p.add_argument("--spool-max-age", help="spool age bound, e.g. 24h (default)")
    p.add_argument("--in-doubt-timeout", help="how long a batch sent to a regional and not "
                   "answered goes to that regional only, e.g. 1h (default)")
    p.add_argument("--ack-timeout", help="how long a regional may leave batches unanswered "
                   "before the edge fails over to the next one, e.g. 30s (default)")
    p.add_argument("--duration", help="stop after this long, e.g. 30s")
    p.add_argument("--once", action="store_true", help="drain one interval and exit")
    p.add_argument("--metrics-port", type=int, help="port for /metrics (0 disables; default 9431)")
    p.add_argument("--node-id", help="node identity (default: hostname)")
    p.add_argument(
        "--param", action="append", default=[], metavar="PROGRAM.NAME=VALUE",
        help="compile-time parameter, e.g. syscalls.LATENCY=0 or profile.SAMPLE_HZ=99",
    )
    p.add_argument("--summary", action="store_true", help="print a readable summary at exit")
    p.set_defaults(func=_run_edge)


def _parse_params(items: list[str]) -> dict[str, dict[str, int]]:
    from stratoscope.edge.errors import ConfigError

    out: dict[str, dict[str, int]] = {}
    for item in items:
        name, eq, value = item.partition("=")
        prog, dot, param = name.partition(".")
        if not (eq and dot and prog and param):
            raise ConfigError(f"--param {item!r}: use PROGRAM.NAME=VALUE")
        try:
            out.setdefault(prog, {})[param] = int(value, 0)
        except ValueError:
            raise ConfigError(f"--param {item!r}: value must be an integer") from None
    return out


def _run_edge(args: argparse.Namespace) -> int:
    # One thread until the capabilities are dropped (edge/privileges.py); the edge does no BLAS.
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    from stratoscope.edge import preflight, privileges
    from stratoscope.edge.collector import Collector
    from stratoscope.edge.config import load_config

    overrides: dict[str, Any] = {
        "interval": args.interval,
        "programs": args.programs.split(",") if args.programs else None,
        "output": args.output,
        "duration": args.duration,
        "once": args.once or None,
        "metrics_port": args.metrics_port,
        "node_id": args.node_id,
        "regional": args.regional,
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "auth_token_file": args.auth_token_file,
        "insecure": args.insecure,
        "compression": args.compression,
        "wire_columns": args.wire_columns,
        "spool_dir": args.spool_dir,
        "spool_max_bytes": args.spool_max_bytes,
        "spool_max_age": args.spool_max_age,
        "in_doubt_timeout": args.in_doubt_timeout,
        "ack_timeout": args.ack_timeout,
    }
    params = _parse_params(args.param)
    cfg = load_config(args.config, overrides)
    for prog, values in params.items():
        cfg.params.setdefault(prog, {}).update(values)
    preflight.check()
    collector = Collector(cfg)
    output = None
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    summary = None
    if args.summary:
        from stratoscope.edge.summary import Summary

        summary = Summary()
    try:
        collector.start()
        privileges.drop_after_load(user_stacks=collector.symbolizes_user_stacks)
        output = _edge_output(cfg)  # its threads start with the reduced capabilities
        _register_forward_counters(output, collector.registry)
        if cfg.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(cfg.metrics_port, addr=cfg.metrics_addr, registry=collector.registry)
        logging.getLogger("stratoscope.edge").info(
            "attached %s; draining every %.1fs", ", ".join(p.name for p in collector.programs),
            cfg.interval,
        )

        def emit(batch: Any) -> None:
            output.write(batch)
            if summary is not None:
                summary.add(batch)

        rc = collector.run(emit, stop)
    finally:
        collector.stop()
        if output is not None:
            output.close()
    if summary is not None:
        summary.render(failed=collector.failed)
    return rc


def _edge_output(cfg: Any) -> Any:
    from stratoscope.edge.outputs import ForwardOutput, MultiOutput, Output, open_output

    outputs: list[Output] = []
    if cfg.regional:
        tls = None
        if cfg.tls_ca:
            from stratoscope.edge.forward import ClientTls

            tls = ClientTls(cfg.tls_ca, cfg.tls_cert, cfg.tls_key, cfg.tls_server_name)
        from stratoscope.edge.errors import ConfigError
        from stratoscope.edge.spool import Spool, SpoolError

        try:  # opened (and replayed) before collection starts: a bad directory exits 2
            spool = Spool(cfg.spool_dir, max_bytes=cfg.spool_max_bytes, max_age_s=cfg.spool_max_age)
        except SpoolError as exc:
            raise ConfigError(f"{exc} (set spool_dir or --spool-dir)") from None
        if spool.replayed or spool.corrupt_records:
            logging.getLogger("stratoscope.edge").info(
                "spool %s: %d unacknowledged batches to resend, %d corrupt records skipped",
                cfg.spool_dir, spool.replayed, spool.corrupt_records)
        outputs.append(ForwardOutput(cfg.regional, tls, compression=cfg.compression,
                                     wire_columns=cfg.wire_columns, spool=spool,
                                     in_doubt_timeout_s=cfg.in_doubt_timeout,
                                     token_file=cfg.auth_token_file,
                                     ack_timeout_s=cfg.ack_timeout))
    if cfg.output or not cfg.regional:
        outputs.append(open_output(cfg.output or "jsonl:-"))
    return outputs[0] if len(outputs) == 1 else MultiOutput(outputs)


def _register_forward_counters(output: Any, registry: Any) -> None:
    """Expose the forwarder's acked/rejected/dropped counts on the collector's /metrics."""
    from stratoscope.edge.metrics import ForwardCounters
    from stratoscope.edge.outputs import ForwardOutput

    for out in getattr(output, "outputs", [output]):
        if isinstance(out, ForwardOutput):
            registry.register(ForwardCounters(out.forwarder.counts))


#: The regional's flags: (flag, setting key, help). Every setting is also a key of the
#: --config file (dotted here: "kafka.bootstrap" is ``kafka: {bootstrap: ...}``); the
#: defaults live in the settings models (regional/config.py), not in argparse.
_REGIONAL_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--regional-id", "regional_id", "names this regional in its logs and roll-ups (default: hostname)"),
    ("--resolution", "resolution", "output window, e.g. 60s"),
    ("--lateness", "lateness", "allowed lateness before a window closes, e.g. 15s"),
    ("--frame-nodes", "frame_nodes", "nodes per frame a closed window is reduced and stored in"),
    ("--max-held-points", "max_held_points",
     "points (series points and event rows) the merge may hold in windows not yet stored; past "
     "it (checked every 0.2 s, so a soft bound) edges are answered RETRY until windows close"),
    ("--max-held-bytes", "max_held_bytes",
     "bytes the merge may hold in windows not yet stored (its account of their arrays); past it "
     "edges are answered RETRY until windows close, like --max-held-points"),
    ("--wal-dir", "wal_dir",
     "write-ahead log directory: batches are acknowledged once in it; 'none' keeps them in "
     "memory only (a crash loses them)"),
    ("--wal-fsync", "wal_fsync", "ack (fsync before acknowledging, default) or interval (every second)"),
    ("--wal-max-bytes", "wal_max_bytes", "bytes the log may hold; from 90 %% of it edges are answered RETRY"),
    ("--wal-fsync-timeout", "wal_fsync_timeout",
     "how long one write or fsync of the log may stay in progress before its disk is taken for "
     "stuck and the regional exits 1, e.g. 120s (default); edges fail over after their ack_timeout"),
    ("--stop-timeout", "stop_timeout",
     "on SIGTERM, how long to go on storing before exiting (the rest stays in the log), e.g. 30s"),
    ("--child-timeout", "child_timeout",
     "how long the ingest, merge or a sink process may leave a ping unanswered before it is taken "
     "for hung, e.g. 60s (default): a sink process is replaced, a hung ingest or merge process "
     "stops the regional"),
    ("--programs-dir", "programs_dir",
     "program descriptions (*.yaml) whose declared roll-ups apply (default: the packaged bpf/)"),
    ("--clickhouse", "clickhouse.dsn",
     "chdb:///DIR (embedded) or http(s)://host:8123/db; 'none' disables"),
    ("--clickhouse-user", "clickhouse.user", "ClickHouse server user (default: the server's default)"),
    # The password itself is not a flag (a command line is visible to every user of the
    # machine): it comes from the file, a file of its own, or the environment.
    ("--clickhouse-password-file", "clickhouse.password_file", "file holding the ClickHouse password"),
    ("--clickhouse-password-env", "clickhouse.password_env",
     "environment variable holding the ClickHouse password"),
    ("--clickhouse-database", "clickhouse.database",
     "database of the tables (default: the http(s) DSN's path, else stratoscope)"),
    ("--clickhouse-cluster", "clickhouse.cluster",
     "ClickHouse cluster the tables live on (ON CLUSTER, Replicated + Distributed tables)"),
    ("--clickhouse-retention-raw", "clickhouse.retention.raw", "days kept of points at 60 s and coarser, e.g. 35d"),
    ("--clickhouse-retention-raw-fine", "clickhouse.retention.raw_fine", "days kept of points under 60 s"),
    ("--clickhouse-retention-hourly", "clickhouse.retention.hourly", "days kept of hourly roll-ups"),
    ("--clickhouse-retention-profiles", "clickhouse.retention.profiles", "days kept of profile samples"),
    ("--clickhouse-retention-events", "clickhouse.retention.events", "days kept of process events"),
    ("--kafka", "kafka.bootstrap", "Kafka bootstrap servers (host:port,...); enables the Kafka sink"),
    ("--kafka-topic-prefix", "kafka.topic_prefix", "topics are PREFIX.metrics/.profiles/.events"),
    ("--kafka-compression", "kafka.compression", "auto, none, gzip, zstd, lz4 or snappy"),
    ("--kafka-request-timeout", "kafka.request_timeout", "Kafka request timeout, e.g. 30s"),
    ("--kafka-security-protocol", "kafka.security_protocol",
     "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
    ("--kafka-ssl-cafile", "kafka.ssl_cafile", "CA bundle of the brokers' certificates"),
    ("--kafka-ssl-certfile", "kafka.ssl_certfile", "client certificate for the brokers"),
    ("--kafka-ssl-keyfile", "kafka.ssl_keyfile", "client key for the brokers"),
    ("--kafka-sasl-mechanism", "kafka.sasl_mechanism", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"),
    ("--kafka-sasl-username", "kafka.sasl_username", "SASL user name"),
    # The password itself is not a flag (a command line is visible to every user of the
    # machine): it comes from the file, a file of its own, or the environment.
    ("--kafka-sasl-password-file", "kafka.sasl_password_file", "file holding the SASL password"),
    ("--kafka-sasl-password-env", "kafka.sasl_password_env",
     "environment variable holding the SASL password"),
    ("--clickhouse-dead-letter-dir", "clickhouse.dead_letter_dir",
     "directory for blocks ClickHouse can never store (default: dead-letter/clickhouse "
     "beside an embedded store)"),
    ("--kafka-dead-letter-dir", "kafka.dead_letter_dir",
     "directory for blocks Kafka refuses for good (default /var/lib/stratoscope/dead-letter/kafka)"),
)
_SERVER_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--listen", "listen", "gRPC ingest HOST:PORT"),
    ("--metrics-port", "metrics_port", "port for /metrics (0 disables)"),
    ("--metrics-addr", "metrics_addr", "address /metrics listens on"),
    ("--query-listen", "query_listen",
     "read endpoint for `stratoscope query`, HOST:PORT (cookbook queries only); 'none' disables"),
    ("--query-max-concurrent", "query_max_concurrent",
     "read-endpoint queries at once (default 1; each holds up the ClickHouse sink's inserts)"),
    ("--tls-cert", "tls.cert", "server certificate (enables TLS)"),
    ("--tls-key", "tls.key", "server key"),
    ("--tls-client-ca", "tls.client_ca",
     "CA of edge certificates: requires mTLS; node_id must be the certificate's SAN DNS/URI "
     "(its CN without SANs)"),
    ("--auth-tokens", "auth_tokens",
     "file of '<node_id> <token>' lines: edges authenticate with a bearer token (needs TLS)"),
    ("--node-max-batches-per-s", "node_max_batches_per_s",
     "batches per second one node may send before it is answered RETRY (default 50; 0: no limit)"),
    ("--node-max-bytes-per-s", "node_max_bytes_per_s",
     "bytes per second one node may send before it is answered RETRY (default 32 MiB; 0: no limit)"),
    ("--node-max-cpu", "node_max_cpu",
     "share of a core one node's batches may take to open and validate before it is answered "
     "RETRY (default 0.1; 0: no limit)"),
)
_BOOL_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--migrate", "clickhouse.migrate",
     "apply schema migrations at start (default: yes for embedded, no for a server)"),
    ("--clickhouse-retention-allow-shrink", "clickhouse.retention_allow_shrink",
     "let a retention setting shorten a table's TTL, deleting the rows past it (default: refused)"),
    ("--fork-frames", "fork_frames", "reduce closed windows in a forked child (default) or in a thread"),
    ("--insecure", "insecure",
     "take batches without authenticating edges (plaintext unless --tls-cert): trusted networks only"),
)


def _regional_args(p: argparse.ArgumentParser, server: bool) -> None:
    p.add_argument("--config", type=Path, help="YAML settings file (see deploy/regional.example.yaml); "
                   "flags override it")
    for flag, key, text in _REGIONAL_FLAGS + (_SERVER_FLAGS if server else ()):
        p.add_argument(flag, dest=f"set:{key}", metavar=key.rsplit(".", 1)[-1].upper(), help=text)
    for flag, key, text in _BOOL_FLAGS:
        p.add_argument(flag, dest=f"set:{key}", action=argparse.BooleanOptionalAction, help=text)


def _regional_config(args: argparse.Namespace, **extra: Any) -> Any:
    """The RegionalConfig of the file and the flags (``extra``: values the command
    itself sets, e.g. the demo's listen address)."""
    from stratoscope.regional.config import RegionalConfig
    from stratoscope.settings import load_settings

    overrides: dict[str, Any] = {}
    flags: dict[str, str] = {}
    for flag, key, _ in _REGIONAL_FLAGS + _SERVER_FLAGS + _BOOL_FLAGS:
        value = getattr(args, f"set:{key}", None)
        if value is None:
            continue
        section, _, leaf = key.partition(".")
        if leaf in ("dsn", "bootstrap") and str(value).strip().lower() == "none":
            key = section  # --clickhouse none / --kafka none: the sink is off
        overrides[key] = value
        flags[key] = flag
    return load_settings(RegionalConfig, args.config, overrides, extra=extra, flags=flags)


def _run_regional(args: argparse.Namespace) -> int:
    import uvloop

    from stratoscope.regional import app

    config = _regional_config(args)
    problem = None if args.check else config.ingest_auth_error()
    if problem is not None:
        from stratoscope.settings import ConfigError

        raise ConfigError(problem)
    runner = app.check(config) if args.check else app.run(config)
    return int(uvloop.run(runner) or 0)


def _run_demo(args: argparse.Namespace) -> int:
    import uvloop

    from stratoscope.regional.demo import run_demo
    from stratoscope.settings import parse_duration

    try:
        seconds = parse_duration(args.duration)
    except ValueError as exc:
        from stratoscope.settings import ConfigError

        raise ConfigError(f"--duration: {exc}") from None
    # loopback only, edge and regional on this machine: no certificates to make
    config = _regional_config(args, listen="127.0.0.1:0", metrics_port=0, query_listen="127.0.0.1:0",
                              insecure=True)
    return int(uvloop.run(run_demo(config, seconds)) or 0)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line and exit 2, like every other setting."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stratoscope", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _edge_parser(sub)
    r = sub.add_parser("regional", help="run a regional aggregator")
    _regional_args(r, server=True)
    r.add_argument("--check", action="store_true", help="run the sinks' health checks and exit")
    r.set_defaults(func=_run_regional)
    d = sub.add_parser("demo", help="regional on embedded ClickHouse + edge on this node, then a report")
    _regional_args(d, server=False)
    d.add_argument("--duration", default="30s", help="how long the edge runs, e.g. 30s")
    d.set_defaults(func=_run_demo)
    from stratoscope.pki import add_parser as add_pki_parser
    from stratoscope.query.command import add_parser as add_query_parser
    from stratoscope.regional.sinks.clickhouse_cli import add_parser as add_schema_parser
    from stratoscope.status import add_parser as add_status_parser

    add_query_parser(sub)
    add_status_parser(sub)
    add_schema_parser(sub)  # stratoscope schema render|grants
    add_pki_parser(sub)  # stratoscope certs|tokens
    return parser


def main(argv: list[str] | None = None) -> int:
    # gRPC's C core logs fork warnings at INFO when the demo starts the edge.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from stratoscope.edge.errors import EdgeError
    from stratoscope.settings import ConfigError

    try:
        return int(args.func(args))
    except (EdgeError, ConfigError) as exc:
        print(f"stratoscope: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
