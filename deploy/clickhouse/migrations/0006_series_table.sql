-- Narrow point rows, label maps once per series.
--
-- Why: with every label map stored on every row, ClickHouse spent ~9.5 us of
-- CPU per stored row once background merges were counted (raw tables and the
-- hourly tables, whose sort key held the map), most of it re-compressing and
-- comparing label maps. Stored once per series it is ~4.7 us per row
-- (loadtest/chdb_storage.py, docs/BENCHMARKS.md "Session 5").
--
-- Layout (what readers see is unchanged):
--   metrics_ingest / histograms_ingest   Null tables: where writers INSERT, with
--                                        the label map as before (sorted keys);
--                                        nothing is stored in them.
--   metric_points / histogram_points     the raw rows without labels or unit,
--                                        series_id = cityHash64(labels)
--   metric_points_1h / histogram_points_1h  hourly roll-ups keyed by series_id
--   series                               (metric, series_id) -> unit, labels;
--                                        one row per series and insert,
--                                        ReplacingMergeTree keeps the newest
--   metrics, histograms, metrics_1h, histograms_1h
--                                        VIEWs joining points to series: the
--                                        same columns as the tables they
--                                        replace, so queries keep working.
-- Queries that only need series_id (or filter on labels first and then read
-- points by series_id) can read the *_points tables and series directly.
--
-- Data written before this migration stays in metrics_v0, histograms_v0,
-- metrics_1h_v0 and histograms_1h_v0 (same schema as before; their TTLs still
-- apply). To make it visible through the new views, copy it once:
--   INSERT INTO {db}.metrics_ingest SELECT resolution, ts, region, cluster,
--     node, metric, kind, unit, labels, value, gauge FROM {db}.metrics_v0
-- (and the same for histograms); then drop the *_v0 tables.
--
-- Every statement can run again after an interruption. Re-running after the
-- views exist fails loudly (the renames find metrics_v0 already there).
DROP VIEW IF EXISTS {db}.metrics_1h_mv
;

DROP VIEW IF EXISTS {db}.histograms_1h_mv
;

RENAME TABLE IF EXISTS {db}.metrics TO {db}.metrics_v0
;

RENAME TABLE IF EXISTS {db}.histograms TO {db}.histograms_v0
;

RENAME TABLE IF EXISTS {db}.metrics_1h TO {db}.metrics_1h_v0
;

RENAME TABLE IF EXISTS {db}.histograms_1h TO {db}.histograms_1h_v0
;

CREATE TABLE IF NOT EXISTS {db}.series
(
    metric     LowCardinality(String),
    series_id  UInt64,
    unit       LowCardinality(String),
    labels     Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    last_seen  DateTime('UTC')
)
ENGINE = ReplacingMergeTree(last_seen)
ORDER BY (metric, series_id)
TTL last_seen + INTERVAL 400 DAY
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE TABLE IF NOT EXISTS {db}.metric_points
(
    resolution  UInt32 CODEC(ZSTD(1)),
    ts          DateTime('UTC') CODEC(DoubleDelta, ZSTD(1)),
    region      LowCardinality(String),
    cluster     LowCardinality(String),
    node        LowCardinality(String),
    metric      LowCardinality(String),
    kind        Enum8('counter' = 1, 'gauge' = 2),
    series_id   UInt64,
    value       UInt64 CODEC(T64, ZSTD(1)),
    gauge       Float64 CODEC(Gorilla, ZSTD(1))
)
ENGINE = MergeTree
PARTITION BY (resolution, toDate(ts))
ORDER BY (metric, kind, region, cluster, node, series_id, resolution, ts)
TTL ts + toIntervalDay(if(resolution < 60, 7, 35))
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1
;

CREATE TABLE IF NOT EXISTS {db}.histogram_points
(
    resolution    UInt32 CODEC(ZSTD(1)),
    ts            DateTime('UTC') CODEC(DoubleDelta, ZSTD(1)),
    region        LowCardinality(String),
    cluster       LowCardinality(String),
    node          LowCardinality(String),
    metric        LowCardinality(String),
    series_id     UInt64,
    scale         Int8 DEFAULT 0,
    count         UInt64 CODEC(T64, ZSTD(1)),
    sum           UInt64 CODEC(T64, ZSTD(1)),
    zero_count    UInt64 CODEC(T64, ZSTD(1)),
    bucket_index  Array(Int16) CODEC(ZSTD(1)),
    bucket_count  Array(UInt64) CODEC(ZSTD(1))
)
ENGINE = MergeTree
PARTITION BY (resolution, toDate(ts))
ORDER BY (metric, region, cluster, node, series_id, resolution, ts)
TTL ts + toIntervalDay(if(resolution < 60, 7, 35))
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1
;

-- Hourly roll-ups (see 0004: rows move to their hour, merges collapse them;
-- readers always aggregate). No label map in the sort key any more.
CREATE TABLE IF NOT EXISTS {db}.metric_points_1h
(
    ts         DateTime('UTC') CODEC(DoubleDelta, ZSTD(1)),
    region     LowCardinality(String),
    cluster    LowCardinality(String),
    node       LowCardinality(String),
    metric     LowCardinality(String),
    kind       Enum8('counter' = 1, 'gauge' = 2),
    series_id  UInt64,
    value      SimpleAggregateFunction(sum, UInt64) CODEC(T64, ZSTD(1)),
    gauge_sum  SimpleAggregateFunction(sum, Float64),
    gauge_min  SimpleAggregateFunction(min, Float64),
    gauge_max  SimpleAggregateFunction(max, Float64),
    rows       SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (metric, kind, region, cluster, node, series_id, ts)
TTL ts + INTERVAL 400 DAY
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE TABLE IF NOT EXISTS {db}.histogram_points_1h
(
    ts          DateTime('UTC') CODEC(DoubleDelta, ZSTD(1)),
    region      LowCardinality(String),
    cluster     LowCardinality(String),
    node        LowCardinality(String),
    metric      LowCardinality(String),
    series_id   UInt64,
    count       SimpleAggregateFunction(sum, UInt64),
    sum         SimpleAggregateFunction(sum, UInt64),
    zero_count  SimpleAggregateFunction(sum, UInt64),
    buckets     SimpleAggregateFunction(sumMap, Tuple(Array(Int16), Array(UInt64))) CODEC(ZSTD(1))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (metric, region, cluster, node, series_id, ts)
TTL ts + INTERVAL 400 DAY
SETTINGS non_replicated_deduplication_window = 10000
;

-- Where writers insert. Label maps sorted by key (the regional sorts them), so
-- series_id = cityHash64(labels) is what it was in 0005.
CREATE TABLE IF NOT EXISTS {db}.metrics_ingest
(
    resolution  UInt32,
    ts          DateTime('UTC'),
    region      LowCardinality(String),
    cluster     LowCardinality(String),
    node        LowCardinality(String),
    metric      LowCardinality(String),
    kind        Enum8('counter' = 1, 'gauge' = 2),
    unit        LowCardinality(String),
    labels      Map(LowCardinality(String), String),
    value       UInt64,
    gauge       Float64
)
ENGINE = Null
;

CREATE TABLE IF NOT EXISTS {db}.histograms_ingest
(
    resolution    UInt32,
    ts            DateTime('UTC'),
    region        LowCardinality(String),
    cluster       LowCardinality(String),
    node          LowCardinality(String),
    metric        LowCardinality(String),
    unit          LowCardinality(String),
    labels        Map(LowCardinality(String), String),
    scale         Int8 DEFAULT 0,
    count         UInt64,
    sum           UInt64,
    zero_count    UInt64,
    bucket_index  Array(Int16),
    bucket_count  Array(UInt64)
)
ENGINE = Null
;

-- Every view below reads the ingest tables and runs in the insert; the sink's
-- insert_deduplication_token reaches their targets
-- (deduplicate_blocks_in_dependent_materialized_views = 1), so a retried
-- insert is dropped there.
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.metric_points_mv TO {db}.metric_points AS
SELECT resolution, ts, region, cluster, node, metric, kind, cityHash64(labels) AS series_id, value, gauge
FROM {db}.metrics_ingest
;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.metric_points_1h_mv TO {db}.metric_points_1h AS
SELECT
    toStartOfHour(ts) AS ts,
    region, cluster, node, metric, kind, cityHash64(labels) AS series_id,
    value,
    gauge AS gauge_sum,
    gauge AS gauge_min,
    gauge AS gauge_max,
    toUInt64(1) AS rows
FROM {db}.metrics_ingest
;

-- One series row per distinct series of an insert (an insert holds many
-- nodes, which share most label sets).
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.metric_series_mv TO {db}.series AS
SELECT metric, series_id, any(u) AS unit, any(l) AS labels, max(t) AS last_seen
FROM (SELECT metric, cityHash64(labels) AS series_id, unit AS u, labels AS l, ts AS t FROM {db}.metrics_ingest)
GROUP BY metric, series_id
;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.histogram_points_mv TO {db}.histogram_points AS
SELECT resolution, ts, region, cluster, node, metric, cityHash64(labels) AS series_id, scale, count, sum,
       zero_count, bucket_index, bucket_count
FROM {db}.histograms_ingest
;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.histogram_points_1h_mv TO {db}.histogram_points_1h AS
SELECT
    toStartOfHour(ts) AS ts,
    region, cluster, node, metric, cityHash64(labels) AS series_id,
    count,
    sum,
    zero_count,
    (bucket_index, bucket_count) AS buckets
FROM {db}.histograms_ingest
;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.histogram_series_mv TO {db}.series AS
SELECT metric, series_id, any(u) AS unit, any(l) AS labels, max(t) AS last_seen
FROM (SELECT metric, cityHash64(labels) AS series_id, unit AS u, labels AS l, ts AS t FROM {db}.histograms_ingest)
GROUP BY metric, series_id
;

-- What readers query: the columns of the tables of 0001/0004. LEFT ANY JOIN: a
-- series is written in the same insert as its points, and never dropped before
-- them (TTL 400 days after its last point); copies of one series hold the same
-- labels, so any one will do.
CREATE VIEW IF NOT EXISTS {db}.metrics AS
SELECT
    p.resolution AS resolution, p.ts AS ts, p.region AS region, p.cluster AS cluster, p.node AS node,
    p.metric AS metric, p.kind AS kind, s.unit AS unit, s.labels AS labels, p.series_id AS series_id,
    p.value AS value, p.gauge AS gauge
FROM {db}.metric_points AS p
LEFT ANY JOIN {db}.series AS s ON s.metric = p.metric AND s.series_id = p.series_id
;

CREATE VIEW IF NOT EXISTS {db}.histograms AS
SELECT
    p.resolution AS resolution, p.ts AS ts, p.region AS region, p.cluster AS cluster, p.node AS node,
    p.metric AS metric, s.unit AS unit, s.labels AS labels, p.series_id AS series_id, p.scale AS scale,
    p.count AS count, p.sum AS sum, p.zero_count AS zero_count, p.bucket_index AS bucket_index,
    p.bucket_count AS bucket_count, (p.bucket_index, p.bucket_count) AS buckets
FROM {db}.histogram_points AS p
LEFT ANY JOIN {db}.series AS s ON s.metric = p.metric AND s.series_id = p.series_id
;

CREATE VIEW IF NOT EXISTS {db}.metrics_1h AS
SELECT
    p.ts AS ts, p.region AS region, p.cluster AS cluster, p.node AS node, p.metric AS metric,
    p.kind AS kind, p.series_id AS series_id, s.labels AS labels, s.unit AS unit, p.value AS value,
    p.gauge_sum AS gauge_sum, p.gauge_min AS gauge_min, p.gauge_max AS gauge_max, p.rows AS rows
FROM {db}.metric_points_1h AS p
LEFT ANY JOIN {db}.series AS s ON s.metric = p.metric AND s.series_id = p.series_id
;

CREATE VIEW IF NOT EXISTS {db}.histograms_1h AS
SELECT
    p.ts AS ts, p.region AS region, p.cluster AS cluster, p.node AS node, p.metric AS metric,
    p.series_id AS series_id, s.labels AS labels, s.unit AS unit, p.count AS count, p.sum AS sum,
    p.zero_count AS zero_count, p.buckets AS buckets
FROM {db}.histogram_points_1h AS p
LEFT ANY JOIN {db}.series AS s ON s.metric = p.metric AND s.series_id = p.series_id
;
