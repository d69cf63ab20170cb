-- Folded stacks for one flame graph: one row per distinct stack, heaviest first.
--
-- A stack is comm;user frames root..leaf;kernel frames root..leaf, kernel
-- frames with the suffix _[k] (flamegraph.pl's convention). cpu_time is the
-- samples times the sampling period.
--
-- param: node String = ''    one node; '' = every node
-- param: pid UInt32 = 0      one process; 0 = every process
-- param: comm String = ''    one process name; '' = every process
-- param: start Int64         windows starting at or after (Unix seconds)
-- param: end Int64           windows starting before (Unix seconds)
-- column: stack text
-- column: samples count
-- column: cpu_time ns
SELECT
    arrayStringConcat(arrayConcat(
        [toString(s.comm)],
        arrayReverse(us.frames),
        arrayMap(f -> concat(f, '_[k]'), arrayReverse(ks.frames))
    ), ';') AS stack,
    sum(s.n) AS samples,
    sum(s.cpu) AS cpu_time
FROM
(
    SELECT comm, kernel_stack_id, user_stack_id, sum(samples) AS n, sum(samples * period_ns) AS cpu
    FROM profile_samples
    WHERE profile = 'cpu'
      AND ({node:String} = '' OR node = {node:String})
      AND ({pid:UInt32} = 0 OR pid = {pid:UInt32})
      AND ({comm:String} = '' OR comm = {comm:String})
      AND ts >= toDateTime({start:Int64}, 'UTC') AND ts < toDateTime({end:Int64}, 'UTC')
    GROUP BY comm, kernel_stack_id, user_stack_id
) AS s
LEFT JOIN (SELECT stack_id, any(frames) AS frames FROM profile_stacks GROUP BY stack_id) AS ks
    ON s.kernel_stack_id = ks.stack_id
LEFT JOIN (SELECT stack_id, any(frames) AS frames FROM profile_stacks GROUP BY stack_id) AS us
    ON s.user_stack_id = us.stack_id
GROUP BY stack
ORDER BY samples DESC, stack
SETTINGS join_use_nulls = 0
