-- 0004_hourly_rollups.sql of deploy/clickhouse/migrations rendered for the cluster '{cluster}'.
-- Generated: stratoscope schema render --cluster '{cluster}' (do not edit; docs/CLICKHOUSE.md).

-- Hourly roll-ups, fed by materialized views on every insert into the raw
-- tables, kept ~13 months (raw tables: 7 / 35 days).
--
-- AggregatingMergeTree with SimpleAggregateFunction columns. The views do not
-- GROUP BY: they only move each row to its hour (a raw insert holds about one
-- row per series and window, so grouping on insert buys little and costs x2-x3
-- insert time); background merges collapse the rows of one series and hour.
-- Readers must always aggregate (sum(value), sumMap(buckets), min(gauge_min),
-- ...) because merges are never guaranteed to have happened.
--
-- labels is part of the sorting key (after series_id, which decides the order
-- in practice): aggregate states of Map columns (any(labels)) are several
-- times slower to insert and merge.
--
-- Deduplication: the views inherit the insert's insert_deduplication_token
-- (deduplicate_blocks_in_dependent_materialized_views = 1), so a retried insert
-- is dropped here too. Insert with optimize_on_insert = 0 (the sink does): the
-- merge-on-insert of the target is slow on Map columns and useless here.
--
-- Every raw row is rolled up whatever its resolution: write ONE raw resolution
-- per database (the regional's output resolution), or the hour double counts.
CREATE TABLE IF NOT EXISTS {db}.metrics_1h_local ON CLUSTER '{cluster}'
(
    ts         DateTime('UTC') CODEC(DoubleDelta, ZSTD(1)),
    region     LowCardinality(String),
    cluster    LowCardinality(String),
    node       LowCardinality(String),
    metric     LowCardinality(String),
    kind       Enum8('counter' = 1, 'gauge' = 2),
    series_id  UInt64,
    labels     Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    unit       SimpleAggregateFunction(any, String),
    value      SimpleAggregateFunction(sum, UInt64) CODEC(T64, ZSTD(1)),
    gauge_sum  SimpleAggregateFunction(sum, Float64),
    gauge_min  SimpleAggregateFunction(min, Float64),
    gauge_max  SimpleAggregateFunction(max, Float64),
    rows       SimpleAggregateFunction(sum, UInt64)
)
ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY toYYYYMM(ts)
ORDER BY (metric, kind, region, cluster, node, series_id, ts, labels)
TTL ts + INTERVAL 400 DAY
SETTINGS replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800
;

CREATE TABLE IF NOT EXISTS {db}.metrics_1h ON CLUSTER '{cluster}' AS {db}.metrics_1h_local
ENGINE = Distributed('{cluster}', '{db}', 'metrics_1h_local', cityHash64(node))
;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.metrics_1h_mv ON CLUSTER '{cluster}'
TO {db}.metrics_1h_local AS
SELECT
    toStartOfHour(ts) AS ts,
    region, cluster, node, metric, kind, series_id, mapSort(labels) AS labels,
    unit,
    value,
    gauge AS gauge_sum,
    gauge AS gauge_min,
    gauge AS gauge_max,
    toUInt64(1) AS rows
FROM {db}.metrics_local
;

CREATE TABLE IF NOT EXISTS {db}.histograms_1h_local ON CLUSTER '{cluster}'
(
    ts          DateTime('UTC') CODEC(DoubleDelta, ZSTD(1)),
    region      LowCardinality(String),
    cluster     LowCardinality(String),
    node        LowCardinality(String),
    metric      LowCardinality(String),
    series_id   UInt64,
    labels      Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    unit        SimpleAggregateFunction(any, String),
    count       SimpleAggregateFunction(sum, UInt64),
    sum         SimpleAggregateFunction(sum, UInt64),
    zero_count  SimpleAggregateFunction(sum, UInt64),
    buckets     SimpleAggregateFunction(sumMap, Tuple(Array(Int16), Array(UInt64))) CODEC(ZSTD(1))
)
ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY toYYYYMM(ts)
ORDER BY (metric, region, cluster, node, series_id, ts, labels)
TTL ts + INTERVAL 400 DAY
SETTINGS replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800
;

CREATE TABLE IF NOT EXISTS {db}.histograms_1h ON CLUSTER '{cluster}' AS {db}.histograms_1h_local
ENGINE = Distributed('{cluster}', '{db}', 'histograms_1h_local', cityHash64(node))
;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.histograms_1h_mv ON CLUSTER '{cluster}'
TO {db}.histograms_1h_local AS
SELECT
    toStartOfHour(ts) AS ts,
    region, cluster, node, metric, series_id, mapSort(labels) AS labels,
    unit,
    count,
    sum,
    zero_count,
    (bucket_index, bucket_count) AS buckets
FROM {db}.histograms_local
;
