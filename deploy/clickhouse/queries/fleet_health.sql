-- Fleet health: per node, how far behind its data is and what went missing.
--
-- Per node: the newest window stored, how far behind it is, windows without any
-- of its points between its first and newest (the node or its edge down, batches
-- lost; also an edge whose drain stalled past a whole window: its next batch
-- covers both and lands in one), and process events its edge could not send
-- (ring buffer full or rate-limited).
--
-- behind = now - the end of the newest window stored: about one resolution plus
-- the regional's lateness on a healthy node.
--
-- param: node String = ''    one node; '' = every node
-- param: start Int64         windows starting at or after (Unix seconds)
-- param: end Int64           windows starting before (Unix seconds)
-- param: limit UInt32 = 100  rows
-- column: node text
-- column: newest_window timestamp
-- column: behind s
-- column: windows count
-- column: missing count
-- column: events_lost count
SELECT
    node,
    max(ts) AS newest_window,
    toUnixTimestamp(now()) - (toUnixTimestamp(max(ts)) + max(resolution)) AS behind,
    uniqExact(ts) AS windows,
    toUInt64(greatest(0, intDiv(toInt64(toUnixTimestamp(max(ts))) - toUnixTimestamp(min(ts)),
                                greatest(1, max(resolution))) + 1 - uniqExact(ts))) AS missing,
    sumIf(value, metric = 'stratoscope_events_lost') AS events_lost
FROM metric_points
WHERE node != ''
  AND ({node:String} = '' OR node = {node:String})
  AND ts >= toDateTime({start:Int64}, 'UTC') AND ts < toDateTime({end:Int64}, 'UTC')
GROUP BY node
ORDER BY behind DESC, missing DESC, node
LIMIT {limit:UInt32}
