-- Cluster variant of migrations/0005_sorted_labels.sql (see there): label maps
-- arrive sorted by key, so series_id and the hourly views drop mapSort().
ALTER TABLE {db}.metrics_local ON CLUSTER '{cluster}'
MODIFY COLUMN series_id UInt64 MATERIALIZED cityHash64(labels)
;

ALTER TABLE {db}.histograms_local ON CLUSTER '{cluster}'
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
