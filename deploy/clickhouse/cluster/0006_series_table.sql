-- 0006_series_table.sql of deploy/clickhouse/migrations rendered for the cluster '{cluster}'.
-- Generated: stratoscope schema render --cluster '{cluster}' (do not edit; docs/CLICKHOUSE.md).

--                                        ReplacingMergeTree keeps the newest
--   metrics, histograms, metrics_1h, histograms_1h
--                                        VIEWs joining points to series: the
--                                        columns of the tables they replace, so
--                                        queries keep working
--   metrics_ingest / histograms_ingest   Null tables for other writers (and the
--                                        copy of old data below): insert rows
--                                        with their label map as before; their
--                                        views compute series_id and store
--                                        points and series
--
-- series_id of a label map: over its pairs in key order,
--   h = (h XOR md5_64(key)) * P, then h = (h XOR md5_64(value)) * P,
-- from a fixed seed; md5_64 = the first 8 bytes of MD5 as a little-endian
-- UInt64 (regional/sinks/clickhouse_arrow.py: series_id, series_id_sql). The
-- regional computes it itself and sends a series' labels only when it has not
-- sent them in the last hours, so point inserts carry no label maps at all.
-- A 64-bit hash: two label sets of one metric that collide share labels in
-- the views (about 2^-64 per pair of sets; not a defence against a writer
-- that forges collisions with MD5).
--
-- Other writers insert into the *_ingest tables; for a retried insert to be
-- dropped they must send insert_deduplication_token with
-- deduplicate_blocks_in_dependent_materialized_views = 1 (as the sink does).
--
-- Data written before this migration stays in metrics_v0, histograms_v0,
-- metrics_1h_v0 and histograms_1h_v0 (the old schema; their TTLs still
-- apply) and is not visible through the new views. To copy it, with H = the
-- first whole hour of metrics_v0 (toStartOfHour(min(ts)) + 3600):
--   INSERT INTO {db}.metrics_ingest SELECT resolution, ts, region, cluster,
--     node, metric, kind, unit, labels, value, gauge
--     FROM {db}.metrics_v0 WHERE ts >= H
--   (raw rows, their series and their hourly roll-ups), then the older hours:
--   INSERT INTO {db}.metric_points_1h SELECT ts, region, cluster, node,
--     metric, kind, <series_id_sql(labels)>, value, gauge_sum, gauge_min,
--     gauge_max, rows FROM {db}.metrics_1h_v0 WHERE ts < H
--   INSERT INTO {db}.series SELECT metric, <series_id_sql(labels)>,
--     any(unit), any(mapSort(labels)), max(ts) FROM {db}.metrics_1h_v0
--     WHERE ts < H GROUP BY 1, 2
-- and the same for histograms; then drop the *_v0 tables. <series_id_sql> is
-- the arrayFold expression of metric_points_mv below.
--
-- A run interrupted half way resumes after its last recorded statement
-- (apply_migrations, schema_migration_steps), so the renames never run again
-- once the reader views exist; the statement that was running when it stopped
-- can run twice.
DROP VIEW IF EXISTS {db}.metrics_1h_mv ON CLUSTER '{cluster}'
;

DROP VIEW IF EXISTS {db}.histograms_1h_mv ON CLUSTER '{cluster}'
;

DROP TABLE IF EXISTS {db}.metrics ON CLUSTER '{cluster}'
;

RENAME TABLE IF EXISTS {db}.metrics_local TO {db}.metrics_v0_local ON CLUSTER '{cluster}'
;

CREATE TABLE IF NOT EXISTS {db}.metrics_v0 ON CLUSTER '{cluster}' AS {db}.metrics_v0_local
ENGINE = Distributed('{cluster}', '{db}', 'metrics_v0_local', cityHash64(node))
;

DROP TABLE IF EXISTS {db}.histograms ON CLUSTER '{cluster}'
;

RENAME TABLE IF EXISTS {db}.histograms_local TO {db}.histograms_v0_local ON CLUSTER '{cluster}'
;

CREATE TABLE IF NOT EXISTS {db}.histograms_v0 ON CLUSTER '{cluster}' AS {db}.histograms_v0_local
ENGINE = Distributed('{cluster}', '{db}', 'histograms_v0_local', cityHash64(node))
;

DROP TABLE IF EXISTS {db}.metrics_1h ON CLUSTER '{cluster}'
;

RENAME TABLE IF EXISTS {db}.metrics_1h_local TO {db}.metrics_1h_v0_local ON CLUSTER '{cluster}'
;

CREATE TABLE IF NOT EXISTS {db}.metrics_1h_v0 ON CLUSTER '{cluster}' AS {db}.metrics_1h_v0_local
ENGINE = Distributed('{cluster}', '{db}', 'metrics_1h_v0_local', cityHash64(node))
;

DROP TABLE IF EXISTS {db}.histograms_1h ON CLUSTER '{cluster}'
;

RENAME TABLE IF EXISTS {db}.histograms_1h_local TO {db}.histograms_1h_v0_local ON CLUSTER '{cluster}'
;

CREATE TABLE IF NOT EXISTS {db}.histograms_1h_v0 ON CLUSTER '{cluster}' AS {db}.histograms_1h_v0_local
ENGINE = Distributed('{cluster}', '{db}', 'histograms_1h_v0_local', cityHash64(node))
;

CREATE TABLE IF NOT EXISTS {db}.series_local ON CLUSTER '{cluster}'
(
    metric     LowCardinality(String),
    series_id  UInt64,
    unit       LowCardinality(String),
    labels     Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    last_seen  DateTime('UTC')
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}', last_seen)
ORDER BY (metric, series_id)
TTL last_seen + INTERVAL 401 DAY
SETTINGS replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800
;

CREATE TABLE IF NOT EXISTS {db}.series ON CLUSTER '{cluster}' AS {db}.series_local
ENGINE = Distributed('{cluster}', '{db}', 'series_local', series_id)
;

CREATE TABLE IF NOT EXISTS {db}.metric_points_local ON CLUSTER '{cluster}'
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
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY (resolution, toDate(ts))
ORDER BY (metric, kind, region, cluster, node, series_id, resolution, ts)
TTL ts + toIntervalDay(if(resolution < 60, 7, 35))
SETTINGS replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800, ttl_only_drop_parts = 1
;

CREATE TABLE IF NOT EXISTS {db}.metric_points ON CLUSTER '{cluster}' AS {db}.metric_points_local
ENGINE = Distributed('{cluster}', '{db}', 'metric_points_local', cityHash64(node))
;

CREATE TABLE IF NOT EXISTS {db}.histogram_points_local ON CLUSTER '{cluster}'
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
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY (resolution, toDate(ts))
ORDER BY (metric, region, cluster, node, series_id, resolution, ts)
TTL ts + toIntervalDay(if(resolution < 60, 7, 35))
SETTINGS replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800, ttl_only_drop_parts = 1
;

CREATE TABLE IF NOT EXISTS {db}.histogram_points ON CLUSTER '{cluster}' AS {db}.histogram_points_local
ENGINE = Distributed('{cluster}', '{db}', 'histogram_points_local', cityHash64(node))
;

-- readers always aggregate). No label map in the sort key any more.
CREATE TABLE IF NOT EXISTS {db}.metric_points_1h_local ON CLUSTER '{cluster}'
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
ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY toYYYYMM(ts)
ORDER BY (metric, kind, region, cluster, node, series_id, ts)
TTL ts + INTERVAL 400 DAY
SETTINGS replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800
;

CREATE TABLE IF NOT EXISTS {db}.metric_points_1h ON CLUSTER '{cluster}' AS {db}.metric_points_1h_local
ENGINE = Distributed('{cluster}', '{db}', 'metric_points_1h_local', cityHash64(node))
;

CREATE TABLE IF NOT EXISTS {db}.histogram_points_1h_local ON CLUSTER '{cluster}'
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
ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY toYYYYMM(ts)
ORDER BY (metric, region, cluster, node, series_id, ts)
TTL ts + INTERVAL 400 DAY
SETTINGS replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800
;

CREATE TABLE IF NOT EXISTS {db}.histogram_points_1h ON CLUSTER '{cluster}' AS {db}.histogram_points_1h_local
ENGINE = Distributed('{cluster}', '{db}', 'histogram_points_1h_local', cityHash64(node))
;

-- Hourly roll-ups follow every insert into the point tables (the regional's
-- and the ingest views'); a retried insert's token reaches them
-- (deduplicate_blocks_in_dependent_materialized_views = 1).
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.metric_points_1h_mv ON CLUSTER '{cluster}'
TO {db}.metric_points_1h_local AS
SELECT
    toStartOfHour(ts) AS ts,
    region, cluster, node, metric, kind, series_id,
    value,
    gauge AS gauge_sum,
    gauge AS gauge_min,
    gauge AS gauge_max,
    toUInt64(1) AS rows
FROM {db}.metric_points_local
;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.histogram_points_1h_mv ON CLUSTER '{cluster}'
TO {db}.histogram_points_1h_local AS
SELECT
    toStartOfHour(ts) AS ts,
    region, cluster, node, metric, series_id,
    count,
    sum,
    zero_count,
    (bucket_index, bucket_count) AS buckets
FROM {db}.histogram_points_local
;

-- For other writers: rows with label maps (any key order), as 0001 took them.
CREATE TABLE IF NOT EXISTS {db}.metrics_ingest_local ON CLUSTER '{cluster}'
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

CREATE TABLE IF NOT EXISTS {db}.metrics_ingest ON CLUSTER '{cluster}' AS {db}.metrics_ingest_local
ENGINE = Distributed('{cluster}', '{db}', 'metrics_ingest_local', cityHash64(node))
;

CREATE TABLE IF NOT EXISTS {db}.histograms_ingest_local ON CLUSTER '{cluster}'
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

CREATE TABLE IF NOT EXISTS {db}.histograms_ingest ON CLUSTER '{cluster}' AS {db}.histograms_ingest_local
ENGINE = Distributed('{cluster}', '{db}', 'histograms_ingest_local', cityHash64(node))
;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.metric_points_mv ON CLUSTER '{cluster}'
TO {db}.metric_points_local AS
SELECT resolution, ts, region, cluster, node, metric, kind,
       arrayFold((acc, k, v) -> bitXor(bitXor(acc, reinterpretAsUInt64(MD5(k))) * 11400714819323198485, reinterpretAsUInt64(MD5(v))) * 11400714819323198485, mapKeys(mapSort(labels)), mapValues(mapSort(labels)), toUInt64(7640891576956012808)) AS series_id,
       value, gauge
FROM {db}.metrics_ingest_local
;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.metric_series_mv ON CLUSTER '{cluster}'
TO {db}.series AS
SELECT metric, series_id, any(u) AS unit, any(l) AS labels, max(t) AS last_seen
FROM (SELECT metric, arrayFold((acc, k, v) -> bitXor(bitXor(acc, reinterpretAsUInt64(MD5(k))) * 11400714819323198485, reinterpretAsUInt64(MD5(v))) * 11400714819323198485, mapKeys(mapSort(labels)), mapValues(mapSort(labels)), toUInt64(7640891576956012808)) AS series_id,
             unit AS u, mapSort(labels) AS l, ts AS t FROM {db}.metrics_ingest_local)
GROUP BY metric, series_id
;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.histogram_points_mv ON CLUSTER '{cluster}'
TO {db}.histogram_points_local AS
SELECT resolution, ts, region, cluster, node, metric,
       arrayFold((acc, k, v) -> bitXor(bitXor(acc, reinterpretAsUInt64(MD5(k))) * 11400714819323198485, reinterpretAsUInt64(MD5(v))) * 11400714819323198485, mapKeys(mapSort(labels)), mapValues(mapSort(labels)), toUInt64(7640891576956012808)) AS series_id,
       scale, count, sum, zero_count, bucket_index, bucket_count
FROM {db}.histograms_ingest_local
;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.histogram_series_mv ON CLUSTER '{cluster}'
TO {db}.series AS
SELECT metric, series_id, any(u) AS unit, any(l) AS labels, max(t) AS last_seen
FROM (SELECT metric, arrayFold((acc, k, v) -> bitXor(bitXor(acc, reinterpretAsUInt64(MD5(k))) * 11400714819323198485, reinterpretAsUInt64(MD5(v))) * 11400714819323198485, mapKeys(mapSort(labels)), mapValues(mapSort(labels)), toUInt64(7640891576956012808)) AS series_id,
             unit AS u, mapSort(labels) AS l, ts AS t FROM {db}.histograms_ingest_local)
GROUP BY metric, series_id
;

-- What readers query: the columns of the tables of 0001/0004. LEFT ANY JOIN: a
-- series is written before (regional) or with (ingest views) its points and
-- outlives them (TTL 401 days after it was last sent, and the regional sends
-- it again every few hours while it has points); copies of one series hold the
-- same labels, so any one will do. Filters on metric reach both sides.
CREATE VIEW IF NOT EXISTS {db}.metrics ON CLUSTER '{cluster}' AS
SELECT
    p.resolution AS resolution, p.ts AS ts, p.region AS region, p.cluster AS cluster, p.node AS node,
    p.metric AS metric, p.kind AS kind, s.unit AS unit, s.labels AS labels, p.series_id AS series_id,
    p.value AS value, p.gauge AS gauge
FROM {db}.metric_points AS p
GLOBAL LEFT ANY JOIN {db}.series AS s ON s.metric = p.metric AND s.series_id = p.series_id
;

CREATE VIEW IF NOT EXISTS {db}.histograms ON CLUSTER '{cluster}' AS
SELECT
    p.resolution AS resolution, p.ts AS ts, p.region AS region, p.cluster AS cluster, p.node AS node,
    p.metric AS metric, s.unit AS unit, s.labels AS labels, p.series_id AS series_id, p.scale AS scale,
    p.count AS count, p.sum AS sum, p.zero_count AS zero_count, p.bucket_index AS bucket_index,
    p.bucket_count AS bucket_count, (p.bucket_index, p.bucket_count) AS buckets
FROM {db}.histogram_points AS p
GLOBAL LEFT ANY JOIN {db}.series AS s ON s.metric = p.metric AND s.series_id = p.series_id
;

CREATE VIEW IF NOT EXISTS {db}.metrics_1h ON CLUSTER '{cluster}' AS
SELECT
    p.ts AS ts, p.region AS region, p.cluster AS cluster, p.node AS node, p.metric AS metric,
    p.kind AS kind, p.series_id AS series_id, s.labels AS labels, s.unit AS unit, p.value AS value,
    p.gauge_sum AS gauge_sum, p.gauge_min AS gauge_min, p.gauge_max AS gauge_max, p.rows AS rows
FROM {db}.metric_points_1h AS p
GLOBAL LEFT ANY JOIN {db}.series AS s ON s.metric = p.metric AND s.series_id = p.series_id
;

CREATE VIEW IF NOT EXISTS {db}.histograms_1h ON CLUSTER '{cluster}' AS
SELECT
    p.ts AS ts, p.region AS region, p.cluster AS cluster, p.node AS node, p.metric AS metric,
    p.series_id AS series_id, s.labels AS labels, s.unit AS unit, p.count AS count, p.sum AS sum,
    p.zero_count AS zero_count, p.buckets AS buckets
FROM {db}.histogram_points_1h AS p
GLOBAL LEFT ANY JOIN {db}.series AS s ON s.metric = p.metric AND s.series_id = p.series_id
;
