-- Cluster variant of ../migrations/0003_events.sql.
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
SETTINGS replicated_deduplication_window = 10000, ttl_only_drop_parts = 1
;

CREATE TABLE IF NOT EXISTS {db}.events ON CLUSTER '{cluster}' AS {db}.events_local
ENGINE = Distributed('{cluster}', '{db}', 'events_local', cityHash64(node))
;
