#!/usr/bin/env bash
# Set this machine up (idempotent) and run the demo: the edge collector with
# all six programs for 30 s, then a readable summary of what it saw.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
mkdir -p out
exec .venv/bin/stratoscope edge --duration "${DEMO_DURATION:-30s}" --interval 10s \
  --output jsonl:out/edge.jsonl --metrics-port 0 --summary "$@"
