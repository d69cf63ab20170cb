-- 0003_events.sql of deploy/clickhouse/migrations rendered for the cluster '{cluster}'.
-- Generated: stratoscope schema render --cluster '{cluster}' (do not edit; docs/CLICKHOUSE.md).

-- Rare process events (exec, exit, fork, oom), one row each, nanosecond time.
CREATE TABLE IF NOT EXISTS {db}.events_local ON CLUSTER '{cluster}'
(
    ts       DateTime64(9, 'UTC') CODEC(Delta, ZSTD(1)),
    region   LowCardinality(String),
    cluster  LowCardinality(String),
    node     LowCardinality(String),
    kind     LowCardinality(String),
    pid      UInt32 CODEC(ZSTD(1)),
    ppid     UInt32 CODEC(ZSTD(1)),
    comm     LowCardinality(String),
    cgroup   LowCardinality(String),
    detail   String CODEC(ZSTD(1)),
    code     Int64 CODEC(ZSTD(1))
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY toDate(ts)
ORDER BY (node, kind, ts)
TTL toDateTime(ts) + INTERVAL 30 DAY
SETTINGS replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800, ttl_only_drop_parts = 1
;

CREATE TABLE IF NOT EXISTS {db}.events ON CLUSTER '{cluster}' AS {db}.events_local
ENGINE = Distributed('{cluster}', '{db}', 'events_local', cityHash64(node))
;
