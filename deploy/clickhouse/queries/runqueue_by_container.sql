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
    sumMap(bucket_index, bucket_count) AS b,
    sum(zero_count) AS z,
    z + arraySum(b.2) AS total,
    arrayCumSum(b.2) AS cum
SELECT
    labels['cgroup'] AS container,
    sum(count) AS wakeups,
    if(total = 0, nan, if(z >= greatest(1, ceil(0.50 * total)), 0,
        pow(2, b.1[arrayFirstIndex(c -> z + c >= greatest(1, ceil(0.50 * total)), cum)] + 1))) AS p50,
    if(total = 0, nan, if(z >= greatest(1, ceil(0.99 * total)), 0,
        pow(2, b.1[arrayFirstIndex(c -> z + c >= greatest(1, ceil(0.99 * total)), cum)] + 1))) AS p99,
    sum(sum) / greatest(sum(count), 1) AS mean
FROM histograms
WHERE metric = 'sched_runqueue_latency'
  AND if({node:String} = '', node != '', node = {node:String})
  AND ts >= toDateTime({start:Int64}, 'UTC') AND ts < toDateTime({end:Int64}, 'UTC')
GROUP BY container
ORDER BY p99 DESC, wakeups DESC, container
LIMIT {limit:UInt32}
