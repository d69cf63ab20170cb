"""Issue 20: coverage-guided fuzzing of the batch decoder and validator, as a test.

Runs tests/fuzz/fuzz_validate.py (atheris) in a subprocess for a fixed number of runs
with a fixed seed and hash seed, from a corpus of valid batches written here, so a run
explores the same inputs every time. libFuzzer's per-input ``-timeout`` and
``-rss_limit_mb`` make a hang or unbounded memory fail it like a broken property does.
Longer campaigns: run the script itself (its docstring).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

try:
    import atheris  # noqa: F401  (the fuzzer runs in a subprocess; this only proves it is there)
except ImportError as exc:  # fail, never skip: a missing fuzzer must not pass quietly
    raise ImportError("atheris is not installed: pip install 'atheris>=3.0' (in the dev extras)") from exc

from tests.fuzz.batches import TIGHT, seed_batches

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "tests" / "fuzz" / "fuzz_validate.py"
RUNS = 30_000
RSS_LIMIT_MB = 1024
TIMEOUT_S = 10


def test_a_fixed_atheris_run_finds_nothing(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, wire in enumerate(seed_batches(TIGHT)):
        (corpus / f"seed-{i:02d}").write_bytes(wire)
    # Through a shell that forks it: libFuzzer's RSS is getrusage's peak, which a process
    # exec'd straight from this one would inherit (a pytest process that ran the
    # integration suite is past 1 GB); a child forked by a small shell starts from its own.
    proc = subprocess.run(
        ["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, str(TARGET), "-seed=1", f"-runs={RUNS}", f"-timeout={TIMEOUT_S}",
         f"-rss_limit_mb={RSS_LIMIT_MB}", "-max_len=65536", f"-artifact_prefix={tmp_path}/",
         "-print_final_stats=1", str(corpus)],
        env={**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT)},
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )
    tail = proc.stderr[-4000:]
    assert proc.returncode == 0, tail
    assert f"Done {RUNS} runs" in proc.stderr, tail
    stats = dict(line.removeprefix("stat::").split(":", 1) for line in proc.stderr.splitlines()
                 if line.startswith("stat::"))
    assert int(stats["number_of_executed_units"]) == RUNS
    assert int(stats["peak_rss_mb"]) < RSS_LIMIT_MB
    assert int(stats["slowest_unit_time_sec"]) < TIMEOUT_S
    assert int(stats["new_units_added"]) > 0  # coverage feedback works: it found new paths
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no crash-, leak-, timeout- files
