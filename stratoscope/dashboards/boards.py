"""The Stratoscope dashboards: fleet, syscalls, scheduler, network, block I/O, processes, profiles.

Whether a panel may read a metric's roll-up rows comes from the program descriptions
(``rollup: [labels]`` in bpf/<program>.yaml, the same declarations the regional
applies): only when the roll-up keeps every label the panel groups by.
"""

from __future__ import annotations

from stratoscope.dashboards import sql
from stratoscope.dashboards.model import (
    FORMAT_TABLE,
    FORMAT_TIME_SERIES,
    Dashboard,
    Panel,
    Query,
    Variable,
)
from stratoscope.regional.rollups import declared_rollups

#: The regional's output resolution in seconds (``resolution`` in regional.yaml); the
#: narrowest time bucket a panel uses on raw rows. A hidden constant: set it here and
#: rebuild if the regionals write another resolution.
RESOLUTION_S = 60

VARIABLES = (
    Variable("region", "Region", sql.REGION_VALUES),
    Variable("node", "Node", sql.NODE_VALUES),
    Variable("container", "Container", sql.CONTAINER_VALUES),
    Variable("resolution", "Resolution (s)", constant=str(RESOLUTION_S)),
)

#: Metrics whose keys carry a cgroup, so their labels hold the container id.
PER_CONTAINER = frozenset({
    "syscalls_total", "syscall_errors_total", "syscall_latency", "sched_runqueue_latency",
    "sched_oncpu_ns_total", "sched_voluntary_switches_total", "sched_involuntary_switches_total",
    "process_events_total",
})

_ROLLUPS = {r.metric: set(r.by) for r in declared_rollups()}


def rolls_up(metric: str, *labels: str) -> bool:
    """Does the metric's roll-up across nodes keep ``labels``?"""
    kept = _ROLLUPS.get(metric)
    return kept is not None and set(labels) <= kept


def _ts(sql_text: str, *columns: str) -> Query:
    return Query(sql_text, FORMAT_TIME_SERIES, ("time", *columns))


def _table(sql_text: str, *columns: str) -> Query:
    return Query(sql_text, FORMAT_TABLE, columns)


def rate_panel(title: str, metrics: list[str], key: str, key_expr: str, labels: tuple[str, ...],
               unit: str, *, scale: str = "", top: int = 0, description: str = "",
               width: int = 12) -> Panel:
    """A time series of counter rates per ``key``."""
    rollup = all(rolls_up(m, *labels) for m in metrics)
    container = all(m in PER_CONTAINER for m in metrics)
    q = sql.counter_rate(metrics, key, key_expr, rollup=rollup, container=container, scale=scale, top=top)
    return Panel("timeseries", title, _ts(q, key, "rate"), description=description, unit=unit, width=width)


def quantile_panel(title: str, metric: str, unit: str, key: str | None = None, key_expr: str = "''",
                   labels: tuple[str, ...] = (), quantiles: tuple[float, ...] = (0.5, 0.99),
                   description: str = "", width: int = 12) -> Panel:
    q = sql.histogram_quantiles(metric, key, key_expr, rollup=rolls_up(metric, *labels),
                                container=metric in PER_CONTAINER, quantiles=quantiles)
    cols = ((key,) if key else ()) + tuple(f"p{round(x * 100)}" for x in quantiles)
    return Panel("timeseries", title, _ts(q, *cols), description=description, unit=unit, width=width)


def heatmap_panel(title: str, metric: str, unit: str, description: str = "", width: int = 12) -> Panel:
    q = sql.histogram_heatmap(metric, rollup=rolls_up(metric), container=metric in PER_CONTAINER)
    return Panel("heatmap", title, _ts(q, "le", "count"), description=description, width=width, options={
        "calculate": False,
        "rowsFrame": {"layout": "le"},
        "yAxis": {"unit": unit, "axisPlacement": "left"},
        "cellValues": {"unit": "short"},
        "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5, "fill": "dark-orange"},
        "tooltip": {"mode": "single", "yHistogram": True},
    })


def table_panel(title: str, q: Query, description: str = "", width: int = 12, unit: str = "") -> Panel:
    return Panel("table", title, q, description=description, width=width, unit=unit,
                 options={"showHeader": True, "cellHeight": "sm"})


CONTAINER_KEY = "if(labels['container'] = '', '(no container)', labels['container'])"


def fleet() -> Dashboard:
    return Dashboard("stratoscope-fleet", "Stratoscope / Fleet overview",
                     "Nodes reporting, edge batches stored, events lost, how far behind each node is.",
                     VARIABLES, (
        Panel("stat", "Nodes reporting (last 5 min of the range)",
              _table(sql.NODES_NOW, "nodes"), width=6, height=6,
              description="Nodes whose newest stored window ends within 5 minutes of the range's end.",
              options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                       "colorMode": "value", "graphMode": "none"}),
        Panel("timeseries", "Nodes reporting", _ts(sql.nodes_reporting("stratoscope_batches"), "nodes"),
              width=9, height=6, description="Distinct nodes with stored rows per time bucket."),
        Panel("timeseries", "Edge batches stored, per node",
              _ts(sql.per_node_total("stratoscope_batches", "batches"), "node", "batches"),
              width=9, height=6,
              description="Edge batches merged into the stored windows (each node's batches per bucket)."),
        Panel("timeseries", "Events lost at the edge, per node",
              _ts(sql.per_node_total("stratoscope_events_lost", "lost"), "node", "lost"),
              description="Process events the edge could not ship (kernel rate limit, full ring, batch limit)."),
        table_panel("Lag: time since each node's newest stored window", _table(
            sql.NODE_LAG, "node", "region", "last_window_end", "lag_s"),
            description="Seconds from the end of each node's newest stored window to the range's end."),
    ))


def syscalls() -> Dashboard:
    return Dashboard("stratoscope-syscalls", "Stratoscope / Syscalls",
                     "System call rate, errors and latency, from the kernel's per-syscall aggregates.",
                     VARIABLES, (
        rate_panel("Syscalls per second (top 10)", ["syscalls_total"], "syscall", "labels['syscall']",
                   ("syscall",), "ops", top=10),
        rate_panel("Errors per second by syscall and errno (top 10)", ["syscall_errors_total"], "error",
                   "concat(labels['syscall'], ' ', labels['errno'])", ("syscall", "errno"), "ops", top=10),
        heatmap_panel("Latency heatmap (all syscalls)", "syscall_latency", "ns",
                      description="Samples per log2 bucket, named by the bucket's upper bound."),
        quantile_panel("Latency p50 / p99 (all syscalls)", "syscall_latency", "ns",
                       description="From the summed log2 buckets, log-linear inside the bucket."),
        table_panel("Latency by syscall", _table(sql.histogram_table(
            "syscall_latency", "syscall", "labels['syscall']", rollup=rolls_up("syscall_latency", "syscall"),
            container=True), "syscall", "samples", "p50", "p99", "mean"), width=24, unit="ns"),
    ))


def scheduler() -> Dashboard:
    return Dashboard("stratoscope-scheduler", "Stratoscope / Scheduler",
                     "Run-queue latency, CPU time and context switches per container.",
                     VARIABLES, (
        quantile_panel("Run-queue latency p99 by container", "sched_runqueue_latency", "ns",
                       key="container", key_expr=CONTAINER_KEY, labels=("container",), quantiles=(0.99,),
                       description="Time from wake-up to running, p99 per container (log-linear)."),
        heatmap_panel("Run-queue latency heatmap", "sched_runqueue_latency", "ns"),
        rate_panel("CPU time by container", ["sched_oncpu_ns_total"], "container", CONTAINER_KEY,
                   ("container",), "short", scale="1e9", top=10,
                   description="On-CPU seconds per second (cores busy)."),
        rate_panel("Involuntary switches per second by container", ["sched_involuntary_switches_total"],
                   "container", CONTAINER_KEY, ("container",), "ops", top=10),
    ))


def network() -> Dashboard:
    return Dashboard("stratoscope-network", "Stratoscope / Network",
                     "TCP connections, resets, retransmits and round-trip time (per node: the kernel "
                     "attributes them to sockets, not containers).",
                     VARIABLES, (
        rate_panel("Connections opened per second", ["tcp_opens_total"], "direction",
                   "labels['direction']", ("direction",), "ops"),
        rate_panel("Connections closed per second", ["tcp_closes_total"], "direction",
                   "labels['direction']", ("direction",), "ops"),
        rate_panel("Resets per second", ["tcp_resets_sent_total", "tcp_resets_received_total"], "reset",
                   "if(metric = 'tcp_resets_sent_total', 'sent', 'received')", ("metric",), "ops"),
        rate_panel("Retransmits per second", ["tcp_retransmits_total"], "segments", "'retransmitted'", (),
                   "ops"),
        quantile_panel("Smoothed RTT p50 / p99", "tcp_srtt", "µs", width=24),
    ))


def block_io() -> Dashboard:
    return Dashboard("stratoscope-block", "Stratoscope / Block I/O",
                     "Block device throughput, operations and latency (per node and device).",
                     VARIABLES, (
        rate_panel("Throughput by operation", ["block_bytes_total"], "op", "labels['op']", ("op",), "Bps"),
        rate_panel("Operations per second by device and operation", ["block_ops_total"], "device_op",
                   "concat(labels['device'], ' ', labels['op'])", ("device", "op"), "iops"),
        quantile_panel("Latency p50 / p99 by operation", "block_latency", "ns", key="op",
                       key_expr="labels['op']", labels=("op",)),
        heatmap_panel("Latency heatmap", "block_latency", "ns"),
    ))


def processes() -> Dashboard:
    return Dashboard("stratoscope-processes", "Stratoscope / Processes",
                     "Process events: exact counts from the kernel and individual exec events.",
                     VARIABLES, (
        rate_panel("Process events per second", ["process_events_total"], "event", "labels['event']",
                   ("event",), "ops"),
        Panel("timeseries", "Exec events stored per interval", _ts(sql.EXECS_PER_INTERVAL, "execs"),
              description="Individual exec events (rate-limited at the edge; see the fleet's events lost)."),
        table_panel("Exec events", _table(sql.EXEC_EVENTS, "time", "node", "comm", "pid", "ppid", "file",
                                          "cgroup"), width=24),
    ))


def profiles() -> Dashboard:
    return Dashboard("stratoscope-profiles", "Stratoscope / Profiles",
                     "CPU flame graph of the sampled stacks (comm; user frames; kernel frames).",
                     VARIABLES, (
        Panel("flamegraph", "CPU flame graph", _table(sql.flame_graph(), "level", "value", "self", "label"),
              width=24, height=16),
    ), time_from="now-1h")


def dashboards() -> list[Dashboard]:
    """Every dashboard, in the order of the links between them."""
    return [fleet(), syscalls(), scheduler(), network(), block_io(), processes(), profiles()]
