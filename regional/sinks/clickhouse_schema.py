"""The ClickHouse schema for one server or for a cluster, from one source.

Why a transform and not a second copy: the migrations in ``deploy/clickhouse/migrations``
are the only source. For one server they are used as they are, byte for byte, so the
checksums stores recorded when they applied them stay valid. For a cluster
(``clickhouse.cluster``) :func:`render_cluster` rewrites each statement by a few fixed
rules, carrying what earlier migrations created (which names are replicated tables and
how each is sharded) from one file to the next:

* ``CREATE TABLE T ... ENGINE = XMergeTree(args)`` becomes ``T_local`` created ``ON
  CLUSTER`` with ``ReplicatedXMergeTree('/clickhouse/tables/{shard}/{database}/{table}',
  '{replica}', args)`` (server macros), the deduplication window made the replicated
  one, and a ``Distributed`` twin ``T`` over ``T_local`` sharded by ``cityHash64(node)``
  (``SHARDING`` for the tables without a node). ``ENGINE = Null`` tables get a twin too.
* A materialized view reads the local table of its source; it writes the local table of
  its target when both are sharded alike (a row stays on its shard), else the
  Distributed target.
* A plain view keeps reading the Distributed tables and its joins become ``GLOBAL``.
* ``ALTER``, ``DROP VIEW`` and ``RENAME`` run ``ON CLUSTER`` on the local tables; a
  column change reaches the twin too; a renamed table gets a new twin.

A statement of any other shape is an error naming the migration: the renderer must be
taught it before the migration can ship. The rendered files are kept in
``deploy/clickhouse/cluster`` for review (rendered with the macro ``{cluster}`` as the
cluster's name); a test checks they equal a fresh rendering.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "CLUSTER_MACRO",
    "SHARDING",
    "bootstrap_statements",
    "check_cluster",
    "render_cluster",
    "shard_key",
    "split_statements",
]

#: The cluster name the reviewed files are rendered with: the server macro, so they
#: apply to any cluster whose servers define ``<macros><cluster>``.
CLUSTER_MACRO = "{cluster}"
#: Keeper path of a replicated table (server macros; one path per shard).
KEEPER_PATH = "/clickhouse/tables/{shard}/{database}/{table}"
#: Sharding key of the tables without a ``node`` column: every copy of a key on one
#: shard, so ReplacingMergeTree collapses them.
SHARDING = {"profile_stacks": "stack_id", "series": "series_id"}
#: Inserts retried within this long are dropped as duplicates (the server's default,
#: one hour, is shorter than a regional may take to come back and resend).
DEDUP_WINDOW_SECONDS = 7 * 24 * 3600

_CLUSTER_NAME = re.compile(r"^(\{cluster\}|[A-Za-z0-9_][A-Za-z0-9_.\-]*)$")
_CREATE_TABLE = re.compile(r"^CREATE TABLE IF NOT EXISTS \{db\}\.(\w+)$")
_CREATE_MV = re.compile(r"^CREATE MATERIALIZED VIEW IF NOT EXISTS \{db\}\.(\w+) TO \{db\}\.(\w+) AS$")
_CREATE_VIEW = re.compile(r"^CREATE VIEW IF NOT EXISTS \{db\}\.(\w+) AS$")
_ALTER = re.compile(r"^ALTER TABLE \{db\}\.(\w+) (.+)$", re.DOTALL)
_DROP_VIEW = re.compile(r"^DROP VIEW IF EXISTS \{db\}\.(\w+)$")
_RENAME = re.compile(r"^RENAME TABLE IF EXISTS \{db\}\.(\w+) TO \{db\}\.(\w+)$")
_ENGINE = re.compile(r"^ENGINE = (\w*MergeTree)(?:\((.*)\))?$", re.MULTILINE)
_NULL_ENGINE = re.compile(r"^ENGINE = Null$", re.MULTILINE)
_COLUMN = re.compile(r"^\s+(\w+)\s", re.MULTILINE)
_FROM = re.compile(r"\bFROM \{db\}\.(\w+)\b")
_JOIN = re.compile(r"(?<!GLOBAL )\b((?:(?:LEFT|RIGHT|INNER|FULL) )?(?:(?:ANY|ALL|SEMI|ANTI) )?JOIN)\b")
_COLUMN_CHANGE = re.compile(r"^(ADD|DROP|MODIFY|RENAME|COMMENT) COLUMN\b")
_DEDUP_WINDOW = re.compile(r"\bnon_replicated_deduplication_window = (\d+)")
_STATEMENT_END = re.compile(r";[ \t]*$", re.MULTILINE)


def split_statements(sql: str) -> list[str]:
    """Split a migration file at lines ending with ``;``; drop comment-only chunks."""
    out = []
    for chunk in _STATEMENT_END.split(sql):
        code = [ln for ln in chunk.splitlines() if ln.strip() and not ln.strip().startswith("--")]
        if code:
            out.append(chunk.strip())
    return out


def check_cluster(name: str) -> str:
    """``name`` if it can name a cluster in rendered SQL (it is put in quotes)."""
    if not _CLUSTER_NAME.match(name or ""):
        raise ValueError(f"invalid ClickHouse cluster name {name!r} (letters, digits, _ . -, "
                         "or the macro {cluster})")
    return name


def shard_key(table: str, columns: Sequence[str]) -> str:
    """The Distributed sharding key of ``table``: by node, else ``SHARDING``."""
    if table in SHARDING:
        return SHARDING[table]
    if "node" in columns:
        return "cityHash64(node)"
    raise ValueError(f"table {table} has no node column and no sharding key in SHARDING")


@dataclass
class _Schema:
    """What the migrations rendered so far created: replicated table -> sharding key."""

    tables: dict[str, str] = field(default_factory=dict)

    def local(self, name: str) -> str:
        return f"{name}_local" if name in self.tables else name


def _split(chunk: str) -> tuple[list[str], str]:
    """A statement's leading comment lines and its code."""
    lines = chunk.splitlines()
    i = 0
    while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("--")):
        i += 1
    return lines[:i], "\n".join(lines[i:]).strip()


def _twin(name: str, cluster: str, key: str) -> str:
    return (f"CREATE TABLE IF NOT EXISTS {{db}}.{name} ON CLUSTER '{cluster}' AS {{db}}.{name}_local\n"
            f"ENGINE = Distributed('{cluster}', '{{db}}', '{name}_local', {key})")


def _create_table(name: str, code: str, cluster: str, schema: _Schema) -> list[str]:
    body = code.split("\n", 1)[1]
    columns = _COLUMN.findall(body.split("\nENGINE", 1)[0])
    key = shard_key(name, columns)
    engine = _ENGINE.search(body)
    if engine:
        args = f", {engine.group(2)}" if engine.group(2) else ""
        body = _ENGINE.sub(f"ENGINE = Replicated{engine.group(1)}('{KEEPER_PATH}', '{{replica}}'{args})",
                           body, count=1)
        body = _DEDUP_WINDOW.sub(r"replicated_deduplication_window = \1, "
                                 f"replicated_deduplication_window_seconds = {DEDUP_WINDOW_SECONDS}",
                                 body)
    elif not _NULL_ENGINE.search(body):
        raise ValueError(f"table {name}: only MergeTree-family and Null engines are rendered")
    schema.tables[name] = key
    return [f"CREATE TABLE IF NOT EXISTS {{db}}.{name}_local ON CLUSTER '{cluster}'\n{body}",
            _twin(name, cluster, key)]


def _create_mv(name: str, target: str, code: str, cluster: str, schema: _Schema) -> list[str]:
    body = code.split("\n", 1)[1]
    sources = set(_FROM.findall(body))
    if len(sources) != 1 or not sources <= schema.tables.keys() or target not in schema.tables:
        raise ValueError(f"materialized view {name}: expected one replicated source table and a "
                         f"replicated target, got {sorted(sources)} -> {target}")
    (source,) = sources
    to = schema.local(target) if schema.tables[target] == schema.tables[source] else target
    body = _FROM.sub(lambda m: f"FROM {{db}}.{schema.local(m.group(1))}", body)
    return [f"CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.{name} ON CLUSTER '{cluster}'\n"
            f"TO {{db}}.{to} AS\n{body}"]


def _statement(code: str, cluster: str, schema: _Schema) -> list[str]:
    """The cluster statements of one single-server statement."""
    first = code.split("\n", 1)[0]
    on = f"ON CLUSTER '{cluster}'"
    if m := _CREATE_TABLE.match(first):
        return _create_table(m.group(1), code, cluster, schema)
    if m := _CREATE_MV.match(first):
        return _create_mv(m.group(1), m.group(2), code, cluster, schema)
    if m := _CREATE_VIEW.match(first):
        schema.tables.pop(m.group(1), None)
        body = _JOIN.sub(r"GLOBAL \1", code.split("\n", 1)[1])
        return [f"CREATE VIEW IF NOT EXISTS {{db}}.{m.group(1)} {on} AS\n{body}"]
    if m := _DROP_VIEW.match(code):
        return [f"DROP VIEW IF EXISTS {{db}}.{m.group(1)} {on}"]
    if (m := _ALTER.match(code)) and m.group(1) in schema.tables:
        name, change = m.group(1), m.group(2)
        out = [f"ALTER TABLE {{db}}.{name}_local {on}\n{change}"]
        if _COLUMN_CHANGE.match(change):
            out.append(f"ALTER TABLE {{db}}.{name} {on}\n{change}")
        return out
    if (m := _RENAME.match(code)) and m.group(1) in schema.tables:
        old, new = m.group(1), m.group(2)
        key = schema.tables.pop(old)
        schema.tables[new] = key
        return [f"DROP TABLE IF EXISTS {{db}}.{old} {on}",
                f"RENAME TABLE IF EXISTS {{db}}.{old}_local TO {{db}}.{new}_local {on}",
                _twin(new, cluster, key)]
    raise ValueError(f"no cluster rendering for this statement (teach clickhouse_schema.py): "
                     f"{first[:100]!r}")


def render_cluster(sources: Sequence[tuple[str, str]], cluster: str) -> list[str]:
    """The cluster rendering of each migration's text, ``sources`` as (file name, text)
    in version order (each file's rendering depends on the files before it)."""
    check_cluster(cluster)
    schema = _Schema()
    out = []
    for filename, text in sources:
        parts = [f"-- {filename} of deploy/clickhouse/migrations rendered for the cluster "
                 f"'{cluster}'.\n-- Generated: stratoscope schema render --cluster '{cluster}'"
                 " (do not edit; docs/CLICKHOUSE.md)."]
        for chunk in split_statements(text):
            comments, code = _split(chunk)
            try:
                rendered = _statement(code, cluster, schema)
            except ValueError as exc:
                raise ValueError(f"{filename}: {exc}") from None
            parts.append("\n".join([*comments, rendered[0]]) + "\n;")
            parts.extend(stmt + "\n;" for stmt in rendered[1:])
        out.append("\n\n".join(parts) + "\n")
    return out


def bootstrap_statements(database: str, cluster: str | None) -> list[str]:
    """The database and the tables that record applied migrations.

    On a cluster they are replicated across every node (one Keeper path, no shard), so
    a regional connected to any node sees what another applied.
    """
    if cluster is None:
        on, engine = "", "MergeTree"
    else:
        on = f" ON CLUSTER '{check_cluster(cluster)}'"
        engine = "ReplicatedMergeTree('/clickhouse/tables/all/{database}/{table}', '{replica}')"
    return [
        f"CREATE DATABASE IF NOT EXISTS {database}{on}",
        f"CREATE TABLE IF NOT EXISTS {database}.schema_migrations{on} ("
        " version String, name String, checksum String,"
        " applied_at DateTime64(3, 'UTC') DEFAULT now64(3))"
        f" ENGINE = {engine} ORDER BY version",
        # statements done of a migration not yet recorded whole (see apply_migrations)
        f"CREATE TABLE IF NOT EXISTS {database}.schema_migration_steps{on} ("
        " version String, step UInt32, applied_at DateTime64(3, 'UTC') DEFAULT now64(3))"
        f" ENGINE = {engine} ORDER BY (version, step)",
    ]
