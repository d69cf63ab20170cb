"""Which deduplication-log lines regional/sinks/chdb_repair.py forgets, on made-up
table directories (the engine itself: tests/integration/test_store_killed_insert.py)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from stratoscope.regional.sinks.chdb_repair import (
    EngineOpen,
    repair_before_open,
    repair_deduplication_logs,
)


def table(root: Path, parts: list[str], log: list[str], name: str = "abc") -> Path:
    d = root / "store" / name[:3] / f"{name}-uuid"
    for p in parts:
        (d / p).mkdir(parents=True)
    (d / "deduplication_logs").mkdir(parents=True)
    (d / "deduplication_logs" / "deduplication_log_1.txt").write_text("".join(f"{x}\n" for x in log))
    return d


def log_of(d: Path) -> list[str]:
    return (d / "deduplication_logs" / "deduplication_log_1.txt").read_text().splitlines()


def test_forgets_only_the_uncovered_newest_parts(tmp_path: Path) -> None:
    d = table(tmp_path, ["202612_1_3_1", "202612_4_4_0", "tmp_insert_202612_6_6_0", "detached"], [
        "1\t202612_1_1_0\tb1",   # merged into 1_3_1: kept
        "1\t202612_4_4_0\tb4",   # on disk: kept
        "1\t202612_5_5_0\tb5",   # newer than every part, on disk nowhere: forgotten
        "1\t202612_6_6_0\tb6",   # only a temporary directory: forgotten
        "2\t202612_2_2_0\tb2",   # a drop record: kept
    ])
    forgotten, odd = repair_deduplication_logs(tmp_path)
    assert [(f.part, f.block_id) for f in forgotten] == [("202612_5_5_0", "b5"), ("202612_6_6_0", "b6")]
    assert odd == []
    assert log_of(d) == ["1\t202612_1_1_0\tb1", "1\t202612_4_4_0\tb4", "2\t202612_2_2_0\tb2"]


def test_an_uncovered_part_older_than_a_stored_one_is_kept(tmp_path: Path) -> None:
    # parts a TTL or a merge took away long ago, with newer parts after them: not the
    # mark of an insert that never finished
    d = table(tmp_path, ["202612_9_9_0"], ["1\t202612_3_3_0\told", "1\t202612_9_9_0\tnew"])
    assert repair_deduplication_logs(tmp_path) == ([], [])
    assert log_of(d) == ["1\t202612_3_3_0\told", "1\t202612_9_9_0\tnew"]


def test_partitions_are_separate(tmp_path: Path) -> None:
    d = table(tmp_path, ["5-20261207_1_1_0"], ["1\t5-20261207_1_1_0\ta", "1\t5-20261208_1_1_0\tb"])
    forgotten, _ = repair_deduplication_logs(tmp_path)
    assert [f.part for f in forgotten] == ["5-20261208_1_1_0"]
    assert log_of(d) == ["1\t5-20261207_1_1_0\ta"]


def test_what_it_cannot_read_is_left_and_reported(tmp_path: Path) -> None:
    d = table(tmp_path, [], ["version 7", "1\tnot-a-part\tx", "1\t202612_2_2_0\ty"])
    forgotten, odd = repair_deduplication_logs(tmp_path)
    assert [f.part for f in forgotten] == ["202612_2_2_0"]
    assert len(odd) == 2 and "unrecognised line" in odd[0] and "unreadable part name" in odd[1]
    assert log_of(d) == ["version 7", "1\tnot-a-part\tx"]


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    d = table(tmp_path, [], ["1\t202612_2_2_0\ty"])
    forgotten, _ = repair_deduplication_logs(tmp_path, dry_run=True)
    assert len(forgotten) == 1 and log_of(d) == ["1\t202612_2_2_0\ty"]


def test_only_a_store_left_by_a_killed_engine_is_repaired(tmp_path: Path) -> None:
    d = table(tmp_path, [], ["1\t202612_2_2_0\ty"])
    assert repair_before_open(tmp_path) == ([], [])  # no status file: closed cleanly
    assert log_of(d) == ["1\t202612_2_2_0\ty"]
    status = tmp_path / "status"
    status.write_text("PID: 1\n")
    fd = os.open(status, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # an engine has it open
        with pytest.raises(EngineOpen):
            repair_before_open(tmp_path)
        assert log_of(d) == ["1\t202612_2_2_0\ty"]
    finally:
        os.close(fd)
    forgotten, _ = repair_before_open(tmp_path)  # left unlocked: the engine was killed
    assert [f.block_id for f in forgotten] == ["y"] and log_of(d) == []
