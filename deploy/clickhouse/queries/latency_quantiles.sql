-- p50 / p99 (upper bound of the scale-0 bucket holding the quantile), sample
-- count and mean of one histogram metric per value of one label, over a time
-- range, for one node ('' = the roll-up across nodes).
-- Parameters: metric, label, node, start / end (Unix seconds, end exclusive).
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
    sum(sum) / greatest(sum(count), 1) AS mean
FROM histograms
WHERE metric = {metric:String}
  AND node = {node:String}
  AND ts >= toDateTime({start:Int64}, 'UTC') AND ts < toDateTime({end:Int64}, 'UTC')
GROUP BY label_value
ORDER BY label_value
