"""The schema rendered for one server and for a cluster, checked against the real engine.

chdb (ClickHouse 26.9 embedded) cannot apply the cluster rendering whole: given a
configuration with a one-shard cluster, Keeper macros and the in-process test Keeper,
it creates ReplicatedMergeTree tables but they stay read-only (no Keeper session is
started in the embedded engine), and ``ON CLUSTER`` is refused or never returns (no
distributed DDL worker). Distributed tables over a one-shard cluster do work. So:

* the cluster files are held to a reviewed golden copy and parsed by the engine;
* their structure is checked: every MergeTree table of the single-server schema has a
  Replicated local table and a Distributed twin sharded as documented;
* in a process of its own (one_node_cluster.py) the rendering is applied to a one-shard
  cluster with only ``ON CLUSTER`` dropped and the Replicated engines made plain, and
  the regional's sink runs on it with ``cluster`` set, against a one-server twin.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from stratoscope.regional.sinks.clickhouse import (
    MIGRATIONS_DIR,
    apply_migrations,
    load_migrations,
    render_migrations,
)
from stratoscope.regional.sinks.clickhouse_schema import (
    CLUSTER_MACRO,
    check_cluster,
    render_cluster,
)

GOLDEN = MIGRATIONS_DIR.parent / "cluster"

#: Checksums stores recorded when they applied the migrations: the single-server
#: rendering must keep them, or every existing store logs "migration changed".
APPLIED_CHECKSUMS = {
    "0001": "c6c6505b026160e5", "0002": "6e5ef02cd0c0e5ac", "0003": "499c12843d00a14f",
    "0004": "0eb312f8050b6a94", "0005": "aff13433a02a10c2", "0006": "3ce6c1e5b10ff09d",
}

_REPLICATED = re.compile(
    r"ENGINE = Replicated(\w*MergeTree)\('/clickhouse/tables/\{shard\}/\{database\}/\{table\}',"
    r" '\{replica\}'(?:, (\w+))?\)")
_DISTRIBUTED = re.compile(
    r"^CREATE TABLE IF NOT EXISTS \{db\}\.(\w+) ON CLUSTER '\{cluster\}' AS \{db\}\.(\w+)\n"
    r"ENGINE = Distributed\('\{cluster\}', '\{db\}', '(\w+)', (.+)\)$")


def rows(anchor: Any, sql: str, **params: Any) -> list[tuple]:
    return list(anchor.query(sql, parameters=params or None).result_rows)


def test_single_server_rendering_is_the_files_byte_for_byte() -> None:
    for name, text in render_migrations():
        assert text == (MIGRATIONS_DIR / name).read_text(encoding="utf-8")
    assert {m.version: m.checksum for m in load_migrations()} == APPLIED_CHECKSUMS


def test_cluster_rendering_equals_the_reviewed_files() -> None:
    rendered = render_migrations(cluster=CLUSTER_MACRO)
    assert [n for n, _ in rendered] == sorted(p.name for p in GOLDEN.glob("*.sql"))
    for name, text in rendered:
        assert text == (GOLDEN / name).read_text(encoding="utf-8"), (
            f"{name} differs from its rendering: stratoscope schema render --cluster "
            f"'{{cluster}}' --out deploy/clickhouse/cluster, then review the diff")
    # a named cluster: the same text with the name in place of the macro
    named = render_migrations(cluster="prod-eu")
    assert [t.replace("'prod-eu'", "'{cluster}'") for _, t in named] == [t for _, t in rendered]
    # checksums are of the rendered text: another cluster name is another rendering
    assert load_migrations(cluster="prod-eu")[0].checksum != load_migrations(cluster="x")[0].checksum


def test_every_merge_tree_table_is_replicated_with_a_distributed_twin(anchor: Any) -> None:
    """Structure, against the single-server schema as the engine builds it."""
    single = f"s_{uuid.uuid4().hex[:12]}"
    apply_migrations(anchor, single)
    engines = dict(rows(anchor, "SELECT name, engine FROM system.tables WHERE database = {db:String}"
                                " AND name NOT LIKE 'schema_migration%'", db=single))
    merge_tree = {n: e for n, e in engines.items() if e.endswith("MergeTree")}
    assert len(merge_tree) == 13, sorted(merge_tree)  # 9 tables + the 4 *_v0 of 0006

    statements = [s for m in load_migrations(cluster=CLUSTER_MACRO) for s in m.statements]
    assert all(f"ON CLUSTER '{CLUSTER_MACRO}'" in s for s in statements)
    replicated: dict[str, str] = {}  # local table -> engine
    twins: dict[str, tuple[str, str]] = {}  # Distributed table -> (local table, key)
    for stmt in statements:
        code = "\n".join(ln for ln in stmt.splitlines() if not ln.startswith("--")).strip()
        if m := _DISTRIBUTED.match(code):
            assert m.group(2) == m.group(3), code  # AS the table it distributes
            twins[m.group(1)] = (m.group(2), m.group(4))
        elif code.startswith("CREATE TABLE") and (e := _REPLICATED.search(code)):
            name = re.match(r"CREATE TABLE IF NOT EXISTS \{db\}\.(\w+)_local ", code)
            assert name, code
            replicated[name.group(1)] = e.group(1)
            assert "non_replicated" not in code
            assert "replicated_deduplication_window = 10000, " \
                   "replicated_deduplication_window_seconds = 604800" in code
    # renamed tables (the *_v0 of 0006) keep their engine under the new name
    for old in ("metrics", "histograms", "metrics_1h", "histograms_1h"):
        replicated[f"{old}_v0"] = replicated.pop(old)
    assert replicated == merge_tree
    for table in merge_tree:
        local, key = twins[table]
        assert local == f"{table}_local"
        assert key == {"profile_stacks": "stack_id", "series": "series_id"}.get(table, "cityHash64(node)")


def test_cluster_rendering_is_valid_ddl_made_single_node(anchor: Any) -> None:
    """Every statement parses; with Replicated engines made plain, Distributed tables
    made Merge tables over their local table and ON CLUSTER dropped, the whole
    rendering applies here and leaves the names readers and the regional use."""
    db = f"c_{uuid.uuid4().hex[:12]}"
    anchor.command(f"CREATE DATABASE {db}")
    distributed = re.compile(r"ENGINE = Distributed\('\{cluster\}', '\w+', '(\w+)'.*$", re.MULTILINE)
    for m in load_migrations(cluster=CLUSTER_MACRO):
        for stmt in m.statements:
            sql = stmt.replace("{db}", db)
            rows(anchor, "SELECT formatQuery({q:String})", q=sql)  # parses
            local = _REPLICATED.sub(lambda x: f"ENGINE = {x.group(1)}({x.group(2) or ''})", sql)
            local = distributed.sub(lambda x: f"ENGINE = Merge('{db}', '^{x.group(1)}$')", local)
            local = local.replace(f" ON CLUSTER '{CLUSTER_MACRO}'", "").replace(
                "replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800",
                "non_replicated_deduplication_window = 10000")
            anchor.command(local)
    tables = dict(rows(anchor, "SELECT name, engine FROM system.tables WHERE database = {db:String}", db=db))
    for name in ("metrics", "histograms", "metrics_1h", "histograms_1h"):
        assert tables[name] == "View"
    for name in ("metric_points", "histogram_points", "series", "metrics_ingest", "profile_samples",
                 "events", "nodes", "profile_stacks", "metrics_v0"):
        assert tables[name] == "Merge" and tables[f"{name}_local"] != "Merge", name
    # views on the points write to their shard's local tables; series go through the
    # Distributed table (sharded by series_id, not by node)
    mv = {n: q for n, q in rows(anchor, "SELECT name, create_table_query FROM system.tables"
                                        " WHERE database = {db:String} AND engine = 'MaterializedView'",
                                db=db)}
    assert f"TO {db}.metric_points_1h_local" in mv["metric_points_1h_mv"]
    assert f"FROM {db}.metric_points_local" in mv["metric_points_1h_mv"]
    assert f"TO {db}.metric_points_local " in mv["metric_points_mv"]
    assert f"TO {db}.series " in mv["metric_series_mv"]
    assert f"FROM {db}.metrics_ingest_local" in mv["metric_series_mv"]
    view = rows(anchor, f"SELECT create_table_query FROM system.tables WHERE database = '{db}'"
                        " AND name = 'metrics'")[0][0]
    assert "GLOBAL ANY LEFT JOIN" in view  # as the server formats it


def test_a_statement_the_renderer_does_not_know_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"0009_x\.sql: no cluster rendering for this statement"):
        render_cluster([("0009_x.sql", "TRUNCATE TABLE {db}.metric_points\n;\n")], "c")
    with pytest.raises(ValueError, match=r"table t has no node column and no sharding key"):
        render_cluster([("0009_x.sql", "CREATE TABLE IF NOT EXISTS {db}.t\n(\n    a  UInt8\n)\n"
                                       "ENGINE = MergeTree\nORDER BY a\n;\n")], "c")
    with pytest.raises(ValueError, match=r"invalid ClickHouse cluster name"):
        check_cluster("a'b")


def test_render_command_writes_the_reviewed_files(tmp_path: Path) -> None:
    from stratoscope.cli import main

    assert main(["schema", "render", "--cluster", "{cluster}", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in GOLDEN.glob("*.sql"))
    for p in tmp_path.iterdir():
        assert p.read_bytes() == (GOLDEN / p.name).read_bytes()
    single = tmp_path / "single"
    assert main(["schema", "render", "--out", str(single)]) == 0
    for p in single.iterdir():
        assert p.read_bytes() == (MIGRATIONS_DIR / p.name).read_bytes()


# ---------------------------------------------------------------- users and grants


def test_access_sql_equals_the_reviewed_files_and_parses(anchor: Any) -> None:
    """chdb has no writable access storage (CREATE ROLE: ACCESS_STORAGE_FOR_INSERTION_NOT_FOUND
    even with a configured local_directory), so the grants are checked as text and parsed."""
    from stratoscope.regional.sinks.clickhouse_access import access_statements, insert_tables
    from stratoscope.regional.sinks.clickhouse_cli import render_access

    access = MIGRATIONS_DIR.parent / "access"
    for cluster, name in ((None, "grants.sql"), (CLUSTER_MACRO, "grants_cluster.sql")):
        sql = access_statements("stratoscope", cluster)
        assert render_access(sql) == (access / name).read_text(encoding="utf-8"), (
            f"regenerate: stratoscope schema grants {'--cluster {cluster} ' if cluster else ''}"
            f"--out deploy/clickhouse/access/{name}")
        for stmt in sql:
            assert rows(anchor, "SELECT formatQuery({q:String}) != ''", q=stmt) == [(1,)]
    single = access_statements("stratoscope")
    # the regional inserts into exactly the sink's tables and reads only the migration log
    writer = [s for s in single if s.endswith("TO stratoscope_writer")]
    assert writer == [f"GRANT INSERT ON stratoscope.{t} TO stratoscope_writer" for t in insert_tables()] + [
        "GRANT SELECT ON stratoscope.schema_migrations TO stratoscope_writer",
        "GRANT SELECT ON stratoscope.schema_migration_steps TO stratoscope_writer"]
    assert insert_tables() == ["profile_stacks", "series", "metric_points", "histogram_points",
                               "profile_samples", "events", "nodes"]
    reader = [s for s in single if "stratoscope_reader" in s and "ROLE" not in s]
    assert reader == ["GRANT SELECT ON stratoscope.* TO stratoscope_reader",
                      "CREATE SETTINGS PROFILE OR REPLACE stratoscope_reader SETTINGS readonly = 1,"
                      " max_execution_time = 60 MAX 60 CHANGEABLE_IN_READONLY,"
                      " join_use_nulls = 0 CHANGEABLE_IN_READONLY TO stratoscope_reader"]
    clustered = access_statements("stratoscope", "c1")
    assert "GRANT ON CLUSTER 'c1' INSERT ON stratoscope.metric_points_local TO stratoscope_writer" in clustered
    assert "GRANT ON CLUSTER 'c1' CLUSTER ON *.* TO stratoscope_migrator" in clustered


def test_users_get_a_hash_of_their_password_never_the_password(
        anchor: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from stratoscope.cli import main

    (tmp_path / "pw").write_text("s3cret-file\n")
    monkeypatch.setenv("GRAFANA_CH_PW", "s3cret-env")
    assert main(["schema", "grants", "--database", "metricsdb", "--max-execution-time", "30s",
                 "--user", f"writer=regional:file:{tmp_path / 'pw'}",
                 "--user", "reader=grafana:env:GRAFANA_CH_PW"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    import hashlib

    # a salted hash per user: SHA-256(password + salt), the salt random (16 bytes, hex)
    users = re.findall(r"^CREATE USER OR REPLACE (\w+) IDENTIFIED WITH sha256_hash BY '([0-9a-f]{64})'"
                       r" SALT '([0-9a-f]{32})' DEFAULT DATABASE metricsdb;$", out, re.MULTILINE)
    assert [u[0] for u in users] == ["regional", "grafana"]
    for (_, digest, salt), password in zip(users, (b"s3cret-file", b"s3cret-env"), strict=True):
        assert digest == hashlib.sha256(password + salt.encode()).hexdigest()
    assert users[0][2] != users[1][2]
    assert hashlib.sha256(b"s3cret-file").hexdigest() not in out
    assert "GRANT stratoscope_reader TO grafana;\nALTER USER grafana DEFAULT ROLE stratoscope_reader;" in out
    assert "max_execution_time = 30 MAX 30 CHANGEABLE_IN_READONLY" in out
    for stmt in out.split(";\n"):
        if stmt.strip() and not stmt.startswith("--"):
            assert rows(anchor, "SELECT formatQuery({q:String}) != ''", q=stmt) == [(1,)]
    # the same password twice: two salts, two hashes
    assert main(["schema", "grants", "--user", f"writer=a:file:{tmp_path / 'pw'}",
                 "--user", f"reader=b:file:{tmp_path / 'pw'}"]) == 0
    hashes = re.findall(r"sha256_hash BY '(\w+)' SALT '(\w+)'", capsys.readouterr().out)
    assert len(hashes) == 2 and len({h for h, _ in hashes}) == 2 and len({s for _, s in hashes}) == 2
    # --out: readable by its owner only, also when the file was there before, world-readable
    out_file = tmp_path / "users.sql"
    out_file.write_text("old\n")
    out_file.chmod(0o644)
    assert main(["schema", "grants", "--user", f"writer=regional:file:{tmp_path / 'pw'}",
                 "--out", str(out_file)]) == 0
    assert out_file.stat().st_mode & 0o777 == 0o600
    written = out_file.read_text()
    assert "old" not in written and re.search(r"^CREATE USER OR REPLACE regional IDENTIFIED WITH "
                                              r"sha256_hash BY '\w{64}' SALT '\w{32}'", written, re.MULTILINE)
    fresh = tmp_path / "fresh.sql"
    assert main(["schema", "grants", "--out", str(fresh)]) == 0
    assert fresh.stat().st_mode & 0o777 == 0o600
    assert fresh.read_text() == (MIGRATIONS_DIR.parent / "access" / "grants.sql").read_text()
    assert main(["schema", "grants", "--out", str(tmp_path / "no" / "such.sql")]) == 2
    assert capsys.readouterr().err == (
        f"stratoscope: error: cannot write {tmp_path / 'no' / 'such.sql'}: No such file or directory\n")
    # a missing secret is one line and exit 2
    monkeypatch.delenv("GRAFANA_CH_PW")
    assert main(["schema", "grants", "--user", "reader=grafana:env:GRAFANA_CH_PW"]) == 2
    assert capsys.readouterr().err == ("stratoscope: error: user grafana: environment variable "
                                       "'GRAFANA_CH_PW' is not set\n")
    assert main(["schema", "grants", "--user", "admin=x:env:Y"]) == 2
    assert "unknown user kind 'admin'" in capsys.readouterr().err


# ---------------------------------------------------------------- retention


def ttl_of(anchor: Any, db: str, table: str) -> str:
    query = rows(anchor, "SELECT create_table_query FROM system.tables WHERE database = {db:String}"
                         " AND name = {t:String}", db=db, t=table)[0][0]
    m = re.search(r" TTL (.+?)(?: SETTINGS |$)", query)
    assert m, query
    return m.group(1)


def test_retention_changes_ttls_once_and_unset_keys_change_nothing(anchor: Any) -> None:
    from stratoscope.regional.sinks.clickhouse_retention import (
        SCHEMA,
        Retention,
        apply_retention,
        retention_drift,
    )

    db = f"r_{uuid.uuid4().hex[:12]}"
    apply_migrations(anchor, db)
    before = {t: ttl_of(anchor, db, t) for t in ("metric_points", "series", "events", "profile_stacks")}
    # nothing set: every table is left alone; the schema's own values are no change either
    for r in (Retention(), SCHEMA):
        assert retention_drift(anchor, db, r) == {}
        assert apply_retention(anchor, db, r) == []
    assert {t: ttl_of(anchor, db, t) for t in before} == before

    wanted = Retention(raw=40, hourly=500, events=45)
    assert apply_retention(anchor, db, wanted) == [
        "metric_points", "histogram_points", "metric_points_1h", "histogram_points_1h", "series", "events"]
    assert ttl_of(anchor, db, "metric_points") == "ts + toIntervalDay(if(resolution < 60, 7, 40))"
    assert ttl_of(anchor, db, "histogram_points") == "ts + toIntervalDay(if(resolution < 60, 7, 40))"
    assert ttl_of(anchor, db, "metric_points_1h") == "ts + toIntervalDay(500)"
    assert ttl_of(anchor, db, "series") == "last_seen + toIntervalDay(501)"
    assert ttl_of(anchor, db, "events") == "toDateTime(ts) + toIntervalDay(45)"
    assert ttl_of(anchor, db, "profile_stacks") == before["profile_stacks"]
    # applied twice: nothing to do; a key set alone keeps the others' current days
    assert apply_retention(anchor, db, wanted) == []
    assert apply_retention(anchor, db, Retention(raw_fine=9)) == ["metric_points", "histogram_points"]
    assert ttl_of(anchor, db, "metric_points") == "ts + toIntervalDay(if(resolution < 60, 9, 40))"
    assert ttl_of(anchor, db, "series") == "last_seen + toIntervalDay(501)"
    # back to the schema's values shortens every one of them: allowed only when asked
    assert set(apply_retention(anchor, db, SCHEMA, allow_shrink=True)) == {
        "metric_points", "histogram_points", "metric_points_1h", "histogram_points_1h", "series", "events"}
    assert {t: ttl_of(anchor, db, t) for t in before} == before


def test_a_start_without_retention_settings_keeps_a_longer_ttl_and_shrinking_needs_a_setting(
        anchor: Any, caplog: pytest.LogCaptureFixture) -> None:
    from stratoscope.regional.sinks.clickhouse_retention import (
        Retention,
        RetentionShrinkError,
        apply_retention,
    )

    db = f"r_{uuid.uuid4().hex[:12]}"
    apply_migrations(anchor, db)
    points = "ts + toIntervalDay(if(resolution < 60, 7, {}))"
    assert apply_retention(anchor, db, Retention(raw=90)) == ["metric_points", "histogram_points"]
    assert ttl_of(anchor, db, "metric_points") == points.format(90)
    # a later start whose settings say nothing: the 90 days stay
    apply_migrations(anchor, db)
    assert apply_retention(anchor, db, Retention()) == []
    assert ttl_of(anchor, db, "metric_points") == points.format(90)
    # 10 days without the setting: refused, one line, nothing altered
    with pytest.raises(RetentionShrinkError) as err:
        apply_retention(anchor, db, Retention(raw=10))
    assert str(err.value) == (
        f"retention of {db}.metric_points: the settings ask for TTL "
        "ts + toIntervalDay(if(resolution < 60, 7, 10)) (10 days), shorter than its TTL "
        "ts + toIntervalDay(if(resolution < 60, 7, 90)) (90 days), which deletes data; set "
        "clickhouse.retention_allow_shrink: true (--clickhouse-retention-allow-shrink) to apply it")
    assert ttl_of(anchor, db, "metric_points") == points.format(90)
    assert ttl_of(anchor, db, "histogram_points") == points.format(90)
    # the finer resolution is held to the same rule
    with pytest.raises(RetentionShrinkError, match=r"\(3 days at resolutions under 60 s\), shorter than"):
        apply_retention(anchor, db, Retention(raw_fine=3))
    # with it: applied, and a warning says so
    with caplog.at_level("WARNING", logger="stratoscope.regional.sinks.clickhouse_retention"):
        assert apply_retention(anchor, db, Retention(raw=10), allow_shrink=True) == [
            "metric_points", "histogram_points"]
    assert ttl_of(anchor, db, "metric_points") == points.format(10)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"retention of {db}.{t}: TTL ts + toIntervalDay(if(resolution < 60, 7, 10)) (was "
        f"{points.format(90)}); shortened, ClickHouse deletes the rows past it"
        for t in ("metric_points", "histogram_points")]


async def test_the_sink_applies_retention_at_start_and_only_warns_without_migrate(
        chdb_dir: str, anchor: Any, caplog: pytest.LogCaptureFixture) -> None:
    from stratoscope.regional.sinks.clickhouse import ClickHouseSink
    from stratoscope.regional.sinks.clickhouse_retention import Retention

    db = f"r_{uuid.uuid4().hex[:12]}"
    first = ClickHouseSink(f"chdb://{chdb_dir}", database=db, retention=Retention(profiles=20))
    await first.start()
    await first.stop()
    assert first.retention_changed == ["profile_samples"]
    assert ttl_of(anchor, db, "profile_samples") == "ts + toIntervalDay(20)"
    again = ClickHouseSink(f"chdb://{chdb_dir}", database=db, retention=Retention(profiles=20))
    await again.start()  # a restart with the same settings
    await again.stop()
    assert (again.applied, again.retention_changed) == ([], [])
    # a regional that may not alter tables says what differs and changes nothing
    writer = ClickHouseSink(f"chdb://{chdb_dir}", database=db, migrate=False,
                            retention=Retention(profiles=20, events=9))
    with caplog.at_level("WARNING", logger="stratoscope.regional.sinks.clickhouse"):
        await writer.start()
        await writer.stop()
    assert [r.getMessage() for r in caplog.records if "retention" in r.getMessage()] == [
        f"retention of {db}.events is TTL toDateTime(ts) + toIntervalDay(30), the settings ask for "
        "toDateTime(ts) + INTERVAL 9 DAY: start once with --migrate (as a user with the migrator "
        "role) to apply it"]
    assert writer.check_notes == [
        f"retention differs: {db}.events has TTL toDateTime(ts) + toIntervalDay(30), the settings "
        "ask for toDateTime(ts) + INTERVAL 9 DAY"]
    assert ttl_of(anchor, db, "events") == "toDateTime(ts) + toIntervalDay(30)"


async def test_the_sink_refuses_to_shorten_a_ttl_unless_allowed(chdb_dir: str, anchor: Any) -> None:
    from stratoscope.regional.sinks.base import PermanentError
    from stratoscope.regional.sinks.clickhouse import ClickHouseSink
    from stratoscope.regional.sinks.clickhouse_retention import Retention

    db = f"r_{uuid.uuid4().hex[:12]}"
    dsn = f"chdb://{chdb_dir}"
    for retention in (Retention(raw=90), Retention()):  # set, then a start that says nothing
        sink = ClickHouseSink(dsn, database=db, retention=retention)
        await sink.start()
        await sink.stop()
    assert ttl_of(anchor, db, "metric_points") == "ts + toIntervalDay(if(resolution < 60, 7, 90))"
    refused = ClickHouseSink(dsn, database=db, retention=Retention(raw=10))
    with pytest.raises(PermanentError, match=(
            rf"^retention of {db}\.metric_points: the settings ask for TTL .+ \(10 days\), shorter "
            r"than its TTL .+ \(90 days\), which deletes data; set clickhouse\.retention_allow_shrink: "
            r"true \(--clickhouse-retention-allow-shrink\) to apply it$")):
        await refused.start()
    assert ttl_of(anchor, db, "metric_points") == "ts + toIntervalDay(if(resolution < 60, 7, 90))"
    allowed = ClickHouseSink(dsn, database=db, retention=Retention(raw=10), retention_allow_shrink=True)
    await allowed.start()
    await allowed.stop()
    assert allowed.retention_changed == ["metric_points", "histogram_points"]
    assert ttl_of(anchor, db, "metric_points") == "ts + toIntervalDay(if(resolution < 60, 7, 10))"


# ---------------------------------------------------------------- the cluster path on one node


def test_the_sink_on_a_one_shard_cluster_stores_what_one_server_stores(tmp_path: Path) -> None:
    """tests/integration/one_node_cluster.py, in a process of its own (chdb reads its
    configuration once per process): the cluster rendering with ON CLUSTER dropped and
    Replicated engines made plain, Distributed tables as they ship, on a one-shard cluster."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "tests.integration.one_node_cluster",
                           str(tmp_path / "store")], cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["applied"] == ["0001", "0002", "0003", "0004", "0005", "0006"]
    assert out["on_cluster"] == out["commands"] == 67  # every statement, the bootstrap's too
    assert out["clusters"] == [["one", 1, 1]]
    engines = out["engines"]
    for table in ("metric_points", "histogram_points", "metric_points_1h", "histogram_points_1h",
                  "series", "profile_stacks", "profile_samples", "events", "nodes"):
        assert engines[table] == "Distributed" and engines[f"{table}_local"].endswith("MergeTree"), table
    # the sink writes the Distributed tables in the foreground, with its tokens, one insert
    # per frame and table (the three blocks are three frames)
    clustered = out["inserts"]["clustered"]
    assert {t for t, _, _ in clustered} == {"profile_stacks", "series", "metric_points", "histogram_points",
                                             "profile_samples", "events", "nodes"}
    assert all(fg == 1 and token for _, fg, token in clustered)
    assert [t for t, _, _ in clustered].count("metric_points") == 3
    assert {foreground for _, foreground, _ in out["inserts"]["single"]} == {None}
    # the rows reached the local tables before deliver() returned
    assert out["local_rows"] == 14
    # through Distributed tables, views with GLOBAL joins and local hourly views: the
    # same totals as one server, exactly (n1 x1, n2 x3 and the roll-up; each node's
    # block also counts the one edge batch merged into it)
    expected = {
        "metrics.rows": 14, "histograms.rows": 5, "profile_samples.rows": 6, "events.rows": 4,
        "metrics_1h.rows": 14, "histograms_1h.rows": 5, "value": 157 + 2 + 3 * 157 + 2 + 314 + 2,
        "value_1h": 948, "hist": [72, 6, [[3, 5, 10], [30, 12, 24]]],
        "hist_1h": [72, 6, [[3, 5, 10], [30, 12, 24]]], "samples": 4 * (30 + 12 + 5),
    }
    assert out["first"] == out["single"] == expected
    # a restarted sink delivering the same blocks changes nothing: the token reaches
    # the local tables (and their hourly views) through the Distributed tables
    assert out["again"] == expected
    # a cluster the server does not know is refused at start; the macro is resolved
    assert out["start:nope"] == ("PermanentError: ClickHouse cluster 'nope' "
                                 "(clickhouse.cluster) is not in the server's remote_servers "
                                 "(see system.clusters)")
    assert out["start:{cluster}"] == "started"
    # retention on a cluster alters the local tables, once
    assert out["retention"] == ["events"] and out["retention_again"] == []
    assert out["events_local_ttl"].startswith("toDateTime(ts) + toIntervalDay(9) SETTINGS")
