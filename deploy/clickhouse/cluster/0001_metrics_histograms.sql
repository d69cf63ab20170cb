-- Cluster variant of ../migrations/0001_metrics_histograms.sql.
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
SETTINGS replicated_deduplication_window = 10000, ttl_only_drop_parts = 1
;

CREATE TABLE IF NOT EXISTS {db}.metrics ON CLUSTER '{cluster}' AS {db}.metrics_local
ENGINE = Distributed('{cluster}', '{db}', 'metrics_local', cityHash64(node))
;

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
SETTINGS replicated_deduplication_window = 10000, ttl_only_drop_parts = 1
;

CREATE TABLE IF NOT EXISTS {db}.histograms ON CLUSTER '{cluster}' AS {db}.histograms_local
ENGINE = Distributed('{cluster}', '{db}', 'histograms_local', cityHash64(node))
;

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
SETTINGS replicated_deduplication_window = 10000
;

CREATE TABLE IF NOT EXISTS {db}.nodes ON CLUSTER '{cluster}' AS {db}.nodes_local
ENGINE = Distributed('{cluster}', '{db}', 'nodes_local', cityHash64(node))
;
