"""`stratoscope` command line: one entry point, a subcommand per component.

Every error a person can fix prints one line (what is wrong, how to fix it) and
exits 2 without a traceback.
"""

from __future__ import annotations

import argparse
import logging
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
    p.add_argument("--output", help="jsonl:PATH or jsonl:- for stdout (default jsonl:-)")
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
    from edge.errors import ConfigError

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
    from edge import preflight
    from edge.collector import Collector
    from edge.config import load_config
    from edge.outputs import open_output

    overrides: dict[str, Any] = {
        "interval": args.interval,
        "programs": args.programs.split(",") if args.programs else None,
        "output": args.output,
        "duration": args.duration,
        "once": args.once or None,
        "metrics_port": args.metrics_port,
        "node_id": args.node_id,
    }
    params = _parse_params(args.param)
    cfg = load_config(args.config, overrides)
    for prog, values in params.items():
        cfg.params.setdefault(prog, {}).update(values)
    preflight.check()
    output = open_output(cfg.output)
    collector = Collector(cfg)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    summary = None
    if args.summary:
        from edge.summary import Summary

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stratoscope", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _edge_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from edge.errors import EdgeError

    try:
        return int(args.func(args))
    except EdgeError as exc:
        print(f"stratoscope: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
