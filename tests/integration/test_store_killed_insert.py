"""An embedded ClickHouse killed during an insert loses nothing after the replay.

ClickHouse records an insert's token in the table's deduplication log before it
renames the new part into place; killed in between, the store keeps the token and
drops the part, and the replay of that insert (the regional's write-ahead log resends
the same blocks with the same tokens) used to be discarded as a duplicate. These tests
make that state on a real store: a process stores three windows and is SIGKILLed
(status file left, as after any kill), then the newest part of one table is put back
where an unfinished insert leaves it (``tmp_insert_*``, which the next start deletes).
Killing an insert at exactly that moment happens about once in a hundred random kills
under I/O load (docs/BENCHMARKS.md, "Soak"), so the state is made, not waited for.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stratoscope.regional.sinks.chdb_repair import _part_range
from tests.integration.killed_store_child import DB, EXPECTED

ROOT = Path(__file__).resolve().parents[2]


def child(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.integration.killed_store_child", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def unfinish_newest_part(store: Path, table: str) -> int:
    """Turn the newest part of ``table`` back into the temporary directory of an insert
    that never finished; returns how many deduplication-log entries name a part inside it
    (the tokens the store holds without their rows)."""
    table_dir = (store / "data" / DB / table).resolve()
    parts = [(r, e.name) for e in os.scandir(table_dir)
             if e.is_dir() and (r := _part_range(e.name)) is not None]
    assert parts, f"{table} has no parts"
    (partition, lo, hi), name = max(parts, key=lambda p: p[0][2])
    os.rename(table_dir / name, table_dir / f"tmp_insert_{name}")
    inside = 0
    for log in (table_dir / "deduplication_logs").glob("deduplication_log_*.txt"):
        for line in log.read_text().splitlines():
            op, part, _ = line.split("\t")
            rng = _part_range(part)
            if op == "1" and rng is not None and rng[0] == partition and lo <= rng[1] and rng[2] <= hi:
                inside += 1
    assert inside >= 1
    return inside


@pytest.mark.parametrize("table", ["histogram_points", "histogram_points_1h", "metric_points"])
def test_replay_after_a_kill_mid_insert_stores_the_lost_rows_once(table: str, tmp_path: Path) -> None:
    store = tmp_path / "store"
    died = child("deliver-and-die", str(store))
    assert died.returncode == -9, died.stderr[-2000:]
    assert (store / "status").exists()  # what a killed engine leaves
    lost_tokens = unfinish_newest_part(store, table)

    # the same state without the repair: the replay is taken for a duplicate
    bare = tmp_path / "bare"
    shutil.copytree(store, bare, symlinks=True)
    plain = child("replay", str(bare), "--no-repair")
    assert plain.returncode == 0, plain.stderr[-2000:]
    short = json.loads(plain.stdout.splitlines()[-1])
    assert short["totals"] != EXPECTED and short["tokens_forgotten"] == 0

    replay = child("replay", str(store))
    assert replay.returncode == 0, replay.stderr[-2000:]
    out = json.loads(replay.stdout.splitlines()[-1])
    assert out["totals"] == EXPECTED
    assert out["tokens_forgotten"] == lost_tokens
    assert "was killed during an insert: forgot the token" in replay.stderr

    again = child("replay", str(store))  # a clean restart: nothing to forget, nothing doubled
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.splitlines()[-1]) == {"totals": EXPECTED, "tokens_forgotten": 0}


def test_a_cleanly_closed_store_is_not_touched(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = child("replay", str(store))
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads(first.stdout.splitlines()[-1]) == {"totals": EXPECTED, "tokens_forgotten": 0}
    assert not (store / "status").exists()
    logs = sorted(store.glob("store/*/*/deduplication_logs/*.txt"))
    before = {p: p.read_bytes() for p in logs}
    again = child("replay", str(store))
    assert json.loads(again.stdout.splitlines()[-1]) == {"totals": EXPECTED, "tokens_forgotten": 0}
    assert {p: p.read_bytes() for p in logs} == before
