-- 0001_metrics_histograms.sql of deploy/clickhouse/migrations rendered for the cluster '{cluster}'.
-- Generated: stratoscope schema render --cluster '{cluster}' (do not edit; docs/CLICKHOUSE.md).

-- Raw metric and histogram rows at the regional's output resolution.
--
-- Identity of a series: (metric, node, labels). `series_id` is a hash of the
-- label map with its keys sorted, computed by the server, so the sort key is
-- metric -> region/cluster/node -> series -> time on every ClickHouse version
-- (Map columns are not sortable before 24.x).
--
-- Rows are ADDITIVE: a late partial window arrives as one more row for the
-- same (series, ts) and readers SUM. Never rely on a row being replaced.
-- node = '' is a roll-up across the nodes of the regional.
CREATE TABLE IF NOT EXISTS {db}.metrics_local ON CLUSTER '{cluster}'
(
    resolution  UInt32 CODEC(ZSTD(1)),
    ts          DateTime('UTC') CODEC(DoubleDelta, ZSTD(1)),
    region      LowCardinality(String),
    cluster     LowCardinality(String),
    node        LowCardinality(String),
    metric      LowCardinality(String),
    kind        Enum8('counter' = 1, 'gauge' = 2),
    unit        LowCardinality(String),
    labels      Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    series_id   UInt64 MATERIALIZED cityHash64(mapSort(labels)),
    value       UInt64 CODEC(T64, ZSTD(1)),
    gauge       Float64 CODEC(Gorilla, ZSTD(1))
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY (resolution, toDate(ts))
ORDER BY (metric, kind, region, cluster, node, series_id, resolution, ts)
TTL ts + toIntervalDay(if(resolution < 60, 7, 35))
SETTINGS replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800, ttl_only_drop_parts = 1
;

CREATE TABLE IF NOT EXISTS {db}.metrics ON CLUSTER '{cluster}' AS {db}.metrics_local
ENGINE = Distributed('{cluster}', '{db}', 'metrics_local', cityHash64(node))
;

-- OpenTelemetry exponential histograms at scale 0, sparse: bucket i counts
-- values v with 2^i < v <= 2^(i+1); v = 0 is in zero_count. Merge with
-- sumMap(bucket_index, bucket_count) (or sumMap(buckets)).
CREATE TABLE IF NOT EXISTS {db}.histograms_local ON CLUSTER '{cluster}'
(
    resolution    UInt32 CODEC(ZSTD(1)),
    ts            DateTime('UTC') CODEC(DoubleDelta, ZSTD(1)),
    region        LowCardinality(String),
    cluster       LowCardinality(String),
    node          LowCardinality(String),
    metric        LowCardinality(String),
    unit          LowCardinality(String),
    labels        Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    series_id     UInt64 MATERIALIZED cityHash64(mapSort(labels)),
    scale         Int8 DEFAULT 0,
    count         UInt64 CODEC(T64, ZSTD(1)),
    sum           UInt64 CODEC(T64, ZSTD(1)),
    zero_count    UInt64 CODEC(T64, ZSTD(1)),
    bucket_index  Array(Int16) CODEC(ZSTD(1)),
    bucket_count  Array(UInt64) CODEC(ZSTD(1)),
    buckets       Tuple(Array(Int16), Array(UInt64)) ALIAS (bucket_index, bucket_count)
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY (resolution, toDate(ts))
ORDER BY (metric, region, cluster, node, series_id, resolution, ts)
TTL ts + toIntervalDay(if(resolution < 60, 7, 35))
SETTINGS replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800, ttl_only_drop_parts = 1
;

CREATE TABLE IF NOT EXISTS {db}.histograms ON CLUSTER '{cluster}' AS {db}.histograms_local
ENGINE = Distributed('{cluster}', '{db}', 'histograms_local', cityHash64(node))
;

-- The full static labels of every node (and of the regional, for node = ''),
-- one row per delivered block; the newest wins.
CREATE TABLE IF NOT EXISTS {db}.nodes_local ON CLUSTER '{cluster}'
(
    node         String,
    region       LowCardinality(String),
    cluster      LowCardinality(String),
    node_labels  Map(LowCardinality(String), String),
    last_seen    DateTime('UTC')
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}', last_seen)
ORDER BY node
TTL last_seen + INTERVAL 90 DAY
SETTINGS replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800
;

CREATE TABLE IF NOT EXISTS {db}.nodes ON CLUSTER '{cluster}' AS {db}.nodes_local
ENGINE = Distributed('{cluster}', '{db}', 'nodes_local', cityHash64(node))
;
