-- Process events on a node, newest first.
--
-- Execs (detail: the file run), exits (code: the exit code; -1: killed by a
-- signal), forks, OOM kills.
--
-- The process program sends them through a rate-limited ring buffer: a busy
-- node keeps the counts exact (what_ran) but not every event (fleet_health
-- shows the events lost).
--
-- param: node String = ''    one node; '' = every node
-- param: comm String = ''    one process name; '' = every process
-- param: kind String = ''    exec, exit, fork or oom; '' = every kind
-- param: start Int64         events at or after (Unix seconds)
-- param: end Int64           events before (Unix seconds)
-- param: limit UInt32 = 50   rows
-- column: time timestamp
-- column: node text
-- column: kind text
-- column: pid number
-- column: ppid number
-- column: comm text
-- column: detail text
-- column: code number
SELECT ts AS time, node, kind, pid, ppid, comm, detail, code
FROM events
WHERE ({node:String} = '' OR node = {node:String})
  AND ({comm:String} = '' OR comm = {comm:String})
  AND ({kind:String} = '' OR kind = {kind:String})
  AND ts >= toDateTime64({start:Int64}, 9, 'UTC') AND ts < toDateTime64({end:Int64}, 9, 'UTC')
ORDER BY ts DESC, node, pid
LIMIT {limit:UInt32}
