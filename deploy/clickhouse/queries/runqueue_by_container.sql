-- Run-queue latency by container: how long runnable tasks waited for a CPU.
--
-- The container is the task's cgroup (its path, as the edge resolved it).
-- Quantiles are the upper bound of the log2 bucket holding them.
--
-- param: node String = ''    one node; '' = every node
-- param: start Int64         windows starting at or after (Unix seconds)
-- param: end Int64           windows starting before (Unix seconds)
-- param: limit UInt32 = 20   rows
-- column: container text
-- column: wakeups count
-- column: p50 ns
-- column: p99 ns
-- column: mean ns
WITH
    sumMap(h.hb) AS b,
    sum(h.hz) AS z,
    z + arraySum(b.2) AS total,
    arrayCumSum(b.2) AS cum
SELECT
    s.labels['cgroup'] AS container,
    sum(h.hc) AS wakeups,
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
    WHERE metric = 'sched_runqueue_latency'
      AND if({node:String} = '', node != '', node = {node:String})
      AND ts >= toDateTime({start:Int64}, 'UTC') AND ts < toDateTime({end:Int64}, 'UTC')
    GROUP BY series_id
) AS h
LEFT ANY JOIN (SELECT series_id, labels FROM series WHERE metric = 'sched_runqueue_latency') AS s
    ON s.series_id = h.series_id
GROUP BY container
ORDER BY p99 DESC, wakeups DESC, container
LIMIT {limit:UInt32}
