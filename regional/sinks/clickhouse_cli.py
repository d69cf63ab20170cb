"""``stratoscope schema``: the ClickHouse schema and access SQL, rendered to files.

Why a command: on a server the schema is applied by Ansible or by hand, and the
reviewed copies in deploy/clickhouse (cluster/, access/) are regenerated with it after
a migration is added (a test fails until they are).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    """Register ``schema render`` and ``schema grants`` on the CLI's subparsers."""
    p = sub.add_parser("schema", help="render the ClickHouse migrations or the access SQL")
    cmds = p.add_subparsers(dest="schema_command", required=True)
    r = cmds.add_parser("render", help="write the migrations as applied to one server or a cluster")
    r.add_argument("--cluster", help="cluster name (default: one server); '{cluster}' keeps the macro")
    r.add_argument("--out", type=Path, required=True, help="directory to write NNNN_name.sql into")
    r.set_defaults(func=_render)
    g = cmds.add_parser("grants", help="print the roles, grants, reader profile and users as SQL")
    g.add_argument("--database", default="stratoscope", help="database of the tables (default stratoscope)")
    g.add_argument("--cluster", help="create everything ON CLUSTER (default: one server)")
    g.add_argument("--max-execution-time", default="60s",
                   help="longest query of the reader role, e.g. 60s (default 60s)")
    g.add_argument("--user", action="append", default=[], metavar="KIND=NAME:file:PATH|KIND=NAME:env:VAR",
                   help="create a user of KIND writer, migrator or reader whose password is in "
                        "a file or an environment variable (only a salted SHA-256 of it is printed)")
    g.add_argument("--out", type=Path,
                   help="write to this file (created or truncated, mode 0600) instead of stdout")
    g.set_defaults(func=_grants)


def _render(args: argparse.Namespace) -> int:
    from stratoscope.regional.sinks.clickhouse import render_migrations
    from stratoscope.settings import ConfigError

    try:
        rendered = render_migrations(cluster=args.cluster)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in rendered:
        (args.out / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(rendered)} migrations to {args.out}", file=sys.stderr)
    return 0


def _user(spec: str) -> Any:
    from stratoscope.regional.sinks.clickhouse_access import AccessUser

    kind, eq, rest = spec.partition("=")
    name, _, source = rest.partition(":")
    how, _, where = source.partition(":")
    if not (eq and name and how in ("file", "env") and where):
        raise ValueError(f"--user {spec!r}: use KIND=NAME:file:PATH or KIND=NAME:env:VAR")
    return AccessUser(kind, name, Path(where) if how == "file" else None, where if how == "env" else None)


def _grants(args: argparse.Namespace) -> int:
    from stratoscope.regional.sinks.clickhouse_access import access_statements
    from stratoscope.settings import ConfigError, parse_duration

    try:
        seconds = parse_duration(args.max_execution_time)
        sql = access_statements(args.database, args.cluster, max(1, round(seconds)),
                                [_user(u) for u in args.user])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    text = render_access(sql)
    if args.out is None:
        sys.stdout.write(text)
    else:
        try:
            _write_private(args.out, text)
        except OSError as exc:
            raise ConfigError(f"cannot write {args.out}: {exc.strerror}") from None
    return 0


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (the users' hashes can be
    attacked offline); an existing file is truncated and its mode set to 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            fd = -1
            f.write(text)
    finally:
        if fd >= 0:
            os.close(fd)


def render_access(statements: list[str]) -> str:
    """The access statements as a file (one statement per line, ``;`` after each)."""
    return ("-- Roles, grants and the reader's settings profile of the Stratoscope database.\n"
            "-- Generated: stratoscope schema grants (do not edit; docs/CLICKHOUSE.md).\n"
            + "".join(f"{s};\n" for s in statements))
