"""The SQL of the panels, written for the ClickHouse datasource plugin's expansion.

Each query goes through the plugin in two steps (grafana/clickhouse-datasource):
the browser replaces ``$__conditionalAll(cond, $var)`` (``1=1`` when ``$var`` is All)
and the template variables (``${node:singlequote}`` is ``'a','b'``), then the backend
expands the time macros (``$__timeFilter(ts)``, ``$__fromTime``, ``$__toTime``,
``$__interval_s``, ``$__timeInterval(ts)``).

Three rules shape every query here:

* **Resolution.** Each metric panel reads a UNION ALL of the raw table and its hourly
  roll-up; a constant condition on the length of the time range switches one branch
  off (``RAW_MAX_RANGE_S``), so a 6-hour view reads 60-second rows and a 30-day view
  hourly rows. Time buckets are never narrower than the rows they sum (the
  ``$resolution`` constant for raw rows, an hour for hourly rows): a counter per
  bucket divided by the bucket's seconds is then a true rate.
* **Roll-ups.** Rows are additive partials (late windows, roll-up frames): always
  ``sum()`` / ``sumMap()``. When region, node and container are all "All" and the
  metric's roll-up across nodes keeps the labels a panel groups by, the panel reads
  the roll-up rows (``node = ''``, one row per window and label set instead of one per
  node); otherwise it reads the nodes' rows under the filters.
* **Region** is the edge's static label ``region`` (the ``region`` column of every
  table); roll-up rows have none, so a region filter reads node rows.
"""

from __future__ import annotations

from collections.abc import Sequence

from stratoscope.regional.sinks.clickhouse import histogram_quantile_sql

#: Time ranges up to this long read raw rows; longer ranges read the hourly roll-ups.
#: Three days of 60-second rows is 4,320 points per series at most; beyond, hours
#: give at least 72 points.
RAW_MAX_RANGE_S = 3 * 86400
RAW = f"(dateDiff('second', $__fromTime, $__toTime) <= {RAW_MAX_RANGE_S})"
HOURLY = f"(NOT {RAW})"
#: Bucket widths in seconds: the panel's interval, at least the rows' resolution.
RAW_BUCKET = "greatest($__interval_s, $resolution)"
HOUR_BUCKET = "greatest($__interval_s, 3600)"

REGION = "$__conditionalAll(region IN (${region:singlequote}), $region)"
NODE = "$__conditionalAll(node IN (${node:singlequote}), $node)"
#: Rows whose labels carry the container id (keys decoded from a cgroup id).
CONTAINER_LABEL = "$__conditionalAll(labels['container'] IN (${container:singlequote}), $container)"
#: Rows with a cgroup column (events, profile samples): the container's cgroups, as the
#: edge resolved them into the series labels.
CONTAINER_CGROUP = ("$__conditionalAll(cgroup IN (SELECT labels['cgroup'] FROM series "
                    "WHERE labels['container'] IN (${container:singlequote})), $container)")


def is_all(var: str) -> str:
    """True when ``$var`` is "All": ``$__conditionalAll`` keeps ``0`` or makes it ``1=1``."""
    return f"($__conditionalAll(0, ${var}))"


def node_scope(container: str | None) -> str:
    """The nodes' rows under the region / node / container filters."""
    parts = ["node != ''", REGION, NODE]
    if container == "label":
        parts.append(CONTAINER_LABEL)
    elif container == "cgroup":
        parts.append(CONTAINER_CGROUP)
    return " AND ".join(parts)


def scope(*, rollup: bool, container: bool) -> str:
    """Which rows a metric panel reads: the roll-up when nothing is filtered, else nodes'."""
    nodes = node_scope("label" if container else None)
    if not rollup:
        return f"({nodes})"
    alls = " AND ".join([is_all("region"), is_all("node")] + ([is_all("container")] if container else []))
    return f"(({alls} AND node = '') OR (NOT ({alls}) AND {nodes}))"


def _in(values: Sequence[str]) -> str:
    for v in values:
        if not v.replace("_", "").isalnum():
            raise ValueError(f"not a metric name: {v!r}")
    return ", ".join(f"'{v}'" for v in values)


def _union(select: str, tables: tuple[str, str], metrics: Sequence[str], where: str) -> str:
    """``select`` (with ``{b}``: bucket seconds) over the raw and the hourly table."""
    raw, hourly = tables
    return f"""
    SELECT {select.format(b=RAW_BUCKET)}
    FROM {raw}
    WHERE {RAW} AND metric IN ({_in(metrics)}) AND $__timeFilter(ts) AND {where}
    UNION ALL
    SELECT {select.format(b=HOUR_BUCKET)}
    FROM {hourly}
    WHERE {HOURLY} AND metric IN ({_in(metrics)})
      AND ts >= toStartOfHour($__fromTime) AND ts <= $__toTime AND {where}"""


def counter_rate(metrics: Sequence[str], key: str, key_expr: str, *, rollup: bool, container: bool,
                 scale: str = "", top: int = 0, value: str = "rate") -> str:
    """Per-second rate of counters per bucket and ``key``; the ``top`` keys by total if > 0."""
    src = _union(
        f"toStartOfInterval(ts, INTERVAL {{b}} SECOND) AS t, {key_expr} AS k, value AS v, {{b}} AS s",
        ("metrics", "metrics_1h"), metrics, scope(rollup=rollup, container=container))
    keep = (f"\nWHERE k IN (SELECT k FROM src GROUP BY k ORDER BY sum(v) DESC, k LIMIT {top})"
            if top else "")
    div = f" / {scale}" if scale else ""
    return f"""
WITH src AS ({src}
)
SELECT t AS time, k AS {key}, sum(v) / any(s){div} AS {value}
FROM src{keep}
GROUP BY time, {key}
ORDER BY time, {key}"""


def _hist_src(metric: str, key_expr: str, *, rollup: bool, container: bool) -> str:
    return _union(
        f"toStartOfInterval(ts, INTERVAL {{b}} SECOND) AS t, {key_expr} AS k, buckets AS b, "
        "zero_count AS z",
        ("histograms", "histograms_1h"), [metric], scope(rollup=rollup, container=container))


def quantile(q: float) -> str:
    """Quantile ``q`` of the merged buckets ``b`` / zero bucket ``z`` (log-linear in a bucket)."""
    return histogram_quantile_sql(q, "sumMap(b)", "sum(z)", method="loglinear")


def histogram_quantiles(metric: str, key: str | None, key_expr: str, *, rollup: bool,
                        container: bool, quantiles: Sequence[float] = (0.5, 0.99)) -> str:
    """p50 / p99 (or ``quantiles``) per bucket (and ``key``) from the stored log2 buckets."""
    src = _hist_src(metric, key_expr, rollup=rollup, container=container)
    qs = ", ".join(f"{quantile(q)} AS p{round(q * 100)}" for q in quantiles)
    keys = f", k AS {key}" if key else ""
    group = f"time, {key}" if key else "time"
    return f"""
SELECT t AS time{keys}, {qs}
FROM ({src}
)
GROUP BY {group}
HAVING sum(z) + arraySum(sumMap(b).2) > 0
ORDER BY {group}"""


def histogram_heatmap(metric: str, *, rollup: bool, container: bool) -> str:
    """Samples per bucket and log2 bucket, the bucket named by its upper bound (0 = zero bucket).

    The name is the bound zero-padded to 20 digits: the time series frame has one field per
    bucket, and whatever orders those fields by name then orders them by bound.
    """
    src = _hist_src(metric, "''", rollup=rollup, container=container)
    return f"""
SELECT time, leftPad(toString(toUInt64(bound)), 20, '0') AS le, sum(n) AS count
FROM (
    SELECT t AS time,
           arrayJoin(arrayConcat([(0., z)], arrayMap((i, c) -> (pow(2, i + 1), c), b.1, b.2))) AS p,
           p.1 AS bound, p.2 AS n
    FROM ({src}
    )
)
GROUP BY time, bound
HAVING count > 0
ORDER BY time, bound"""


def histogram_table(metric: str, key: str, key_expr: str, *, rollup: bool, container: bool) -> str:
    """Per ``key`` over the whole range: samples, p50, p99 and mean."""
    src = _union(
        f"{key_expr} AS k, buckets AS b, zero_count AS z, count AS c, sum AS total",
        ("histograms", "histograms_1h"), [metric], scope(rollup=rollup, container=container))
    return f"""
SELECT k AS {key}, sum(c) AS samples, {quantile(0.5)} AS p50, {quantile(0.99)} AS p99,
       sum(total) / greatest(sum(c), 1) AS mean
FROM ({src}
)
GROUP BY {key}
HAVING samples > 0
ORDER BY samples DESC, {key}
LIMIT 50"""


def nodes_reporting(metric: str) -> str:
    """Nodes with rows of ``metric`` per bucket (the point table: no labels needed)."""
    src = _union("toStartOfInterval(ts, INTERVAL {b} SECOND) AS t, node",
                 ("metric_points", "metric_points_1h"), [metric], node_scope(None))
    return f"""
SELECT t AS time, count(DISTINCT node) AS nodes
FROM ({src}
)
GROUP BY time
ORDER BY time"""


def per_node_total(metric: str, value: str) -> str:
    """A counter per bucket and node (the point table), as a sum per bucket."""
    src = _union("toStartOfInterval(ts, INTERVAL {b} SECOND) AS t, node, value AS v",
                 ("metric_points", "metric_points_1h"), [metric], node_scope(None))
    return f"""
SELECT t AS time, node, sum(v) AS {value}
FROM ({src}
)
GROUP BY time, node
ORDER BY time, node"""


NODE_LAG = f"""
SELECT node, region, max(last_seen) AS last_window_end,
       dateDiff('second', max(last_seen), $__toTime) AS lag_s
FROM nodes
WHERE {node_scope(None)}
GROUP BY node, region
ORDER BY lag_s DESC, node"""

NODES_NOW = f"""
SELECT count() AS nodes
FROM (SELECT node, max(last_seen) AS seen FROM nodes WHERE {node_scope(None)} GROUP BY node)
WHERE seen >= $__toTime - 300"""

EXEC_EVENTS = f"""
SELECT ts AS time, node, comm, pid, ppid, detail AS file, cgroup
FROM events
WHERE kind = 'exec' AND $__timeFilter(ts) AND {node_scope("cgroup")}
ORDER BY ts DESC, node, pid
LIMIT 1000"""

EXECS_PER_INTERVAL = f"""
SELECT $__timeInterval(ts) AS time, count() AS execs
FROM events
WHERE kind = 'exec' AND $__timeFilter(ts) AND {node_scope("cgroup")}
GROUP BY time
ORDER BY time"""


def flame_graph(where: str = f"$__timeFilter(ts) AND {node_scope('cgroup')}") -> str:
    """Grafana's flame graph frame (level, value, self, label), depth first.

    A stack's path is ``comm; user frames root..leaf; kernel frames root..leaf`` (kernel
    frames suffixed ``_[k]``), as in the folded stacks of deploy/clickhouse/queries/.
    Every prefix of every path is a node of the tree: its value is the samples of the
    paths under it (inclusive), its self the samples of the paths ending there. The
    root (level 0, ``total``) is the empty prefix. Sorting the prefixes as arrays gives
    depth-first pre-order (a prefix sorts before its extensions, siblings by label),
    which is the order the flame graph panel rebuilds the tree from.
    """
    return f"""
SELECT level, value, self, if(level = 0, 'total', prefix[level]) AS label
FROM (
    SELECT k AS level, arraySlice(path, 1, k) AS prefix, sum(n) AS value,
           sumIf(n, k = length(path)) AS self
    FROM (
        SELECT arrayConcat([toString(s.comm)], arrayReverse(us.frames),
                           arrayMap(f -> concat(f, '_[k]'), arrayReverse(ks.frames))) AS path,
               sum(s.n) AS n
        FROM (
            SELECT comm, kernel_stack_id, user_stack_id, sum(samples) AS n
            FROM profile_samples
            WHERE profile = 'cpu' AND {where}
            GROUP BY comm, kernel_stack_id, user_stack_id
        ) AS s
        LEFT JOIN (SELECT stack_id, any(frames) AS frames FROM profile_stacks GROUP BY stack_id) AS ks
            ON s.kernel_stack_id = ks.stack_id
        LEFT JOIN (SELECT stack_id, any(frames) AS frames FROM profile_stacks GROUP BY stack_id) AS us
            ON s.user_stack_id = us.stack_id
        GROUP BY path
    )
    ARRAY JOIN range(length(path) + 1) AS k
    GROUP BY level, prefix
)
ORDER BY prefix
SETTINGS join_use_nulls = 0"""


REGION_VALUES = "SELECT DISTINCT region FROM nodes WHERE node != '' AND region != '' ORDER BY region"
NODE_VALUES = f"SELECT DISTINCT node FROM nodes WHERE node != '' AND {REGION} ORDER BY node"
#: Container ids; not "other", the edge's bucket for series beyond its top N.
CONTAINER_VALUES = """SELECT DISTINCT labels['container'] AS container FROM series
WHERE metric IN ('sched_oncpu_ns_total', 'syscalls_total') AND labels['container'] NOT IN ('', 'other')
ORDER BY container"""
