#!/usr/bin/env bash
# Set this machine up (idempotent) and run the whole test suite: unit tests,
# real BPF programs in this kernel, a real Kafka broker, embedded ClickHouse.
# Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh

# A broker of the test run's own, on its own port, so a broker someone started
# for trying things out is neither used nor stopped by the tests.
export KAFKA_PORT="${STRATOSCOPE_TEST_KAFKA_PORT:-19292}"
bash scripts/kafka.sh start
cleanup() { bash scripts/kafka.sh stop || true; }
trap cleanup EXIT
eval "$(bash scripts/kafka.sh env)"
export KAFKA_BOOTSTRAP

.venv/bin/ruff check .
.venv/bin/mypy -p stratoscope
set +e
.venv/bin/python -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
[ "$rc" -eq 5 ] && { echo "pytest collected no tests: failing" >&2; exit 1; }
exit "$rc"
