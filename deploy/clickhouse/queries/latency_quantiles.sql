-- p50 / p99, count and mean of any histogram metric per value of one label.
--
-- p50 / p99 are the upper bound of the scale-0 bucket holding the quantile;
-- over a time range, for one node or every node summed. The roll-ups across
-- nodes keep only the labels their program declares, so this reads node rows.
--
-- param: metric String       a histogram metric, e.g. syscall_latency
-- param: label String        the label to group by, e.g. syscall
-- param: node String = ''    one node; '' = every node (their sum, not the roll-up)
-- param: start Int64         windows starting at or after (Unix seconds)
-- param: end Int64           windows starting before (Unix seconds)
-- column: label_value text
-- column: p50 @unit
-- column: p99 @unit
-- column: samples count
-- column: mean @unit
-- column: unit text
WITH
    sumMap(bucket_index, bucket_count) AS b,
    sum(zero_count) AS z,
    z + arraySum(b.2) AS total,
    arrayCumSum(b.2) AS cum
SELECT
    labels[{label:String}] AS label_value,
    if(total = 0, nan, if(z >= greatest(1, ceil(0.50 * total)), 0,
        pow(2, b.1[arrayFirstIndex(c -> z + c >= greatest(1, ceil(0.50 * total)), cum)] + 1))) AS p50,
    if(total = 0, nan, if(z >= greatest(1, ceil(0.99 * total)), 0,
        pow(2, b.1[arrayFirstIndex(c -> z + c >= greatest(1, ceil(0.99 * total)), cum)] + 1))) AS p99,
    sum(count) AS samples,
    sum(sum) / greatest(sum(count), 1) AS mean,
    any(unit) AS unit
FROM histograms
WHERE metric = {metric:String}
  AND if({node:String} = '', node != '', node = {node:String})
  AND ts >= toDateTime({start:Int64}, 'UTC') AND ts < toDateTime({end:Int64}, 'UTC')
GROUP BY label_value
ORDER BY label_value
