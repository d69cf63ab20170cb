-- 0002_profiles.sql of deploy/clickhouse/migrations rendered for the cluster '{cluster}'.
-- Generated: stratoscope schema render --cluster '{cluster}' (do not edit; docs/CLICKHOUSE.md).

-- CPU profiles. A stack is stored once, keyed by stack_id (a 64-bit hash of
-- its frames, see regional/sinks/clickhouse.py:stack_id); frames are leaf
-- first. Samples reference kernel and user stacks by id (0 = none). A flame
-- graph for any node / process / time range is one query joining the two
-- (regional.sinks.clickhouse.folded_stacks_sql, deploy/clickhouse/queries/).
--
-- The sink re-sends a stack at least every few hours while it is in use, so
-- last_seen moves forward and the TTL only removes stacks nobody samples.
CREATE TABLE IF NOT EXISTS {db}.profile_stacks_local ON CLUSTER '{cluster}'
(
    stack_id   UInt64,
    frames     Array(String) CODEC(ZSTD(3)),
    last_seen  DateTime('UTC')
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}', last_seen)
ORDER BY stack_id
TTL last_seen + INTERVAL 30 DAY
SETTINGS replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800
;

CREATE TABLE IF NOT EXISTS {db}.profile_stacks ON CLUSTER '{cluster}' AS {db}.profile_stacks_local
ENGINE = Distributed('{cluster}', '{db}', 'profile_stacks_local', stack_id)
;

CREATE TABLE IF NOT EXISTS {db}.profile_samples_local ON CLUSTER '{cluster}'
(
    resolution       UInt32 CODEC(ZSTD(1)),
    ts               DateTime('UTC') CODEC(DoubleDelta, ZSTD(1)),
    region           LowCardinality(String),
    cluster          LowCardinality(String),
    node             LowCardinality(String),
    profile          LowCardinality(String),
    period_ns        UInt64 CODEC(ZSTD(1)),
    pid              UInt32 CODEC(ZSTD(1)),
    comm             LowCardinality(String),
    cgroup           LowCardinality(String),
    kernel_stack_id  UInt64 CODEC(ZSTD(1)),
    user_stack_id    UInt64 CODEC(ZSTD(1)),
    samples          UInt64 CODEC(T64, ZSTD(1))
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY toDate(ts)
ORDER BY (profile, node, comm, pid, ts)
TTL ts + INTERVAL 14 DAY
SETTINGS replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800, ttl_only_drop_parts = 1
;

CREATE TABLE IF NOT EXISTS {db}.profile_samples ON CLUSTER '{cluster}' AS {db}.profile_samples_local
ENGINE = Distributed('{cluster}', '{db}', 'profile_samples_local', cityHash64(node))
;
