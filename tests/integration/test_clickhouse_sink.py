"""ClickHouseSink against a real embedded ClickHouse (chdb), no mocks.

chdb hosts ONE engine per process: a client on a second directory fails while
a client on the first is open (clients on the same directory share the
engine; after every client is closed another directory may be opened). So the
module opens one directory, keeps an "anchor" client on it for the whole
module (sync reads for the assertions), and gives every test a fresh database.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from stratoscope.edge.batch import BatchBuilder, EventRow
from stratoscope.edge.decode import Histogram, ProfileRow
from stratoscope.regional.frame import Block
from stratoscope.regional.sinks.base import (
    BlockedError,
    PermanentError,
    RetriableError,
    Sink,
    SinkError,
)
from stratoscope.regional.sinks.clickhouse import (
    BATCHES_METRIC,
    EVENTS_LOST_METRIC,
    MIGRATIONS_DIR,
    ClickHouseSink,
    apply_migrations,
    dedup_token,
    folded_stacks_sql,
    histogram_quantile,
    histogram_quantile_sql,
    load_migrations,
    split_statements,
    stack_id,
)
from stratoscope.regional.sinks.clickhouse_arrow import series_id, series_id_sql
from stratoscope.v1 import batch_pb2 as pb
from tests.frames import merged_blocks

NS = 1_000_000_000
#: Start of an hour two hours ago: recent enough for every TTL, whole hours for the roll-up.
HOUR = (int(time.time()) // 3600 - 2) * 3600
LABELS = {"region": "eu-west", "cluster": "c1"}

K_STACK = ("ksys_write", "do_syscall_64", "entry_SYSCALL_64")  # leaf first
U_STACK = ("__libc_write", "ngx_process_events", "main")
U_STACK2 = ("compute", "ngx_worker", "main")


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def db() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def sink(chdb_dir: str, anchor: Any, db: str) -> AsyncIterator[ClickHouseSink]:
    s = ClickHouseSink(f"chdb://{chdb_dir}", database=db)
    await s.start()
    yield s
    await s.stop()


def rows(anchor: Any, sql: str, **params: Any) -> list[tuple]:
    return list(anchor.query(sql, parameters=params or None).result_rows)


def one(anchor: Any, sql: str, **params: Any) -> Any:
    (row,) = rows(anchor, sql, **params)
    return row[0] if len(row) == 1 else row


# ---------------------------------------------------------------- blocks from the merge


def hist(buckets: dict[int, int], zero: int = 0, total: int = 0) -> Histogram:
    return Histogram(buckets=dict(buckets), zero=zero, count=zero + sum(buckets.values()),
                     sum=total)


def node_batch(
    start: int = HOUR,
    node: str = "n1",
    scale: int = 1,
    profile: bool = True,
    events: bool = True,
) -> pb.Batch:
    """One node's 60 s window; ``scale`` multiplies every counter / bucket."""
    bb = BatchBuilder(node, "boot-1", 7, start * NS, (start + 60) * NS, LABELS)
    bb.add_counters("syscalls_total", "1", "syscalls", ["comm", "syscall"], {
        ("nginx", "read"): 100 * scale,
        ("nginx", "write"): 50 * scale,
        ("redis", "read"): 7 * scale,
    })
    bb.add_counters("procs_running", "1", "", [], {(): 3}, kind=pb.GAUGE)
    bb.add_histograms("syscall_latency", "ns", "", ["syscall"], {
        ("read",): hist({3: 5 * scale, 5: 2 * scale}, zero=1 * scale, total=100 * scale),
        ("write",): hist({10: 4 * scale}, total=8000 * scale),
    })
    if profile:
        bb.add_profile("cpu", 10_000_000, {
            ProfileRow(10, "nginx", "/web", K_STACK, U_STACK): 30 * scale,
            ProfileRow(10, "nginx", "/web", None, U_STACK2): 12 * scale,
            ProfileRow(22, "redis", "/db", K_STACK, None): 5 * scale,
        })
    if events:
        bb.add_events([
            EventRow((start + 1) * NS + 5, "exec", 10, 1, "nginx", "/web", "/usr/sbin/nginx", 0),
            EventRow((start + 2) * NS + 7, "exit", 11, 10, "sh", "/web", "", 137),
        ], lost=2)
    return bb.build()


def node_block(
    name: str,
    start: int = HOUR,
    node: str = "n1",
    scale: int = 1,
    profile: bool = True,
    events: bool = True,
) -> Block:
    """The merged block of ``node_batch``; the same ``name`` and content, the same block id."""
    (blk,) = merged_blocks(node_batch(start, node, scale, profile, events), regional_id=name)
    return blk


def rollup_block(name: str, start: int = HOUR) -> Block:
    """node_id "" = the roll-up across nodes."""
    bb = BatchBuilder("", "regional", 1, start * NS, (start + 60) * NS, {"region": "eu-west"})
    bb.add_counters("syscalls_total", "1", "", ["comm"], {("nginx",): 300, ("redis",): 14})
    bb.add_histograms("syscall_latency", "ns", "", [], {(): hist({3: 10, 5: 4, 10: 8}, zero=2)})
    (blk,) = merged_blocks(bb.build(), regional_id=name)
    return blk


async def snapshot(sink: ClickHouseSink) -> dict[str, Any]:
    """Totals of every table, read back through the sink's own query()."""
    out: dict[str, Any] = {}
    for table in ("metrics", "histograms", "profile_samples", "events", "metrics_1h",
                  "histograms_1h"):
        out[f"{table}.rows"] = (await sink.query(f"SELECT count() FROM {table}"))[0][0]
    out["value"] = (await sink.query("SELECT sum(value) FROM metrics"))[0][0]
    out["value_1h"] = (await sink.query("SELECT sum(value) FROM metrics_1h"))[0][0]
    out["hist"] = (await sink.query(
        "SELECT sum(count), sum(zero_count), sumMap(bucket_index, bucket_count) FROM histograms"
    ))[0]
    out["hist_1h"] = (await sink.query(
        "SELECT sum(count), sum(zero_count), sumMap(buckets) FROM histograms_1h"
    ))[0]
    out["samples"] = (await sink.query("SELECT sum(samples) FROM profile_samples"))[0][0]
    return out


# ---------------------------------------------------------------- migrations


def test_migration_files_are_ordered_and_split() -> None:
    migs = load_migrations()
    assert [m.version for m in migs] == sorted(m.version for m in migs)
    assert [m.version for m in migs][:4] == ["0001", "0002", "0003", "0004"]
    for m in migs:
        assert m.statements, m.name
        for stmt in m.statements:
            # every statement can run twice: a migration interrupted half way is re-run
            sql = " ".join(line for line in stmt.splitlines() if not line.startswith("--"))
            rerunnable = ("IF NOT EXISTS" in sql or "IF EXISTS" in sql
                          or re.match(r"ALTER TABLE \S+ MODIFY COLUMN", sql))
            assert "{db}." in sql and rerunnable, sql[:80]
    assert split_statements("-- only a comment\n;\nSELECT 1\n;\n\nSELECT 2;\n") == [
        "SELECT 1", "SELECT 2"
    ]


def test_migrations_twice_same_state(anchor: Any, db: str) -> None:
    applied = apply_migrations(anchor, db)
    assert applied == [m.version for m in load_migrations()]
    schema_sql = (
        "SELECT name, engine, create_table_query FROM system.tables"
        " WHERE database = {db:String} ORDER BY name"
    )
    before = rows(anchor, schema_sql, db=db)
    engines = {r[0]: r[1] for r in before}
    assert set(engines) >= {
        "metric_points", "histogram_points", "series", "profile_stacks", "profile_samples",
        "events", "nodes", "metric_points_1h", "histogram_points_1h", "metric_points_mv",
        "histogram_points_mv", "metric_points_1h_mv", "histogram_points_1h_mv", "metric_series_mv",
        "histogram_series_mv", "schema_migrations",
    }
    # readers keep the names and columns of 0001/0004; writers insert into Null tables
    assert {t: engines[t] for t in ("metrics", "histograms", "metrics_1h", "histograms_1h")} == dict.fromkeys(
        ("metrics", "histograms", "metrics_1h", "histograms_1h"), "View")
    assert engines["metrics_ingest"] == engines["histograms_ingest"] == "Null"
    assert apply_migrations(anchor, db) == []
    assert rows(anchor, schema_sql, db=db) == before
    recorded = rows(anchor, f"SELECT version, name FROM {db}.schema_migrations ORDER BY version")
    assert recorded == [(m.version, m.name) for m in load_migrations()]
    # every table that takes inserts deduplicates by token on plain MergeTree
    for table in ("metric_points", "histogram_points", "series", "profile_stacks", "profile_samples",
                  "events", "nodes", "metric_points_1h", "histogram_points_1h"):
        ddl = one(anchor, "SELECT create_table_query FROM system.tables"
                  " WHERE database = {db:String} AND name = {t:String}", db=db, t=table)
        assert "non_replicated_deduplication_window = 10000" in ddl, table


def test_interrupted_migration_resumes_after_its_last_step(
    anchor: Any, db: str, tmp_path: Any
) -> None:
    """0006 stopped after its reader views exist: the re-run must not repeat the renames
    (which would fail: metrics is a view and metrics_v0 exists) and must keep the data."""
    for m in sorted(MIGRATIONS_DIR.glob("000[1-5]_*.sql")):
        (tmp_path / m.name).write_text(m.read_text())
    apply_migrations(anchor, db, directory=tmp_path)
    anchor.command(f"INSERT INTO {db}.metrics (resolution, ts, node, metric, kind, labels, value)"
                   f" VALUES (60, {HOUR}, 'n-old', 'old_total', 'counter', map('k', 'v'), 41)")
    m6 = MIGRATIONS_DIR / "0006_series_table.sql"
    (tmp_path / m6.name).write_text(m6.read_text() + "\nCREATE TABLE {db}.interrupted (x UInt8) ENGINE = NoSuchEngine\n;\n")
    with pytest.raises(Exception, match="NoSuchEngine"):
        apply_migrations(anchor, db, directory=tmp_path)
    assert one(anchor, "SELECT engine FROM system.tables WHERE database = {db:String} AND name = 'metrics'",
               db=db) == "View"
    (tmp_path / m6.name).write_text(m6.read_text())
    assert apply_migrations(anchor, db, directory=tmp_path) == ["0006"]
    assert one(anchor, f"SELECT sum(value) FROM {db}.metrics_v0 WHERE metric = 'old_total'") == 41
    assert one(anchor, f"SELECT count() FROM {db}.metrics") == 0  # old rows stay in metrics_v0
    assert apply_migrations(anchor, db, directory=tmp_path) == []


async def test_start_twice_applies_nothing_and_health(chdb_dir: str, anchor: Any, db: str) -> None:
    s1 = ClickHouseSink(f"chdb://{chdb_dir}", database=db)
    await s1.start()
    assert s1.applied == [m.version for m in load_migrations()]
    await s1.health_check()
    await s1.stop()
    await s1.stop()  # idempotent
    s2 = ClickHouseSink(f"chdb://{chdb_dir}", database=db)
    await s2.start()
    assert s2.applied == []
    await s2.health_check()
    await s2.stop()


async def test_health_check_reasons(chdb_dir: str, anchor: Any, db: str) -> None:
    s = ClickHouseSink(f"chdb://{chdb_dir}", database=db, migrate=False)
    assert isinstance(s, Sink) and s.name == "clickhouse"
    with pytest.raises(SinkError, match="not started"):
        await s.health_check()
    await s.stop()  # safe without start()
    await s.start()
    with pytest.raises(PermanentError, match=r"lacks schema migrations 0001, 0002"):
        await s.health_check()
    with pytest.raises(RetriableError, match="not started"):
        await ClickHouseSink(f"chdb://{chdb_dir}", database=db).deliver([node_block("x")])
    await s.stop()


async def test_bad_dsn_is_permanent_unreachable_server_is_retriable() -> None:
    with pytest.raises(PermanentError, match="DSN"):
        await ClickHouseSink("mysql://localhost/x").start()
    with pytest.raises(PermanentError, match="DSN"):
        await ClickHouseSink("chdb://relative/dir").start()
    s = ClickHouseSink("http://writer:secret@127.0.0.1:1/metrics_db")
    assert s.database == "metrics_db" and "secret" not in repr(s)
    with pytest.raises(RetriableError, match="connecting to"):
        await s.start()
    with pytest.raises(ValueError, match="database name"):
        ClickHouseSink("chdb:///tmp/x", database="bad-name; DROP")


async def test_one_chdb_directory_per_process(
    tmp_path_factory: pytest.TempPathFactory, anchor: Any
) -> None:
    """While the module's directory is open, a second directory cannot be opened."""
    other = tmp_path_factory.mktemp("other-chdb")
    s = ClickHouseSink(f"chdb://{other}", database="x")
    with pytest.raises(PermanentError, match="already initialized with path"):
        await s.start()
    await s.stop()
    assert one(anchor, "SELECT 1") == 1  # the engine of the first directory is unharmed


# ---------------------------------------------------------------- delivery


async def test_deliver_exact_sums(sink: ClickHouseSink, anchor: Any, db: str) -> None:
    await sink.deliver([node_block("b1"), rollup_block("r1")])

    got = rows(anchor, f"""
        SELECT node, labels['comm'], labels['syscall'], kind, sum(value), toUnixTimestamp(ts),
               resolution, region, cluster
        FROM {db}.metrics WHERE metric = 'syscalls_total'
        GROUP BY ALL ORDER BY ALL""")
    assert got == [
        ("", "nginx", "", "counter", 300, HOUR, 60, "eu-west", ""),
        ("", "redis", "", "counter", 14, HOUR, 60, "eu-west", ""),
        ("n1", "nginx", "read", "counter", 100, HOUR, 60, "eu-west", "c1"),
        ("n1", "nginx", "write", "counter", 50, HOUR, 60, "eu-west", "c1"),
        ("n1", "redis", "read", "counter", 7, HOUR, 60, "eu-west", "c1"),
    ]
    assert one(anchor, f"SELECT labels FROM {db}.metrics WHERE node = 'n1' AND "
                       "labels['syscall'] = 'write'") == {"comm": "nginx", "syscall": "write"}
    assert one(anchor, f"SELECT kind, gauge, value, labels FROM {db}.metrics"
                       " WHERE metric = 'procs_running'") == ("gauge", 3.0, 0, {})
    assert one(anchor, f"SELECT sum(value) FROM {db}.metrics WHERE metric = {{m:String}}",
               m=EVENTS_LOST_METRIC) == 2
    # one edge batch went into node n1's block; the roll-up counts none
    assert rows(anchor, f"SELECT node, sum(value) FROM {db}.metrics WHERE metric = {{m:String}} GROUP BY node",
                m=BATCHES_METRIC) == [("n1", 1)]

    got = rows(anchor, f"""
        SELECT node, labels, sum(count), sum(sum), sum(zero_count),
               sumMap(bucket_index, bucket_count)
        FROM {db}.histograms GROUP BY node, labels ORDER BY node, toString(labels)""")
    assert got == [
        ("", {}, 24, 0, 2, ([3, 5, 10], [10, 4, 8])),
        ("n1", {"syscall": "read"}, 8, 100, 1, ([3, 5], [5, 2])),
        ("n1", {"syscall": "write"}, 4, 8000, 0, ([10], [4])),
    ]

    got = rows(anchor, f"""
        SELECT toUnixTimestamp64Nano(ts), node, kind, pid, ppid, comm, cgroup, detail, code,
               region FROM {db}.events ORDER BY ts""")
    assert got == [
        ((HOUR + 1) * NS + 5, "n1", "exec", 10, 1, "nginx", "/web", "/usr/sbin/nginx", 0,
         "eu-west"),
        ((HOUR + 2) * NS + 7, "n1", "exit", 11, 10, "sh", "/web", "", 137, "eu-west"),
    ]

    got = rows(anchor, f"""
        SELECT pid, comm, cgroup, kernel_stack_id, user_stack_id, sum(samples), any(period_ns)
        FROM {db}.profile_samples GROUP BY ALL ORDER BY ALL""")
    assert sorted(got) == sorted([
        (10, "nginx", "/web", stack_id(K_STACK), stack_id(U_STACK), 30, 10_000_000),
        (10, "nginx", "/web", 0, stack_id(U_STACK2), 12, 10_000_000),
        (22, "redis", "/db", stack_id(K_STACK), 0, 5, 10_000_000),
    ])
    stacks = dict(rows(anchor, f"SELECT stack_id, frames FROM {db}.profile_stacks FINAL"))
    assert stacks == {
        stack_id(K_STACK): list(K_STACK),
        stack_id(U_STACK): list(U_STACK),
        stack_id(U_STACK2): list(U_STACK2),
    }
    assert rows(anchor, f"SELECT node, region, cluster, node_labels FROM {db}.nodes FINAL"
                        " ORDER BY node") == [
        ("", "eu-west", "", {"region": "eu-west"}),
        ("n1", "eu-west", "c1", LABELS),
    ]


async def test_same_blocks_twice_changes_nothing(
    sink: ClickHouseSink, chdb_dir: str, db: str
) -> None:
    blocks = [node_block("b1"), rollup_block("r1"), node_block("b2", start=HOUR + 60)]
    await sink.deliver(blocks)
    first = await snapshot(sink)
    assert first["value"] == 2 * (157 + 2 + 1) + 314  # + events lost, + the node's one batch

    await sink.deliver(blocks)  # the same call again
    assert await snapshot(sink) == first
    await sink.deliver(list(reversed(blocks)))  # order does not matter
    assert await snapshot(sink) == first
    await sink.deliver(blocks + blocks[:1])  # nor a block listed twice
    assert await snapshot(sink) == first

    # a restarted regional (new sink, empty caches) retrying the same blocks
    again = ClickHouseSink(f"chdb://{chdb_dir}", database=db)
    await again.start()
    await again.deliver(blocks)
    assert await snapshot(again) == first
    await again.stop()


async def test_retry_after_timeout_changes_nothing(
    sink: ClickHouseSink, anchor: Any, db: str
) -> None:
    """A deliver that landed only partly, then the retry.

    Here the histogram points table is missing: the histograms insert fails inside
    its materialized views, after the metrics (and maybe some of the histogram
    views' other targets) went in.
    """
    blocks = [node_block("b1"), rollup_block("r1")]
    anchor.command(f"RENAME TABLE {db}.histogram_points TO {db}.histogram_points_away")
    with pytest.raises(BlockedError, match="UNKNOWN_TABLE") as err:  # a person fixes it
        await sink.deliver(blocks)
    assert err.value.reason == "missing"
    # the first frame's metrics went in before the failure; the roll-up's frame waits
    assert one(anchor, f"SELECT sum(value) FROM {db}.metric_points") == 157 + 2 + 1
    anchor.command(f"RENAME TABLE {db}.histogram_points_away TO {db}.histogram_points")

    await sink.deliver(blocks)  # the retry: what went in is deduplicated, the rest written once
    after = await snapshot(sink)
    assert after["value"] == 157 + 2 + 1 + 314
    assert after["value_1h"] == after["value"]
    assert after["hist"] == (36, 3, ([3, 5, 10], [15, 6, 12]))
    assert after["hist_1h"] == after["hist"]
    await sink.deliver(blocks)  # and once more, as after a client-side timeout
    assert await snapshot(sink) == after


def framed_blocks(nodes: int, frame_nodes: int, prefix: str) -> list[Block]:
    """``nodes`` nodes' windows merged by the regional's Aggregator, reduced into frames
    of ``frame_nodes`` nodes each (what the regional hands its sinks)."""
    return merged_blocks(*(node_batch(node=f"{prefix}-{n}", scale=n + 1) for n in range(nodes)),
                         regional_id=prefix, frame_nodes=frame_nodes)


async def test_one_insert_per_frame(sink: ClickHouseSink, anchor: Any, db: str) -> None:
    """Several frames delivered together land as one part per frame and table (its token
    is the frame's block ids, whatever the delivery holds besides), with exact sums, and a retry after a
    failed insert writes every series' labels (the series marked as sent while the
    delivery was shaped are forgotten when it fails)."""
    blocks = framed_blocks(4, 1, "mf")
    assert len({id(b.frame) for b in blocks}) == 4
    anchor.command(f"SYSTEM STOP MERGES {db}.metric_points")
    anchor.command(f"SYSTEM STOP MERGES {db}.histogram_points")
    anchor.command(f"RENAME TABLE {db}.series TO {db}.series_away")
    with pytest.raises(BlockedError, match="UNKNOWN_TABLE"):
        await sink.deliver(blocks)
    assert sink._known_series == {}
    anchor.command(f"RENAME TABLE {db}.series_away TO {db}.series")
    await sink.deliver(blocks)
    for table in ("metric_points", "histogram_points"):
        assert one(anchor, "SELECT count() FROM system.parts WHERE active AND database = {d:String}"
                           " AND table = {t:String}", d=db, t=table) == 4, table
    # scale n + 1 for node n: (100 + 50 + 7) * (1 + 2 + 3 + 4)
    assert one(anchor, f"SELECT sum(value) FROM {db}.metrics WHERE metric = 'syscalls_total'") == 157 * 10
    assert rows(anchor, f"SELECT labels['comm'], labels['syscall'], sum(value) FROM {db}.metrics"
                        f" WHERE metric = 'syscalls_total' GROUP BY 1, 2 ORDER BY 1, 2") == [
        ("nginx", "read", 1000), ("nginx", "write", 500), ("redis", "read", 70)]
    assert one(anchor, f"SELECT sum(count) FROM {db}.histograms") == (8 + 4) * 10
    assert one(anchor, f"SELECT count() FROM {db}.histograms WHERE empty(labels)") == 0
    before = await snapshot(sink)
    await sink.deliver(blocks)  # again: nothing changes
    await sink.deliver(blocks[:3])  # nor for a subset already delivered
    assert await snapshot(sink) == before


async def test_series_ids_agree_between_regional_ingest_tables_and_python(
    sink: ClickHouseSink, anchor: Any, db: str
) -> None:
    """The sink computes series_id column-wise, the ingest tables' views in SQL, and
    series_id() in Python: all three agree, and both write paths give one series."""
    bb = BatchBuilder("n-sort", "boot-1", 3, HOUR * NS, (HOUR + 60) * NS, LABELS)
    bb.add_counters("x_total", "1", "", ["zeta", "alpha", "mid"], {("z1", "a1", "m1"): 5, ("z2", "a2", "m2"): 6})
    bb.add_histograms("x_latency", "ns", "", ["syscall", "comm"], {("read", "nginx"): hist({3: 2}, total=9)})
    await sink.deliver(merged_blocks(bb.build(), regional_id="sorted-1"))
    expr = series_id_sql("labels")
    got = anchor.query(f"SELECT mapKeys(labels), labels['zeta'], labels['alpha'], value, series_id,"
                       f" series_id = {expr} FROM {db}.metrics"
                       f" WHERE metric = 'x_total' ORDER BY value").result_rows
    assert got == [
        (["alpha", "mid", "zeta"], "z1", "a1", 5, series_id({"zeta": "z1", "alpha": "a1", "mid": "m1"}), True),
        (["alpha", "mid", "zeta"], "z2", "a2", 6, series_id({"zeta": "z2", "alpha": "a2", "mid": "m2"}), True),
    ]
    assert rows(anchor, f"SELECT mapKeys(labels), labels['comm'], series_id, series_id = {expr}"
                        f" FROM {db}.histograms WHERE metric = 'x_latency'") == [
        (["comm", "syscall"], "nginx", series_id({"syscall": "read", "comm": "nginx"}), True)]
    # another writer, through the ingest table, keys in any order: the same series
    anchor.command(f"""INSERT INTO {db}.metrics_ingest (resolution, ts, node, metric, kind, unit, labels, value)
                       VALUES (60, {HOUR}, 'n-other', 'x_total', 'counter', '1',
                               map('zeta', 'z1', 'mid', 'm1', 'alpha', 'a1'), 7)""")
    assert rows(anchor, f"SELECT node, value, labels['zeta'], series_id FROM {db}.metrics"
                        f" WHERE metric = 'x_total' AND labels['alpha'] = 'a1' ORDER BY node") == [
        ("n-other", 7, "z1", got[0][4]), ("n-sort", 5, "z1", got[0][4])]
    assert one(anchor, f"SELECT count() FROM (SELECT DISTINCT metric, series_id FROM {db}.series"
                       f" WHERE metric = 'x_total')") == 2
    assert one(anchor, f"SELECT sum(value) FROM {db}.metrics_1h WHERE metric = 'x_total'") == 18


async def test_series_sent_once_then_again_after_resend_interval(
    sink: ClickHouseSink, anchor: Any, db: str
) -> None:
    """A series already sent is not sent again by the same sink until STACK_RESEND_S."""
    def block(bid: str, start: int) -> Block:
        bb = BatchBuilder("n-once", "boot-1", 1, start * NS, (start + 60) * NS, LABELS)
        bb.add_counters("once_total", "1", "", ["k"], {("a",): 1, ("b",): 2})
        (blk,) = merged_blocks(bb.build(), regional_id=bid)
        return blk

    series_rows = f"SELECT count() FROM {db}.series WHERE metric = 'once_total'"
    await sink.deliver([block("once-1", HOUR)])
    assert one(anchor, series_rows) == 2
    await sink.deliver([block("once-2", HOUR + 60)])
    assert one(anchor, series_rows) == 2  # known: points only
    sink._known_series = {k: t - sink.STACK_RESEND_S - 1 for k, t in sink._known_series.items()}
    await sink.deliver([block("once-3", HOUR + 120)])
    assert one(anchor, series_rows) == 4  # sent again (ReplacingMergeTree keeps the newest)
    assert rows(anchor, f"SELECT labels['k'], sum(value) FROM {db}.metrics WHERE metric = 'once_total'"
                        f" GROUP BY 1 ORDER BY 1") == [("a", 3), ("b", 6)]


async def test_late_partial_window_adds_up(sink: ClickHouseSink, anchor: Any, db: str) -> None:
    await sink.deliver([node_block("on-time")])
    # a late partial for the same node and window: a different block, a new row
    await sink.deliver([node_block("late", scale=2, profile=False, events=False)])
    await sink.deliver([node_block("late", scale=2, profile=False, events=False)])  # retried
    got = dict(rows(anchor, f"""
        SELECT labels['comm'] || '/' || labels['syscall'], sum(value) FROM {db}.metrics
        WHERE metric = 'syscalls_total' AND node = 'n1' AND ts = toDateTime({HOUR}, 'UTC')
        GROUP BY 1"""))
    assert got == {"nginx/read": 300, "nginx/write": 150, "redis/read": 21}
    assert one(anchor, f"SELECT count() FROM {db}.metrics WHERE metric = 'syscalls_total'") == 6
    assert one(anchor, f"""SELECT sumMap(bucket_index, bucket_count) FROM {db}.histograms
                           WHERE labels['syscall'] = 'read'""") == ([3, 5], [15, 6])


async def test_hourly_rollup_equals_raw(
    sink: ClickHouseSink, anchor: Any, chdb_dir: str, db: str
) -> None:
    blocks = [
        node_block("a", start=HOUR),
        node_block("b", start=HOUR + 60, scale=3),
        node_block("c", start=HOUR + 3600, scale=5),  # the next hour
        node_block("d", start=HOUR + 3600, node="n2"),
        rollup_block("r", start=HOUR + 120),
    ]
    await sink.deliver(blocks[:2])
    await sink.deliver(blocks[2:])
    # a duplicate deliver from another process: dropped by the token, views included
    other = ClickHouseSink(f"chdb://{chdb_dir}", database=db)
    await other.start()
    await other.deliver(blocks[:2])
    await other.stop()
    # the same blocks regrouped, after they were delivered: skipped by this sink
    await sink.deliver(blocks)

    raw_m = rows(anchor, f"""
        SELECT toStartOfHour(ts) AS h, node, metric, kind, mapSort(labels) AS l, sum(value),
               sum(gauge), min(gauge), max(gauge), count()
        FROM {db}.metrics GROUP BY ALL ORDER BY h, node, metric, toString(l)""")
    hourly_m = rows(anchor, f"""
        SELECT ts AS h, node, metric, kind, labels AS l, sum(value), sum(gauge_sum),
               min(gauge_min), max(gauge_max), sum(rows)
        FROM {db}.metrics_1h GROUP BY ALL ORDER BY h, node, metric, toString(l)""")
    assert hourly_m == raw_m
    assert len({r[0] for r in raw_m}) == 2
    assert one(anchor, f"SELECT sum(value) FROM {db}.metrics_1h WHERE node = 'n1' AND "
                       f"ts = toDateTime({HOUR}, 'UTC') AND labels['comm'] = 'nginx'") == 600

    raw_h = rows(anchor, f"""
        SELECT toStartOfHour(ts) AS h, node, metric, mapSort(labels) AS l, sum(count), sum(sum),
               sum(zero_count), sumMap(bucket_index, bucket_count)
        FROM {db}.histograms GROUP BY ALL ORDER BY h, node, toString(l)""")
    hourly_h = rows(anchor, f"""
        SELECT ts AS h, node, metric, labels AS l, sum(count), sum(sum), sum(zero_count),
               sumMap(buckets)
        FROM {db}.histograms_1h GROUP BY ALL ORDER BY h, node, toString(l)""")
    assert hourly_h == raw_h
    # and after background merges have collapsed the roll-up rows
    anchor.command(f"OPTIMIZE TABLE {db}.metric_points_1h FINAL")
    anchor.command(f"OPTIMIZE TABLE {db}.histogram_points_1h FINAL")
    assert rows(anchor, f"""
        SELECT ts AS h, node, metric, kind, labels AS l, value, gauge_sum, gauge_min,
               gauge_max, rows FROM {db}.metrics_1h ORDER BY h, node, metric, toString(l)
        """) == raw_m
    assert one(anchor, f"SELECT count() FROM {db}.histograms_1h") == len(raw_h)


# ---------------------------------------------------------------- profiles


async def test_folded_stacks_one_query(sink: ClickHouseSink, db: str) -> None:
    await sink.deliver([node_block("p1"), node_block("p2", start=HOUR + 60, scale=2)])
    await sink.deliver([node_block("p3", start=HOUR + 120, node="n2")])
    await sink.deliver([node_block("p3", start=HOUR + 120, node="n2")])  # duplicate
    w = "nginx;main;ngx_process_events;__libc_write;entry_SYSCALL_64_[k];do_syscall_64_[k];" \
        "ksys_write_[k]"
    c = "nginx;main;ngx_worker;compute"
    r = "redis;entry_SYSCALL_64_[k];do_syscall_64_[k];ksys_write_[k]"

    sql, params = folded_stacks_sql(db)
    assert await sink.query(sql, params) == [(w, 120), (c, 48), (r, 20)]

    sql, params = folded_stacks_sql(db, node="n1", pid=10)
    assert await sink.query(sql, params) == [(w, 90), (c, 36)]

    sql, params = folded_stacks_sql(db, node="n1", start=HOUR + 60, end=HOUR + 120)
    assert await sink.query(sql, params) == [(w, 60), (c, 24), (r, 10)]

    sql, params = folded_stacks_sql(db, comm="redis", kernel_suffix="")
    assert await sink.query(sql, params) == [
        ("redis;entry_SYSCALL_64;do_syscall_64;ksys_write", 20)
    ]
    sql, params = folded_stacks_sql(db, node="nope")
    assert await sink.query(sql, params) == []
    # every stack was written once, whatever the number of delivers
    assert (await sink.query("SELECT count() FROM profile_stacks"))[0][0] == 3
    # ... until the resend period (which keeps last_seen ahead of the TTL) is over:
    # repeated stack rows are harmless, the query takes any(frames) per stack_id
    sink.STACK_RESEND_S = -1
    await sink.deliver([node_block("p4", start=HOUR + 180, node="n3")])
    assert (await sink.query("SELECT count() FROM profile_stacks"))[0][0] == 6
    assert (await sink.query("SELECT count() FROM profile_stacks FINAL"))[0][0] == 3
    sql, params = folded_stacks_sql(db)
    assert await sink.query(sql, params) == [(w, 150), (c, 60), (r, 25)]


# ---------------------------------------------------------------- quantiles


def test_histogram_quantile_exact() -> None:
    # zero bucket 1, bucket 3 -> (8, 16] x5, bucket 5 -> (32, 64] x2: 8 samples
    idx, cnt, zero = [3, 5], [5, 2], 1
    assert histogram_quantile(0.0, idx, cnt, zero) == 0.0
    assert histogram_quantile(0.125, idx, cnt, zero) == 0.0  # k = 1: the zero sample
    assert histogram_quantile(0.126, idx, cnt, zero) == 16.0  # k = 2
    assert histogram_quantile(0.5, idx, cnt, zero) == 16.0
    assert histogram_quantile(0.75, idx, cnt, zero) == 16.0  # k = 6 = 1 + 5
    assert histogram_quantile(0.76, idx, cnt, zero) == 64.0
    assert histogram_quantile(1.0, idx, cnt, zero) == 64.0
    # log-linear: q*total = 4 -> 3 of the 5 samples of (8, 16] -> 2^(3 + 3/5)
    assert histogram_quantile(0.5, idx, cnt, zero, "loglinear") == 2 ** 3.6
    assert histogram_quantile(1.0, idx, cnt, zero, "loglinear") == 64.0
    assert histogram_quantile(0.75, idx, cnt, zero, "loglinear") == 16.0
    # v = 1 is bucket -1, upper bound 1; unsorted input is fine
    assert histogram_quantile(0.99, [4, -1], [0, 10]) == 1.0
    assert math.isnan(histogram_quantile(0.5, [], [], 0))
    with pytest.raises(ValueError):
        histogram_quantile(1.5, idx, cnt, zero)


async def test_histogram_quantile_sql_matches_python(sink: ClickHouseSink, db: str) -> None:
    await sink.deliver([node_block("q1"), node_block("q2", start=HOUR + 60, scale=3)])
    merged = (await sink.query(
        "SELECT sumMap(bucket_index, bucket_count), sum(zero_count) FROM histograms"
        " WHERE labels['syscall'] = 'read'"))[0]
    (idx, cnt), zero = merged
    assert (idx, cnt, zero) == ([3, 5], [20, 8], 4)
    for method in ("upper", "loglinear"):
        for q in (0.0, 0.1, 0.125, 0.13, 0.5, 0.75, 0.9, 0.99, 1.0):
            expr = histogram_quantile_sql(q, method=method)
            got = (await sink.query(
                f"SELECT {expr} FROM histograms WHERE labels['syscall'] = 'read'"))[0][0]
            assert got == pytest.approx(histogram_quantile(q, idx, cnt, zero, method),
                                        rel=1e-12), (q, method)
        # the same expression over the hourly roll-up
        expr = histogram_quantile_sql(0.99, "sumMap(buckets)", "sum(zero_count)", method)
        got = (await sink.query(
            f"SELECT {expr} FROM histograms_1h WHERE labels['syscall'] = 'read'"))[0][0]
        assert got == pytest.approx(histogram_quantile(0.99, idx, cnt, zero, method))
    # p50 / p99 per series in one query, as a report would
    got = await sink.query(f"""
        SELECT labels['syscall'] AS sc, {histogram_quantile_sql(0.5)} AS p50,
               {histogram_quantile_sql(0.99)} AS p99
        FROM histograms WHERE node = 'n1' GROUP BY sc ORDER BY sc""")
    assert got == [("read", 16.0, 64.0), ("write", 2048.0, 2048.0)]
    empty = (await sink.query(f"SELECT {histogram_quantile_sql(0.5)} FROM histograms"
                              " WHERE node = 'nope'"))[0][0]
    assert math.isnan(empty)


# ---------------------------------------------------------------- errors and tokens


async def test_malformed_block_is_permanent_and_writes_nothing(
    sink: ClickHouseSink, anchor: Any, db: str
) -> None:
    bad = node_block("bad")
    labels = bad.frame.metrics.ragged["labels"][1]
    labels["values"] = labels["values"].copy()
    labels["values"][0] = 10_000_000  # no such string in the frame's table
    with pytest.raises(PermanentError, match=f"{bad.block_id}.*cannot be shaped into rows"):
        await sink.deliver([node_block("good"), bad])
    assert one(anchor, f"SELECT count() FROM {db}.metrics") == 0
    await sink.deliver([node_block("good")])  # the sink is still usable
    assert one(anchor, f"SELECT sum(value) FROM {db}.metrics") == 160  # 157 points, 2 events lost, 1 batch


def test_dedup_token_is_per_table_and_order_free() -> None:
    a = dedup_token("metrics", ["b2", "b1"])
    assert a == dedup_token("metrics", ["b1", "b2", "b1"])
    assert a != dedup_token("histograms", ["b1", "b2"])
    assert a != dedup_token("metrics", ["b1"])
    assert a.startswith("stratoscope:metrics:")


# ---------------------------------------------------------------- documented SQL


async def test_documented_queries(sink: ClickHouseSink) -> None:
    """Every file of deploy/clickhouse/queries runs and gives the expected numbers."""
    queries = MIGRATIONS_DIR.parent / "queries"
    await sink.deliver([
        node_block("d1"), node_block("d2", start=HOUR + 60, scale=3), rollup_block("dr"),
        node_block("d3", start=HOUR + 3600),
    ])
    span = {"start": HOUR, "end": HOUR + 7200}

    sql = (queries / "flamegraph.sql").read_text()
    fold_sql, fold_params = folded_stacks_sql(sink.database, node="n1", start=HOUR,
                                              end=HOUR + 7200)
    expected = await sink.query(fold_sql, fold_params)
    assert len(expected) == 3
    got = await sink.query(sql, {"node": "n1", "pid": 0, "comm": "", **span})
    # stack and samples as folded_stacks_sql; cpu_time = samples x the 10 ms period
    assert [(s, n) for s, n, _ in got] == expected
    assert all(cpu == n * 10_000_000 for _, n, cpu in got)
    got = await sink.query(sql, {"node": "", "pid": 22, "comm": "", **span})
    assert got == [("redis;entry_SYSCALL_64_[k];do_syscall_64_[k];ksys_write_[k]", 25, 250_000_000)]
    got = await sink.query(sql, {"node": "", "pid": 0, "comm": "redis", **span})
    assert [(s, n) for s, n, _ in got] == [("redis;entry_SYSCALL_64_[k];do_syscall_64_[k];ksys_write_[k]", 25)]

    sql = (queries / "latency_quantiles.sql").read_text()
    got = await sink.query(sql, {"metric": "syscall_latency", "label": "syscall", "node": "n1",
                                 "start": HOUR, "end": HOUR + 3600})
    # read: zero 4, (8,16] x20, (32,64] x8 -> p50 16, p99 64; write: (1024,2048] x16
    assert got == [("read", 16.0, 64.0, 32, 400 / 32, "ns"), ("write", 2048.0, 2048.0, 16, 2000.0, "ns")]

    sql = (queries / "counter_per_hour.sql").read_text()
    got = await sink.query(sql, {"metric": "syscalls_total", "label": "comm", "node": "n1",
                                 **span})
    assert {u for *_, u in got} == {"1"}
    assert [(v, t, ps) for _, v, t, ps, _ in got] == [
        ("nginx", 600, 600 / 3600), ("redis", 28, 28 / 3600),
        ("nginx", 150, 150 / 3600), ("redis", 7, 7 / 3600),
    ]
    hours = [h for h, *_ in got]
    assert hours[0] == hours[1] < hours[2] == hours[3]
    # a start inside an hour includes that hour (--since 1h at 14:00:30 reads 13:00's row)
    mid = await sink.query(sql, {"metric": "syscalls_total", "label": "comm", "node": "n1",
                                 "start": HOUR + 1800, "end": HOUR + 7200})
    assert mid == got
