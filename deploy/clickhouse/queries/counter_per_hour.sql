-- A counter per hour and value of one label, from the hourly table (metrics_1h).
--
-- Every node summed unless one is given: the roll-up rows across nodes keep
-- only the labels their program declares, so they are not read here.
--
-- param: metric String       a counter metric, e.g. syscalls_total
-- param: label String        the label to group by, e.g. comm
-- param: node String = ''    one node; '' = every node (their sum, not the roll-up)
-- param: start Int64         from (Unix seconds): the hour holding it is included
-- param: end Int64           hours starting before (Unix seconds)
-- column: hour timestamp
-- column: label_value text
-- column: total @unit
-- column: per_second number
-- column: unit text
SELECT
    ts AS hour,
    labels[{label:String}] AS label_value,
    sum(value) AS total,
    sum(value) / 3600 AS per_second,
    any(unit) AS unit
FROM metrics_1h
WHERE metric = {metric:String}
  AND kind = 'counter'
  AND if({node:String} = '', node != '', node = {node:String})
  AND ts >= toStartOfHour(toDateTime({start:Int64}, 'UTC')) AND ts < toDateTime({end:Int64}, 'UTC')
GROUP BY hour, label_value
ORDER BY hour, label_value
