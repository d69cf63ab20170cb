"""``stratoscope query``: run a cookbook query where the data is and print it.

    stratoscope query --list
    stratoscope query top_syscalls --node web-1 --since 1h
    stratoscope query flamegraph --pid 4242 --since 10m --format svg -o cpu.svg
    stratoscope query what_ran --clickhouse chdb:///var/lib/stratoscope/clickhouse

By default it reads through the regional's read endpoint on this machine
(http://127.0.0.1:9433, the regional's query_listen): with the embedded store, the
regional is the one process that may open it. ``--clickhouse DSN`` reads a store
directly instead: a ClickHouse server, or an embedded directory no regional holds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from stratoscope.query import render
from stratoscope.query.client import (
    DEFAULT_REGIONAL,
    DirectClient,
    QueryTargetError,
    RegionalClient,
    Target,
)
from stratoscope.query.cookbook import CookbookError, Query, cookbook, lookup
from stratoscope.settings import ConfigError, parse_duration

__all__ = ["add_parser"]

TABLE_FORMATS = ("table", "csv", "json")
PROFILE_FORMATS = ("folded", "pprof", "svg")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("query", help="run a cookbook query (deploy/clickhouse/queries) and print it",
                       description="Run a named query of the cookbook (deploy/clickhouse/queries) "
                                   "through the regional's read endpoint or on a ClickHouse store, "
                                   "and print it (docs/QUERY.md).")
    p.add_argument("name", nargs="?", help="the query (--list shows them all)")
    p.add_argument("--list", action="store_true", help="list the queries and their parameters")
    p.add_argument("--node", help="one node (default: every node)")
    p.add_argument("--since", default="1h", help="time range ending now, e.g. 10m, 1h, 2d (default 1h)")
    p.add_argument("--pid", help="one process (queries with a pid parameter)")
    p.add_argument("--comm", help="one process name (queries with a comm parameter)")
    p.add_argument("--limit", help="rows (queries with a limit parameter)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="any parameter the query declares, e.g. --param metric=syscall_latency")
    p.add_argument("--format", choices=TABLE_FORMATS + PROFILE_FORMATS, default="table",
                   help="table (default), csv, json; for flamegraph also folded, pprof (gzipped "
                        "profile.proto) or svg")
    p.add_argument("-o", "--output", type=Path, help="write here instead of standard output")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--regional", metavar="URL",
                       help=f"the regional's read endpoint (default {DEFAULT_REGIONAL})")
    where.add_argument("--clickhouse", metavar="DSN",
                       help="read a store directly: http(s)://user:pass@host:8123/db or chdb:///DIR "
                            "(a directory no running regional holds)")
    p.add_argument("--database", help="database of the tables with --clickhouse (default: the "
                                      "DSN's path, else stratoscope)")
    p.set_defaults(func=run_command)


def _values(args: Any, query: Query, now: float) -> dict[str, Any]:
    try:
        since = parse_duration(args.since)
    except ValueError as exc:
        raise ConfigError(f"--since: {exc}") from None
    declared = {p.name for p in query.params}
    values: dict[str, Any] = {}
    if {"start", "end"} <= declared:
        values["start"], values["end"] = int(now - since), int(now) + 1
    for flag in ("node", "pid", "comm", "limit"):
        value = getattr(args, flag)
        if value is not None:
            if flag not in declared:
                raise ConfigError(f"--{flag}: query {query.name} has no {flag} parameter "
                                  f"(it takes: {', '.join(sorted(declared))})")
            values[flag] = value
    for item in args.param:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ConfigError(f"--param {item!r}: use NAME=VALUE")
        values[name] = value
    return values


def _list(console: Console) -> None:
    table = Table(title="Cookbook queries (stratoscope query NAME)", title_justify="left")
    table.add_column("name")
    table.add_column("what")
    table.add_column("parameters")
    for q in cookbook().values():
        params = ", ".join(p.name if p.default is None else f"{p.name}={p.default!r}"
                           for p in q.params if p.name not in ("start", "end"))
        table.add_row(q.name, q.title, params)
    console.print(table)


def _write(args: Any, data: str | bytes) -> None:
    if args.output is not None:
        mode = "wb" if isinstance(data, bytes) else "w"
        with open(args.output, mode) as fh:
            fh.write(data)
    elif isinstance(data, bytes):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        sys.stdout.write(data)
        sys.stdout.flush()


def run_command(args: Any) -> int:
    console = Console(soft_wrap=False)
    if args.list:
        _list(console)
        return 0
    if not args.name:
        raise ConfigError("name a query (stratoscope query --list shows them)")
    try:
        query = lookup(args.name)
    except CookbookError as exc:
        raise ConfigError(str(exc)) from None
    if args.format in PROFILE_FORMATS and query.name != "flamegraph":
        raise ConfigError(f"--format {args.format} is for the flamegraph query; "
                          f"{query.name} prints as {', '.join(TABLE_FORMATS)}")
    if args.format == "pprof" and args.output is None and sys.stdout.isatty():
        raise ConfigError("pprof output is binary: write it to a file with -o FILE")
    if args.database and not args.clickhouse:
        raise ConfigError("--database goes with --clickhouse")
    now = time.time()
    values = _values(args, query, now)
    target: Target = (DirectClient(args.clickhouse, args.database) if args.clickhouse
                      else RegionalClient(args.regional or DEFAULT_REGIONAL))
    try:
        result = target.run(query, values)
    except (CookbookError, QueryTargetError) as exc:
        raise ConfigError(str(exc)) from None
    fmt = args.format
    if fmt == "table":
        if args.output is not None:
            with open(args.output, "w") as fh:
                render.to_table(result, Console(file=fh, width=200, soft_wrap=False), query.title)
        else:
            render.to_table(result, console, query.title)
    elif fmt == "csv":
        _write(args, render.to_csv(result))
    elif fmt == "json":
        _write(args, render.to_json(result))
    else:
        from stratoscope.query import profiles

        bound = result.params
        if fmt == "folded":
            _write(args, profiles.folded(result.rows))
        elif fmt == "pprof":
            _write(args, profiles.pprof(result.rows, start_s=int(bound.get("start", 0)),
                                        end_s=int(bound.get("end", 0))))
        else:
            _write(args, profiles.svg(result.rows, title=_flame_title(bound, args.since)))
    return 0


def _flame_title(params: dict[str, Any], since: str) -> str:
    what = [f"node {params['node']}" if params.get("node") else "every node"]
    if params.get("pid"):
        what.append(f"pid {params['pid']}")
    if params.get("comm"):
        what.append(f"comm {params['comm']}")
    return f"CPU flame graph: {', '.join(what)}, last {since}"
