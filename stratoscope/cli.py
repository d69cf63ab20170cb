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
from typing import Any

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
    from stratoscope.edge import preflight
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
        "compression": args.compression,
        "wire_columns": args.wire_columns,
    }
    params = _parse_params(args.param)
    cfg = load_config(args.config, overrides)
    for prog, values in params.items():
        cfg.params.setdefault(prog, {}).update(values)
    preflight.check()
    output = _edge_output(cfg)
    collector = Collector(cfg)
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
        outputs.append(ForwardOutput(cfg.regional, tls, compression=cfg.compression,
                                     wire_columns=cfg.wire_columns))
    if cfg.output or not cfg.regional:
        outputs.append(open_output(cfg.output or "jsonl:-"))
    return outputs[0] if len(outputs) == 1 else MultiOutput(outputs)


def _regional_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clickhouse", default=None,
                   help="chdb:///DIR (embedded, default chdb:///var/lib/stratoscope/clickhouse) "
                   "or http(s)://user:pass@host:8123/db; 'none' disables")
    p.add_argument("--migrate", action=argparse.BooleanOptionalAction, default=None,
                   help="apply schema migrations at start (default: yes for embedded, no for a server)")
    p.add_argument("--kafka", help="Kafka bootstrap servers (host:port,...); enables the Kafka sink")
    p.add_argument("--kafka-topic-prefix", default="stratoscope")
    p.add_argument("--resolution", default="60s", help="output window (default 60s)")
    p.add_argument("--lateness", default="15s", help="allowed lateness before a window closes")
    p.add_argument("--fork-frames", action=argparse.BooleanOptionalAction, default=True,
                   help="reduce closed windows in a forked child (default) or in a thread")
    p.add_argument("--frame-nodes", type=int, default=None,
                   help="nodes per frame a closed window is reduced and stored in (default 250)")
    p.add_argument("--max-held-points", type=int, default=None,
                   help="points (series points and event rows) the merge may hold in windows not yet "
                        "stored; past it (checked every 0.2 s, so a soft bound) edges are "
                        "answered RETRY until windows close (default 64,000,000: ~500k points/s "
                        "at 60 s windows and 15 s lateness; ~200-300 bytes of RSS each)")


def _regional_options(args: argparse.Namespace, **over: Any) -> Any:
    from stratoscope.edge.config import parse_duration
    from stratoscope.regional.app import DEFAULT_CLICKHOUSE, RegionalOptions, tls_from_paths

    ch = args.clickhouse or DEFAULT_CLICKHOUSE
    try:
        opts = RegionalOptions(
            clickhouse=None if ch == "none" else ch,
            migrate=args.migrate,
            kafka=args.kafka,
            kafka_topic_prefix=args.kafka_topic_prefix,
            resolution_s=int(parse_duration(args.resolution)),
            lateness_s=parse_duration(args.lateness),
            frames_in_child=getattr(args, "fork_frames", True),
            **({"frame_nodes": args.frame_nodes} if getattr(args, "frame_nodes", None) is not None else {}),
            **({"max_held_points": args.max_held_points}
               if getattr(args, "max_held_points", None) is not None else {}),
            tls=tls_from_paths(getattr(args, "tls_cert", None), getattr(args, "tls_key", None),
                               getattr(args, "tls_client_ca", None)),
            **over,
        )
    except ValueError as exc:
        from stratoscope.edge.errors import ConfigError

        raise ConfigError(str(exc)) from None
    return opts


def _run_regional(args: argparse.Namespace) -> int:
    import uvloop

    from stratoscope.regional import app

    opts = _regional_options(args, listen=args.listen, metrics_port=args.metrics_port)
    runner = app.check(opts) if args.check else app.run(opts)
    return int(uvloop.run(runner) or 0)


def _run_demo(args: argparse.Namespace) -> int:
    import uvloop

    from stratoscope.regional.demo import run_demo

    opts = _regional_options(args, listen="127.0.0.1:0", metrics_port=0)
    return int(uvloop.run(run_demo(opts, args.duration)) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stratoscope", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _edge_parser(sub)
    r = sub.add_parser("regional", help="run a regional aggregator")
    _regional_args(r)
    r.add_argument("--listen", default="0.0.0.0:7400")
    r.add_argument("--metrics-port", type=int, default=9432)
    r.add_argument("--tls-cert", type=Path, help="server certificate (enables TLS)")
    r.add_argument("--tls-key", type=Path, help="server key")
    r.add_argument("--tls-client-ca", type=Path,
                   help="CA of edge certificates: requires mTLS, node_id must equal the certificate CN")
    r.add_argument("--check", action="store_true", help="run the sinks' health checks and exit")
    r.set_defaults(func=_run_regional)
    d = sub.add_parser("demo", help="regional on embedded ClickHouse + edge on this node, then a report")
    _regional_args(d)
    d.add_argument("--duration", default="30s")
    d.set_defaults(func=_run_demo)
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

    try:
        return int(args.func(args))
    except EdgeError as exc:
        print(f"stratoscope: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
