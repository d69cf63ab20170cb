-- Folded stacks for one flame graph: one row per distinct stack, heaviest first.
-- Parameters: node ('' = all nodes), pid (0 = all processes), start / end
-- (Unix seconds, end exclusive). Kernel frames get the suffix _[k].
SELECT
    arrayStringConcat(arrayConcat(
        [toString(s.comm)],
        arrayReverse(us.frames),
        arrayMap(f -> concat(f, '_[k]'), arrayReverse(ks.frames))
    ), ';') AS folded,
    sum(s.n) AS samples
FROM
(
    SELECT comm, kernel_stack_id, user_stack_id, sum(samples) AS n
    FROM profile_samples
    WHERE profile = 'cpu'
      AND ({node:String} = '' OR node = {node:String})
      AND ({pid:UInt32} = 0 OR pid = {pid:UInt32})
      AND ts >= toDateTime({start:Int64}, 'UTC') AND ts < toDateTime({end:Int64}, 'UTC')
    GROUP BY comm, kernel_stack_id, user_stack_id
) AS s
LEFT JOIN (SELECT stack_id, any(frames) AS frames FROM profile_stacks GROUP BY stack_id) AS ks
    ON s.kernel_stack_id = ks.stack_id
LEFT JOIN (SELECT stack_id, any(frames) AS frames FROM profile_stacks GROUP BY stack_id) AS us
    ON s.user_stack_id = us.stack_id
GROUP BY folded
ORDER BY samples DESC, folded
SETTINGS join_use_nulls = 0
