"""Every panel's SQL, expanded as the plugin expands it, on a store filled by a real edge run.

A Grafana server is not part of this project; the dashboards are proven the way the
ClickHouse datasource plugin would run them (tests/grafana_macros.py): each panel of
deploy/grafana/dashboards/*.json is expanded for a time range and a choice of template
variables, executed on ClickHouse (chdb), and its result checked for the shape its
panel type needs, for rows, and where the truth is known, for exact values.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest

from stratoscope.dashboards.boards import dashboards
from stratoscope.histogram import histogram_quantile
from stratoscope.regional.sinks.clickhouse import apply_migrations, stack_id
from tests.grafana_macros import QueryContext, Var, grafana_interval, interpolate
from tests.integration.grafana_store import EdgeStore, fill_store

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
BOARDS = ROOT / "deploy" / "grafana" / "dashboards"
NUMERIC = re.compile(r"^(Nullable\()?(U?Int\d+|Float\d+|Decimal.*)\)?$")


def panels() -> list[tuple[str, dict[str, Any], tuple[str, ...]]]:
    """(dashboard uid, panel JSON, the columns its query promises) of every committed panel."""
    out = []
    for d in dashboards():
        board = json.loads((BOARDS / f"{d.uid.removeprefix('stratoscope-')}.json").read_text())
        for p, spec in zip(board["panels"], d.panels, strict=True):
            out.append((board["uid"], p, spec.query.columns))
    return out


PANELS = panels()
IDS = [f"{uid}:{p['id']}" for uid, p, _ in PANELS]


@pytest.fixture(scope="module")
def store(anchor: Any, workload_bin: dict[str, Path],
          tmp_path_factory: pytest.TempPathFactory) -> EdgeStore:
    return fill_store(anchor, workload_bin, tmp_path_factory.mktemp("grafana"))


@pytest.fixture(scope="module")
def client(chdb_dir: str, store: EdgeStore) -> Iterator[Any]:
    """A client whose default database is the store's, as the datasource's defaultDatabase."""
    c = clickhouse_connect.get_client(dsn=f"chdb://{chdb_dir}", database=store.database)
    yield c
    c.close()


def time_range(store: EdgeStore, long: bool) -> QueryContext:
    """Minutes around the run (raw rows), or a week ending after it (hourly rows)."""
    end = datetime.fromtimestamp(store.ended, UTC) + timedelta(minutes=2)
    start = end - timedelta(days=7) if long else datetime.fromtimestamp(store.started, UTC) - timedelta(minutes=2)
    return QueryContext(start, end, grafana_interval(start, end))


def variables(store: EdgeStore, scenario: str) -> dict[str, Var]:
    """The variables at "All", at the run's region and node (two nodes chosen: a multi-value
    list), or at its container."""
    other = "node-without-data"
    return {
        "all": {"region": Var((store.region,)), "node": Var((store.node, other)),
                "container": Var((store.container,))},
        "node": {"region": Var((store.region,), (store.region,)),
                 "node": Var((store.node, other), (store.node, other)),
                 "container": Var((store.container,))},
        "container": {"region": Var((store.region,)), "node": Var((store.node, other)),
                      "container": Var((store.container,), (store.container,))},
    }[scenario]


def run(client: Any, sql: str, ctx: QueryContext, vars_: dict[str, Var]) -> Any:
    text = interpolate(sql, ctx, vars_, {"resolution": "60"})
    assert "$" not in text, f"not expanded: {text}"
    return client.query(text)


def rows_of(client: Any, store: EdgeStore, panel: dict[str, Any], scenario: str = "all",
            long: bool = False) -> list[tuple[Any, ...]]:
    return run(client, panel["targets"][0]["rawSql"], time_range(store, long),
               variables(store, scenario)).result_rows


def check_shape(panel: dict[str, Any], columns: tuple[str, ...], result: Any) -> None:
    names = list(result.column_names)
    types = [t.name for t in result.column_types]
    rows = result.result_rows
    title = panel["title"]
    assert rows, f"{title}: no rows"
    assert tuple(names) == columns, f"{title}: columns {names}, want {columns}"
    kind = panel["type"]
    if kind in ("timeseries", "heatmap"):
        assert types[0] == "DateTime", f"{title}: time column is {types[0]}"
        times = [r[0] for r in rows]
        assert times == sorted(times), f"{title}: not ordered by time"
        values = [t for n, t in zip(names[1:], types[1:], strict=True) if not re.match(r".*String", t)]
        assert values and all(NUMERIC.match(t) for t in values), f"{title}: values {types}"
    if kind == "heatmap":
        assert types[1] == "String" and all(len(r[1]) == 20 and float(r[1]) >= 0 for r in rows)
        assert {float(r[1]) for r in rows} <= {0.0} | {2.0 ** i for i in range(65)}  # log2 bounds
    if kind == "stat":
        assert len(rows) == 1 and NUMERIC.match(types[0])
    if kind == "flamegraph":
        assert [t.removeprefix("Nullable(").rstrip(")") for t in types[:3]] == ["UInt64"] * 3
        assert types[3] == "String"
        check_nested_set(rows)


def check_nested_set(rows: list[tuple[Any, ...]]) -> None:
    """Depth-first levels from a single root; value = self + the children's values."""
    assert rows[0][0] == 0 and rows[0][3] == "total"
    assert all(r[0] >= 1 for r in rows[1:])
    children: dict[int, int] = Counter()
    stack: list[int] = []
    for i, (level, _, _, _) in enumerate(rows):
        assert level <= len(stack), f"row {i} skips a level"
        del stack[level:]
        if stack:
            children[stack[-1]] += rows[i][1]
        stack.append(i)
    for i, (_, value, self_, label) in enumerate(rows):
        assert value == self_ + children[i], f"{label}: {value} != {self_} + {children[i]}"


# ---------------------------------------------------------------- the variables


def test_variable_queries_list_the_runs_region_node_and_container(client: Any, store: EdgeStore) -> None:
    board = json.loads((BOARDS / "fleet.json").read_text())
    got = {}
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            res = run(client, v["query"]["rawSql"], time_range(store, False), variables(store, "all"))
            got[v["name"]] = [r[0] for r in res.result_rows]
    assert got == {"region": [store.region], "node": [store.node], "container": [store.container]}


# ---------------------------------------------------------------- every panel


@pytest.mark.parametrize(("scenario", "long"), [
    ("all", False), ("all", True), ("node", False), ("node", True), ("container", False),
])
def test_every_panel_returns_rows_of_its_shape(client: Any, store: EdgeStore, scenario: str,
                                               long: bool) -> None:
    ctx = time_range(store, long)
    for (_, panel, columns), ident in zip(PANELS, IDS, strict=True):
        res = run(client, panel["targets"][0]["rawSql"], ctx, variables(store, scenario))
        try:
            check_shape(panel, columns, res)
        except AssertionError as exc:
            raise AssertionError(f"{ident} ({scenario}, {'hourly' if long else 'raw'}): {exc}") from exc


@pytest.mark.parametrize("long", [False, True])
def test_roll_up_rows_equal_the_one_nodes_rows(client: Any, store: EdgeStore, long: bool) -> None:
    """With one node, "All" (roll-up rows where declared) and that node (its rows) agree exactly."""
    for (_, panel, _), ident in zip(PANELS, IDS, strict=True):
        assert rows_of(client, store, panel, "all", long) == rows_of(client, store, panel, "node", long), ident


def test_hourly_rows_hold_the_same_totals_as_raw_rows(client: Any, store: EdgeStore) -> None:
    for (_, panel, columns), ident in zip(PANELS, IDS, strict=True):
        if columns[-1] != "rate":
            continue
        totals = []
        for long, width in ((False, 60), (True, 3600)):
            per_key: Counter[Any] = Counter()
            for r in rows_of(client, store, panel, "all", long):
                per_key[r[1]] += r[2] * width
            totals.append(per_key)
        raw, hourly = totals
        assert raw.keys() == hourly.keys(), ident
        for k in raw:
            assert math.isclose(raw[k], hourly[k], rel_tol=1e-9), (ident, k, raw[k], hourly[k])


# ---------------------------------------------------------------- exact values


def panel(uid: str, title: str) -> dict[str, Any]:
    (p,) = [p for u, p, _ in PANELS if u == uid and p["title"] == title]
    return p


def test_fleet_batches_lost_events_and_nodes_are_the_edges(client: Any, store: EdgeStore) -> None:
    batches = rows_of(client, store, panel("stratoscope-fleet", "Edge batches stored, per node"))
    assert {r[1] for r in batches} == {store.node}
    assert sum(r[2] for r in batches) == store.run.forward_stats.acked
    lost = rows_of(client, store, panel("stratoscope-fleet", "Events lost at the edge, per node"))
    edge_lost = sum(b["events_lost"] for b in store.run.batches)
    assert edge_lost > 0 and sum(r[2] for r in lost) == edge_lost
    assert {r[1] for r in rows_of(client, store, panel("stratoscope-fleet", "Nodes reporting"))} == {1}
    assert rows_of(client, store, panel("stratoscope-fleet", "Nodes reporting (last 5 min of the range)")) == [(1,)]


def test_exec_table_holds_every_exec_event_the_edge_shipped(client: Any, store: EdgeStore) -> None:
    shipped = store.run.events(kind="exec", comm=store.exec_comm)
    assert shipped
    for scenario in ("all", "container"):
        rows = rows_of(client, store, panel("stratoscope-processes", "Exec events"), scenario)
        ours = [r for r in rows if r[2] == store.exec_comm]
        assert sorted(r[3] for r in ours) == sorted(e["pid"] for e in shipped)
        assert {r[6] for r in ours} == {store.cgroup}


def test_network_and_block_panels_show_the_workloads(client: Any, store: EdgeStore) -> None:
    resets = {r[1] for r in rows_of(client, store, panel("stratoscope-network", "Resets per second"))}
    assert resets == {"sent", "received"}
    retrans = rows_of(client, store, panel("stratoscope-network", "Retransmits per second"))
    assert sum(r[2] for r in retrans) > 0
    written = sum(r[2] * 60 for r in rows_of(client, store, panel("stratoscope-block", "Throughput by operation"))
                  if r[1] == "write")
    assert written >= 8 * 1024 * 1024


def test_container_filter_keeps_the_containers_workload_only(client: Any, store: EdgeStore) -> None:
    p = panel("stratoscope-scheduler", "CPU time by container")
    assert {r[1] for r in rows_of(client, store, p, "container")} == {store.container}
    assert store.container in {r[1] for r in rows_of(client, store, p, "all")}
    assert "(no container)" in {r[1] for r in rows_of(client, store, p, "all")}


def test_latency_quantiles_are_the_reference_estimate_of_the_buckets(client: Any, store: EdgeStore) -> None:
    rows = rows_of(client, store, panel("stratoscope-syscalls", "Latency by syscall"))
    ctx = time_range(store, False)
    ref = client.query(
        "SELECT labels['syscall'], sumMap(bucket_index, bucket_count), sum(zero_count) FROM histograms "
        "WHERE metric = 'syscall_latency' AND node = '' AND ts >= {a:DateTime} AND ts <= {b:DateTime} "
        "GROUP BY 1", parameters={"a": ctx.time_from, "b": ctx.time_to}).result_rows
    want = {s: (histogram_quantile(0.5, b[0], b[1], z, "loglinear"),
                histogram_quantile(0.99, b[0], b[1], z, "loglinear")) for s, b, z in ref}
    assert "openat" in {r[0] for r in rows}
    for syscall, _, p50, p99, _ in rows:
        assert math.isclose(p50, want[syscall][0], rel_tol=1e-9), syscall
        assert math.isclose(p99, want[syscall][1], rel_tol=1e-9), syscall


def test_flame_graph_of_the_container_shows_the_burner(client: Any, store: EdgeStore) -> None:
    rows = rows_of(client, store, panel("stratoscope-profiles", "CPU flame graph"), "container")
    ctx = time_range(store, False)
    total = client.query(
        "SELECT sum(samples) FROM profile_samples WHERE cgroup = {c:String} AND ts >= {a:DateTime} "
        "AND ts <= {b:DateTime}", parameters={"c": store.cgroup, "a": ctx.time_from, "b": ctx.time_to}
    ).result_rows[0][0]
    assert rows[0][1] == total > 0
    assert (1, store.burn_comm) in {(r[0], r[3]) for r in rows}
    assert any(r[3] == "stratoscope_burn_cpu" for r in rows)


# ---------------------------------------------------------------- the flame graph, by hand


def test_flame_graph_query_returns_the_nested_set_of_three_stacks(anchor: Any, chdb_dir: str) -> None:
    db = "flame_" + stack_id(["x"]).__format__("x")[:8]
    anchor.command(f"DROP DATABASE IF EXISTS {db}")
    anchor.command(f"CREATE DATABASE {db}")
    apply_migrations(anchor, db)
    ts = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    # frames are stored leaf first
    stacks = {"u1": ["compute", "work", "main"], "u2": ["io", "work", "main"], "u3": ["idle", "main"],
              "k2": ["vfs_read", "ksys_read"]}
    ids = {k: stack_id(v) for k, v in stacks.items()}
    anchor.insert("profile_stacks", [[ids[k], v, ts] for k, v in stacks.items()],
                  column_names=["stack_id", "frames", "last_seen"], database=db)
    samples = [("u1", None, 5), ("u2", "k2", 3), ("u3", None, 2)]
    anchor.insert("profile_samples", [
        [60, ts, "r1", "c1", "n1", "cpu", 52_631_578, 42, "app", "/app", ids[k] if k else 0, ids[u], n]
        for u, k, n in samples],
        column_names=["resolution", "ts", "region", "cluster", "node", "profile", "period_ns", "pid", "comm",
                      "cgroup", "kernel_stack_id", "user_stack_id", "samples"], database=db)
    sql = panel("stratoscope-profiles", "CPU flame graph")["targets"][0]["rawSql"]
    ctx = QueryContext(ts - timedelta(minutes=5), ts + timedelta(minutes=5), timedelta(seconds=1))
    vars_ = {n: Var(()) for n in ("region", "node", "container")}
    c = clickhouse_connect.get_client(dsn=f"chdb://{chdb_dir}", database=db)
    try:
        got = run(c, sql, ctx, vars_).result_rows
    finally:
        c.close()
    assert got == [
        (0, 10, 0, "total"),
        (1, 10, 0, "app"),
        (2, 10, 0, "main"),
        (3, 2, 2, "idle"),
        (3, 8, 0, "work"),
        (4, 5, 5, "compute"),
        (4, 3, 0, "io"),
        (5, 3, 0, "ksys_read_[k]"),
        (6, 3, 3, "vfs_read_[k]"),
    ]
    check_nested_set(got)
