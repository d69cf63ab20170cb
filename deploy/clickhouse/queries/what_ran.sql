-- What ran on a node: per process name, CPU time, system calls, execs and exits.
--
-- param: node String = ''    one node; '' = every node
-- param: start Int64         windows starting at or after (Unix seconds)
-- param: end Int64           windows starting before (Unix seconds)
-- param: limit UInt32 = 30   rows
-- column: comm text
-- column: cpu_time ns
-- column: syscalls count
-- column: execs count
-- column: exits count
-- column: preempted count
SELECT
    s.labels['comm'] AS comm,
    sumIf(p.v, p.metric = 'sched_oncpu_ns_total') AS cpu_time,
    sumIf(p.v, p.metric = 'syscalls_total') AS syscalls,
    sumIf(p.v, p.metric = 'process_events_total' AND s.labels['event'] = 'exec') AS execs,
    sumIf(p.v, p.metric = 'process_events_total' AND s.labels['event'] = 'exit') AS exits,
    sumIf(p.v, p.metric = 'sched_involuntary_switches_total') AS preempted
FROM
(
    SELECT metric, series_id, sum(value) AS v
    FROM metric_points
    WHERE metric IN ('sched_oncpu_ns_total', 'syscalls_total', 'process_events_total',
                     'sched_involuntary_switches_total')
      AND if({node:String} = '', node != '', node = {node:String})
      AND ts >= toDateTime({start:Int64}, 'UTC') AND ts < toDateTime({end:Int64}, 'UTC')
    GROUP BY metric, series_id
) AS p
LEFT ANY JOIN series AS s ON s.metric = p.metric AND s.series_id = p.series_id
GROUP BY comm
ORDER BY cpu_time DESC, syscalls DESC, comm
LIMIT {limit:UInt32}
