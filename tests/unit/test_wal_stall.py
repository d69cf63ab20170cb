"""A write or fsync of the write-ahead log that does not return (regional/walwriter.py):
timed, warned about at most once a minute, and given up at the deadline, on a fake clock.
tests/integration/test_liveness.py stalls a real one (a frozen filesystem)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from stratoscope.regional import wal
from stratoscope.regional.dedup import Deduplicator
from stratoscope.regional.liveness import record_merge_hang, recorded_merge_hangs
from stratoscope.regional.walwriter import StallWatch, WalWriter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watch(clock: Clock, **kw: float) -> StallWatch:
    return StallWatch(kw.pop("timeout_s", 120.0), clock=clock, **kw)


def test_the_age_of_the_call_in_progress_is_zero_between_calls() -> None:
    clock = Clock()
    w = watch(clock)
    assert w.age() == 0.0
    w.begin()
    clock.now += 2.5
    assert w.age() == 2.5
    w.end()
    assert (w.age(), w.longest()) == (0.0, 2.5)


def test_a_slow_call_is_warned_about_at_most_once_a_minute_and_a_stuck_one_once() -> None:
    clock = Clock()
    w = watch(clock, timeout_s=120.0, slow_s=5.0, warn_every_s=60.0)
    w.begin()
    seen = []
    for _ in range(130):
        clock.now += 1.0
        seen.append(w.check())
    verdicts = [v for v, _ in seen]
    # warned at 5 s and 65 s, stuck at 120 s, and nothing more
    assert [i + 1 for i, v in enumerate(verdicts) if v == "slow"] == [5, 65]
    assert [i + 1 for i, v in enumerate(verdicts) if v == "stuck"] == [120]
    assert seen[119] == ("stuck", 120.0) and w.stuck


def test_a_slow_call_that_ended_between_two_looks_is_still_warned_about() -> None:
    clock = Clock()
    w = watch(clock, slow_s=5.0)
    w.begin()
    clock.now += 4.0
    assert w.check() == ("ok", 4.0)
    clock.now += 3.0
    w.end()  # 7 s, ended before the next look
    clock.now += 0.5
    assert w.check() == ("slow", 7.0)
    assert w.check() == ("ok", 0.0)


def test_the_longest_call_covers_one_to_two_periods_and_the_call_in_progress() -> None:
    clock = Clock()
    w = watch(clock, period_s=60.0)
    for took in (0.5, 3.0, 1.0):
        w.begin()
        clock.now += took
        w.end()
    assert w.longest() == 3.0
    clock.now += 60.0  # a new period: the last one's longest is still shown
    assert w.longest() == 3.0
    w.begin()
    clock.now += 0.25
    w.end()
    clock.now += 60.0  # two periods on: forgotten
    assert w.longest() == 0.25
    clock.now += 120.0
    assert w.longest() == 0.0
    w.begin()
    clock.now += 9.0
    assert w.longest() == 9.0  # in progress


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_the_timeout_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="timeout must be positive"):
        StallWatch(bad)


def test_a_stuck_log_is_given_up_and_what_waits_behind_it_is_never_written(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The writer's thread is not started, so appends stay queued as they would behind a
    call that does not return; the clock says one has been in progress past the deadline.
    Every queued batch is answered None (RETRY) and the log takes no more."""
    clock = Clock()
    writer = WalWriter(tmp_path / "log", Deduplicator(), fsync_timeout_s=30.0, clock=clock)
    answers: list[int | None] = []
    for seq in (1, 2, 3):
        writer.append(wal.batch_record(0, b"x"), ("n", "b", seq), answers.append)
    writer.stall.begin()  # a write of the group before them, in progress
    clock.now += 10.0
    with caplog.at_level(logging.WARNING, "stratoscope.regional"):
        assert writer.check() is False  # slow: warned about
        assert answers == [] and writer.failed is None
        clock.now += 20.0
        assert writer.check() is True
        assert writer.check() is False  # once
    assert answers == [None, None, None]
    assert isinstance(writer.failed, TimeoutError)
    assert str(writer.failed) == (f"a write or fsync of {tmp_path / 'log'} has not returned for 30 s "
                                  "(wal_fsync_timeout 30 s): its disk is stuck")
    writer.append(wal.batch_record(0, b"x"), ("n", "b", 4), answers.append)
    assert answers == [None] * 4
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("a write or fsync of the write-ahead log took 10.0 s so far")
    assert messages[1].startswith("the write-ahead log is stuck: ")
    assert not (tmp_path / "log").exists()
    writer.close()  # does not wait for a writer stuck in the kernel


def test_the_merge_process_hangs_are_counted_in_the_log_directory(tmp_path: Path) -> None:
    assert recorded_merge_hangs(None) == recorded_merge_hangs(tmp_path) == 0
    assert [record_merge_hang(tmp_path) for _ in range(2)] == [1, 2]
    assert recorded_merge_hangs(tmp_path) == 2
    (tmp_path / "merge-hangs").write_text("garbage")
    assert recorded_merge_hangs(tmp_path) == 0
