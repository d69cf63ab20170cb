-- Top system calls by p99 latency.
--
-- Latency quantiles are the upper bound of the log2 bucket holding them
-- (p99 = 2^(i+1) of the bucket with the ceil(0.99 * calls)-th call): "p99 is at
-- most this". Errors come from syscall_errors_total, every errno together.
--
-- param: node String = ''    one node; '' = every node (their sum, not the roll-up)
-- param: comm String = ''    one process name; '' = every process
-- param: start Int64         windows starting at or after (Unix seconds)
-- param: end Int64           windows starting before (Unix seconds)
-- param: limit UInt32 = 20   rows
-- column: syscall text
-- column: calls count
-- column: errors count
-- column: p50 ns
-- column: p99 ns
-- column: mean ns
SELECT l.syscall AS syscall, l.calls AS calls, e.errors AS errors, l.p50 AS p50, l.p99 AS p99,
       l.mean AS mean
FROM
(
    WITH
        sumMap(h.hb) AS b,
        sum(h.hz) AS z,
        z + arraySum(b.2) AS total,
        arrayCumSum(b.2) AS cum
    SELECT
        s.labels['syscall'] AS syscall,
        sum(h.hc) AS calls,
        if(total = 0, nan, if(z >= greatest(1, ceil(0.50 * total)), 0,
            pow(2, b.1[arrayFirstIndex(c -> z + c >= greatest(1, ceil(0.50 * total)), cum)] + 1))) AS p50,
        if(total = 0, nan, if(z >= greatest(1, ceil(0.99 * total)), 0,
            pow(2, b.1[arrayFirstIndex(c -> z + c >= greatest(1, ceil(0.99 * total)), cum)] + 1))) AS p99,
        sum(h.hs) / greatest(sum(h.hc), 1) AS mean
    FROM
    (
        SELECT series_id, sumMap(bucket_index, bucket_count) AS hb, sum(zero_count) AS hz,
               sum(count) AS hc, sum(sum) AS hs
        FROM histogram_points
        WHERE metric = 'syscall_latency'
          AND if({node:String} = '', node != '', node = {node:String})
          AND ts >= toDateTime({start:Int64}, 'UTC') AND ts < toDateTime({end:Int64}, 'UTC')
        GROUP BY series_id
    ) AS h
    LEFT ANY JOIN (SELECT series_id, labels FROM series WHERE metric = 'syscall_latency') AS s
        ON s.series_id = h.series_id
    WHERE {comm:String} = '' OR s.labels['comm'] = {comm:String}
    GROUP BY syscall
) AS l
LEFT JOIN
(
    SELECT s.labels['syscall'] AS syscall, sum(p.v) AS errors
    FROM
    (
        SELECT series_id, sum(value) AS v
        FROM metric_points
        WHERE metric = 'syscall_errors_total'
          AND if({node:String} = '', node != '', node = {node:String})
          AND ts >= toDateTime({start:Int64}, 'UTC') AND ts < toDateTime({end:Int64}, 'UTC')
        GROUP BY series_id
    ) AS p
    LEFT ANY JOIN (SELECT series_id, labels FROM series WHERE metric = 'syscall_errors_total') AS s
        ON s.series_id = p.series_id
    WHERE {comm:String} = '' OR s.labels['comm'] = {comm:String}
    GROUP BY syscall
) AS e ON e.syscall = l.syscall
ORDER BY p99 DESC, calls DESC, syscall
LIMIT {limit:UInt32}
SETTINGS join_use_nulls = 0
