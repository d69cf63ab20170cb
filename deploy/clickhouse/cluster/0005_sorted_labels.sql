-- 0005_sorted_labels.sql of deploy/clickhouse/migrations rendered for the cluster '{cluster}'.
-- Generated: stratoscope schema render --cluster '{cluster}' (do not edit; docs/CLICKHOUSE.md).

-- Label maps arrive sorted by key: the regional writes them that way (the
-- ClickHouse sink sorts each family's label keys once per window). Computing
-- mapSort(labels) for every row -- in series_id and in the hourly views -- was
-- the largest single cost of an insert: with chdb, metrics rows went from
-- ~290k to ~500k rows/s without it (loadtest/regional_throughput.py, parts).
--
-- series_id keeps its values: cityHash64 of a sorted map is what
-- cityHash64(mapSort(labels)) computed before. Writers other than the
-- regional must sort label keys too, or their series get other ids.
ALTER TABLE {db}.metrics_local ON CLUSTER '{cluster}'
MODIFY COLUMN series_id UInt64 MATERIALIZED cityHash64(labels)
;

ALTER TABLE {db}.metrics ON CLUSTER '{cluster}'
MODIFY COLUMN series_id UInt64 MATERIALIZED cityHash64(labels)
;

ALTER TABLE {db}.histograms_local ON CLUSTER '{cluster}'
MODIFY COLUMN series_id UInt64 MATERIALIZED cityHash64(labels)
;

ALTER TABLE {db}.histograms ON CLUSTER '{cluster}'
MODIFY COLUMN series_id UInt64 MATERIALIZED cityHash64(labels)
;

DROP VIEW IF EXISTS {db}.metrics_1h_mv ON CLUSTER '{cluster}'
;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.metrics_1h_mv ON CLUSTER '{cluster}'
TO {db}.metrics_1h_local AS
SELECT
    toStartOfHour(ts) AS ts,
    region, cluster, node, metric, kind, series_id, labels,
    unit,
    value,
    gauge AS gauge_sum,
    gauge AS gauge_min,
    gauge AS gauge_max,
    toUInt64(1) AS rows
FROM {db}.metrics_local
;

DROP VIEW IF EXISTS {db}.histograms_1h_mv ON CLUSTER '{cluster}'
;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.histograms_1h_mv ON CLUSTER '{cluster}'
TO {db}.histograms_1h_local AS
SELECT
    toStartOfHour(ts) AS ts,
    region, cluster, node, metric, series_id, labels,
    unit,
    count,
    sum,
    zero_count,
    (bucket_index, bucket_count) AS buckets
FROM {db}.histograms_local
;
