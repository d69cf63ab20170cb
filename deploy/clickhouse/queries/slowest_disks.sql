-- Slowest disks: block I/O latency per node, device and operation, with bytes moved.
--
-- Quantiles are the upper bound of the log2 bucket holding them.
--
-- param: node String = ''    one node; '' = every node
-- param: start Int64         windows starting at or after (Unix seconds)
-- param: end Int64           windows starting before (Unix seconds)
-- param: limit UInt32 = 20   rows
-- column: node text
-- column: device text
-- column: op text
-- column: requests count
-- column: bytes bytes
-- column: p50 ns
-- column: p99 ns
-- column: mean ns
SELECT l.node AS node, l.device AS device, l.op AS op, l.requests AS requests, b.bytes AS bytes,
       l.p50 AS p50, l.p99 AS p99, l.mean AS mean
FROM
(
    WITH
        sumMap(h.hb) AS b,
        sum(h.hz) AS z,
        z + arraySum(b.2) AS total,
        arrayCumSum(b.2) AS cum
    SELECT
        h.node AS node, s.labels['device'] AS device, s.labels['op'] AS op,
        sum(h.hc) AS requests,
        if(total = 0, nan, if(z >= greatest(1, ceil(0.50 * total)), 0,
            pow(2, b.1[arrayFirstIndex(c -> z + c >= greatest(1, ceil(0.50 * total)), cum)] + 1))) AS p50,
        if(total = 0, nan, if(z >= greatest(1, ceil(0.99 * total)), 0,
            pow(2, b.1[arrayFirstIndex(c -> z + c >= greatest(1, ceil(0.99 * total)), cum)] + 1))) AS p99,
        sum(h.hs) / greatest(sum(h.hc), 1) AS mean
    FROM
    (
        SELECT node, series_id, sumMap(bucket_index, bucket_count) AS hb, sum(zero_count) AS hz,
               sum(count) AS hc, sum(sum) AS hs
        FROM histogram_points
        WHERE metric = 'block_latency'
          AND if({node:String} = '', node != '', node = {node:String})
          AND ts >= toDateTime({start:Int64}, 'UTC') AND ts < toDateTime({end:Int64}, 'UTC')
        GROUP BY node, series_id
    ) AS h
    LEFT ANY JOIN (SELECT series_id, labels FROM series WHERE metric = 'block_latency') AS s
        ON s.series_id = h.series_id
    GROUP BY node, device, op
) AS l
LEFT JOIN
(
    SELECT p.node AS node, s.labels['device'] AS device, s.labels['op'] AS op, sum(p.v) AS bytes
    FROM
    (
        SELECT node, series_id, sum(value) AS v
        FROM metric_points
        WHERE metric = 'block_bytes_total'
          AND if({node:String} = '', node != '', node = {node:String})
          AND ts >= toDateTime({start:Int64}, 'UTC') AND ts < toDateTime({end:Int64}, 'UTC')
        GROUP BY node, series_id
    ) AS p
    LEFT ANY JOIN (SELECT series_id, labels FROM series WHERE metric = 'block_bytes_total') AS s
        ON s.series_id = p.series_id
    GROUP BY node, device, op
) AS b ON b.node = l.node AND b.device = l.device AND b.op = l.op
ORDER BY p99 DESC, requests DESC, node, device, op
LIMIT {limit:UInt32}
SETTINGS join_use_nulls = 0
