-- A counter per hour and value of one label, from the hourly roll-up.
-- Parameters: metric, label, node ('' = the roll-up across nodes), start / end
-- (Unix seconds, end exclusive).
SELECT
    ts AS hour,
    labels[{label:String}] AS label_value,
    sum(value) AS total,
    sum(value) / 3600 AS per_second
FROM metrics_1h
WHERE metric = {metric:String}
  AND kind = 'counter'
  AND node = {node:String}
  AND ts >= toDateTime({start:Int64}, 'UTC') AND ts < toDateTime({end:Int64}, 'UTC')
GROUP BY hour, label_value
ORDER BY hour, label_value
