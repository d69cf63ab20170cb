-- Nodes with the most TCP retransmits, beside their connection opens and resets.
--
-- A node with connections but no retransmit shows 0: every node that opened
-- or lost a connection in the range has a row.
--
-- param: node String = ''    one node; '' = every node
-- param: start Int64         windows starting at or after (Unix seconds)
-- param: end Int64           windows starting before (Unix seconds)
-- param: limit UInt32 = 20   rows
-- column: node text
-- column: retransmits count
-- column: opens count
-- column: resets count
-- column: per_1k_opens number
SELECT
    node,
    sumIf(value, metric = 'tcp_retransmits_total') AS retransmits,
    sumIf(value, metric = 'tcp_opens_total') AS opens,
    sumIf(value, metric IN ('tcp_resets_sent_total', 'tcp_resets_received_total')) AS resets,
    if(opens = 0, nan, 1000 * retransmits / opens) AS per_1k_opens
FROM metric_points
WHERE metric IN ('tcp_retransmits_total', 'tcp_opens_total', 'tcp_resets_sent_total',
                 'tcp_resets_received_total')
  AND if({node:String} = '', node != '', node = {node:String})
  AND ts >= toDateTime({start:Int64}, 'UTC') AND ts < toDateTime({end:Int64}, 'UTC')
GROUP BY node
ORDER BY retransmits DESC, opens DESC, node
LIMIT {limit:UInt32}
