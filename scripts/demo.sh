#!/usr/bin/env bash
# Set this machine up (idempotent) and run the demo: a regional aggregator on
# embedded ClickHouse (out/clickhouse) and an edge collector with all six
# programs on this node for 30 s, then a report read back from ClickHouse with SQL.
# Extra arguments go to `stratoscope demo` (e.g. --duration 60s, --kafka 127.0.0.1:19092).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
mkdir -p out
exec .venv/bin/stratoscope demo --clickhouse "chdb://${STRATOSCOPE_DEMO_STORE:-$ROOT/out/clickhouse}" \
    --wal-dir "${STRATOSCOPE_DEMO_WAL:-$ROOT/out/wal}" "$@"
