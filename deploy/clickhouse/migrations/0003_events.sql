-- Rare process events (exec, exit, fork, oom), one row each, nanosecond time.
CREATE TABLE IF NOT EXISTS {db}.events
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
ENGINE = MergeTree
PARTITION BY toDate(ts)
ORDER BY (node, kind, ts)
TTL toDateTime(ts) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1
;
