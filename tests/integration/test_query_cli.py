"""`stratoscope query` and `stratoscope status` on data from a real edge run.

One store for the module (query_store.py): a regional and an edge started as commands,
every BPF program of the edge on this kernel, a known workload. The queries run through
the regional's read endpoint while it runs, then directly on the embedded store once it
has stopped (the last test).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from stratoscope.query.cookbook import cookbook
from tests.integration.query_store import (
    OPENAT_ENOENT,
    OPENAT_OK,
    Store,
    cli,
    http_json,
    http_text,
    running_store,
)

pytestmark = [pytest.mark.kernel]

#: Parameters a query needs beyond node and time (the generic ones name their metric).
EXTRA = {
    "latency_quantiles": ["--param", "metric=syscall_latency", "--param", "label=syscall"],
    "counter_per_hour": ["--param", "metric=syscalls_total", "--param", "label=syscall"],
}
#: Queries run without --node: their default, every node summed.
EVERY_NODE = {"latency_quantiles", "counter_per_hour"}


@pytest.fixture(scope="module")
def store(workload_bin: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    with running_store(workload_bin, tmp_path_factory.mktemp("query-store")) as s:
        yield s


def _args(store: Store, name: str, *more: str) -> list[str]:
    node = [] if name in EVERY_NODE else ["--node", store.node]
    return ["query", name, *node, *EXTRA.get(name, []), *more]


def _json(store: Store, name: str, *more: str, where: list[str]) -> dict[str, Any]:
    out = cli(*_args(store, name, *more), "--format", "json", *where)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _by(doc: dict[str, Any], key: str) -> dict[Any, dict[str, Any]]:
    return {r[key]: r for r in doc["rows"]}


def test_every_cookbook_query_has_rows_through_the_regional(store: Store) -> None:
    where = ["--regional", store.query_url]
    for name in cookbook():
        doc = _json(store, name, where=where)
        assert doc["rows"], f"{name}: no rows"
        assert [c["name"] for c in doc["columns"]] == [c.name for c in cookbook()[name].columns]
        table = cli(*_args(store, name), *where)
        assert cookbook()[name].title in " ".join(table.stdout.split()), table.stdout


def test_exact_values_of_the_known_workload(store: Store) -> None:
    where = ["--regional", store.query_url]
    calls = _by(_json(store, "top_syscalls", "--comm", store.counted_comm, where=where), "syscall")
    assert calls["openat"]["calls"] == OPENAT_OK + OPENAT_ENOENT
    assert calls["openat"]["errors"] == OPENAT_ENOENT
    assert 0 < calls["openat"]["p50"] <= calls["openat"]["p99"]

    ran = _by(_json(store, "what_ran", "--limit", "100000", where=where), "comm")
    assert ran[store.counted_comm]["exits"] == 1
    assert ran[store.counted_comm]["syscalls"] >= OPENAT_OK + OPENAT_ENOENT
    assert ran[store.burn_comm]["cpu_time"] >= 1_500_000_000  # it burnt 2 s of CPU

    exits = _json(store, "process_events", "--comm", store.counted_comm, "--param", "kind=exit",
                  where=where)["rows"]
    assert [(e["pid"], e["code"], e["node"]) for e in exits] == [(store.counted_pid, 0, store.node)]

    stacks = _json(store, "flamegraph", "--pid", str(store.burn_pid), where=where)["rows"]
    total = sum(r["samples"] for r in stacks)
    in_burn = sum(r["samples"] for r in stacks if "stratoscope_burn_cpu" in r["stack"].split(";"))
    # A sample may land between Popen's fork and exec, under the parent's thread name;
    # every sample in the burner's function carries the burner's name.
    named = sum(r["samples"] for r in stacks if r["stack"].startswith(store.burn_comm + ";"))
    assert all(r["stack"].startswith(store.burn_comm + ";") for r in stacks
               if "stratoscope_burn_cpu" in r["stack"].split(";"))
    assert named / total > 0.8 and in_burn / total > 0.8, stacks[:3]

    # Labels the roll-ups across nodes drop (block's keeps only op, syscalls' only syscall)
    # still group: without --node these queries sum the node rows, not the roll-up.
    devices = _json(store, "latency_quantiles", "--param", "metric=block_latency",
                    "--param", "label=device", where=where)["rows"]
    assert devices and all(r["label_value"] for r in devices), devices
    by_comm = _json(store, "latency_quantiles", "--param", "metric=syscall_latency",
                    "--param", "label=comm", where=where)
    assert _by(by_comm, "label_value")[store.counted_comm]["samples"] >= OPENAT_OK + OPENAT_ENOENT
    hourly = _json(store, "counter_per_hour", "--param", "metric=syscall_errors_total",
                   "--param", "label=comm", where=where)["rows"]
    assert all(r["label_value"] for r in hourly), hourly
    assert sum(r["total"] for r in hourly if r["label_value"] == store.counted_comm) == OPENAT_ENOENT

    tcp = _by(_json(store, "tcp_retransmits", where=where), "node")[store.node]
    assert tcp["opens"] >= 20  # ten connections, both ends
    assert tcp["retransmits"] >= 1  # SYNs dropped by the full accept queue

    health = _by(_json(store, "fleet_health", where=where), "node")[store.node]
    # windows without any point of the node: none on a quiet machine, but an edge whose
    # drain stalls past a window (this one compiles and symbolizes on 2 loaded cores)
    # sends its next batch for both, so only the bound is known
    assert health["windows"] >= 2 and 0 <= health["missing"] < health["windows"]
    newest = datetime.fromisoformat(health["newest_window"].replace("Z", "+00:00"))
    assert newest.tzinfo is not None and newest.year >= 2024 and newest.second % 5 == 0


def test_table_prints_units_not_raw_integers(store: Store) -> None:
    out = cli(*_args(store, "top_syscalls", "--comm", store.counted_comm),
              "--regional", store.query_url).stdout
    row = next(line for line in out.splitlines() if " openat " in line)
    assert f"{OPENAT_OK + OPENAT_ENOENT:,}" in row and f"{OPENAT_ENOENT:,}" in row
    assert any(u in row for u in (" ns", " µs", " ms")), row
    disks = cli(*_args(store, "slowest_disks"), "--regional", store.query_url).stdout
    assert any(u in disks for u in (" KiB", " MiB", " GiB")), disks


def _go() -> str:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if go is None:
        pytest.fail("`go` is not in PATH nor at /usr/local/go/bin/go: install Go to read pprof files")
    return go


def _chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("Debian's chromium is not installed (scripts/setup.sh installs it)")
    return exe


def test_flamegraph_as_folded_pprof_and_svg(store: Store, tmp_path: Path) -> None:
    # By pid and name: a sample between Popen's fork and exec has the pid, not the name.
    base = ["query", "flamegraph", "--node", store.node, "--pid", str(store.burn_pid),
            "--comm", store.burn_comm, "--regional", store.query_url]
    folded = cli(*base, "--format", "folded").stdout.splitlines()
    assert folded and all(line.startswith(store.burn_comm + ";") for line in folded)
    assert all(line.rsplit(" ", 1)[1].isdigit() for line in folded)
    top = max(folded, key=lambda line: int(line.rsplit(" ", 1)[1]))
    assert top.rsplit(" ", 1)[0].split(";")[-1] == "stratoscope_burn_cpu"

    prof = tmp_path / "cpu.pb.gz"
    cli(*base, "--format", "pprof", "-o", str(prof))
    out = subprocess.run([_go(), "tool", "pprof", "-top", str(prof)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["flat", "flat%"])
    assert lines[head + 1].split()[-1] == "stratoscope_burn_cpu", out

    page = tmp_path / "cpu.svg"
    cli(*base, "--format", "svg", "-o", str(page))
    with tempfile.TemporaryDirectory() as profile_dir:
        dom = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile_dir}", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120, check=True).stdout
    assert "<svg" in dom
    assert f"<title>{store.burn_comm} (" in dom
    assert "<title>stratoscope_burn_cpu (" in dom
    assert ">stratoscope_burn_cpu<" in dom  # wide enough to be labelled


def test_read_endpoint_runs_named_queries_only(store: Store) -> None:
    status, body = http_json(f"{store.query_url}/query/drop_everything")
    assert status == 404 and body["queries"] == list(cookbook())
    status, body = http_json(f"{store.query_url}/query/top_syscalls?start=1&end=2&sql=SELECT%201")
    assert status == 400 and "no parameter sql" in body["error"]
    status, body = http_json(f"{store.query_url}/query/top_syscalls?start=x&end=2")
    assert status == 400 and "parameter start" in body["error"]
    status, body = http_json(f"{store.query_url}/query/top_syscalls?end=2")
    assert status == 400 and "needs parameter start" in body["error"]
    metrics = http_text(store.regional_metrics) or ""
    assert 'stratoscope_regional_query_requests_total{outcome="unknown_query",query="unknown"} 1.0' in metrics
    assert 'stratoscope_regional_query_requests_total{outcome="bad_request",query="top_syscalls"} 3.0' in metrics


def test_unknown_query_exits_2_with_the_list() -> None:
    out = cli("query", "no_such_query", check=False)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert all(name in out.stderr for name in cookbook())
    listed = cli("query", "--list").stdout
    assert all(name in listed for name in cookbook())


def _words(out: str) -> str:
    """A rich table's text without its box drawing, runs of blanks as one."""
    return " ".join(re.sub(r"[│┃┏┓┗┛━─┡┩╇┳┻┼┌┐└┘╭╮╰╯]", " ", out).split())


def test_status_of_the_running_edge_and_regional(store: Store) -> None:
    out = cli("status", "--edge", store.edge_metrics, "--regional", store.regional_metrics).stdout
    text = _words(out)
    assert "programs attached 6 of 6: block, process, profile, sched, syscalls, tcp" in text, out
    assert "not attached none" in text, out
    assert re.search(r"last drain [0-9.,]+ (ns|µs|ms|s) ago", text), out
    edge_page = http_text(store.edge_metrics) or ""
    if "stratoscope_edge_batches_acked_total" in edge_page:
        assert re.search(r"batches acked [0-9,]+", text), out
    else:
        assert "batches acked n/a" in text, out
    assert re.search(r"batches accepted [0-9,]+", text), out
    assert re.search(r"clickhouse [0-9,]+ [0-9,]+ ", text), out
    bad = cli("status", "--edge", store.regional_metrics, check=False)
    assert bad.returncode == 2 and "is not an edge's /metrics" in bad.stderr


def test_direct_read_of_the_embedded_store_after_the_regional_stops(store: Store) -> None:
    where = ["--regional", store.query_url]
    before = _json(store, "top_syscalls", "--comm", store.counted_comm, where=where)["rows"]
    busy = cli("query", "what_ran", "--clickhouse", f"chdb://{store.chdb_dir}", check=False)
    assert busy.returncode == 2 and "open in another process" in busy.stderr, busy.stderr
    assert store.stop_regional() == 0
    direct = ["--clickhouse", f"chdb://{store.chdb_dir}"]
    after = _json(store, "top_syscalls", "--comm", store.counted_comm, where=direct)["rows"]
    assert after == before
    for name in cookbook():
        assert _json(store, name, where=direct)["rows"], f"{name}: no rows read directly"
    gone = cli("query", "what_ran", "--regional", store.query_url, check=False)
    assert gone.returncode == 2 and "cannot read from the regional" in gone.stderr


def test_a_taken_read_endpoint_port_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = cli("regional", "--insecure", "--listen", "127.0.0.1:0", "--metrics-port", "0",
                "--query-listen", f"127.0.0.1:{port}", "--clickhouse", f"chdb://{tmp_path}/ch",
                "--wal-dir", f"{tmp_path}/wal", check=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"stratoscope: error: cannot start the regional: [Errno 98] read endpoint "
        f"127.0.0.1:{port} (query_listen): Address already in use")


#: Per window of syscalls_total for openat: the roll-up (node = ''), the node rows, and the
#: node rows of one process name (a parameter).
ROLLUP_VS_NODES = """
SELECT toUnixTimestamp(p.ts) AS ts,
       sumIf(p.value, p.node = '') AS rollup,
       sumIf(p.value, p.node != '') AS nodes,
       sumIf(p.value, p.node != '' AND s.labels['comm'] = {comm:String}) AS counted
FROM stratoscope.metric_points AS p
INNER JOIN (SELECT series_id, any(labels) AS labels FROM stratoscope.series
            WHERE metric = 'syscalls_total' GROUP BY series_id) AS s ON s.series_id = p.series_id
WHERE p.metric = 'syscalls_total' AND s.labels['syscall'] = 'openat'
GROUP BY ts ORDER BY ts
"""


def test_rollup_equals_the_sum_of_node_rows(store: Store) -> None:
    """Per window, the roll-up across nodes of openat calls is exactly the sum of the
    node rows (nothing doubled, nothing lost), and the node rows hold the counted
    child's 1,200 calls exactly. Read on the stored directory once the regional is gone."""
    assert store.stop_regional() == 0
    script = (
        "import json, sys, clickhouse_connect\n"
        "c = clickhouse_connect.get_client(dsn=sys.argv[1])\n"
        "rows = c.query(sys.argv[2], parameters={'comm': sys.argv[3]}).result_rows\n"
        "print(json.dumps([list(r) for r in rows]))\n")
    out = subprocess.run([sys.executable, "-c", script, f"chdb://{store.chdb_dir}", ROLLUP_VS_NODES,
                          store.counted_comm], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    windows = json.loads(out.stdout)
    assert windows, "no openat rows stored"
    assert [(ts, rollup) for ts, rollup, _, _ in windows] == [(ts, nodes) for ts, _, nodes, _ in windows]
    assert sum(counted for *_, counted in windows) == OPENAT_OK + OPENAT_ENOENT
    assert sum(nodes for _, _, nodes, _ in windows) >= OPENAT_OK + OPENAT_ENOENT
