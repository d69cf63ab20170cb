"""The watchdog's rule (regional/liveness.py): silence counted from a ping, ended by any
message, restarted by a late check, not counted while the owner is busy; and its thread."""

from __future__ import annotations

import threading

import pytest

from stratoscope.regional.liveness import Silence, Watchdog
from tests.conftest import wait_for


def test_a_ping_then_silence_past_the_timeout_is_hung() -> None:
    s = Silence(3.0)
    assert s.tick(1.0, 1.0) == "ping"
    assert [s.tick(1.0, 1.0) for _ in range(3)] == ["wait", "wait", "hung"]


def test_any_message_ends_the_silence_and_the_next_check_pings_again() -> None:
    s = Silence(3.0)
    assert s.tick(1.0, 1.0) == "ping"
    assert s.tick(1.5, 1.0) == "wait"
    s.heard()
    assert s.tick(1.0, 1.0) == "ping"
    assert (s.silent_s, s.tick(2.0, 1.0), s.tick(0.5, 1.0)) == (0.0, "wait", "wait")
    assert s.tick(0.5, 1.0) == "hung"


def test_a_late_check_restarts_the_count() -> None:
    """An owner that did not run for 10 minutes (a stopped process group, a suspended
    machine) does not take that for the child's silence: the child gets a whole timeout
    from when the owner runs again."""
    s = Silence(3.0)
    s.tick(0.0, 1.0)
    assert s.tick(2.0, 1.0) == "wait" and s.silent_s == 2.0
    assert s.tick(600.0, 1.0) == "wait" and s.silent_s == 0.0
    assert [s.tick(1.0, 1.0) for _ in range(3)] == ["wait", "wait", "hung"]


def test_silence_while_the_owner_is_busy_does_not_count() -> None:
    s = Silence(3.0)
    s.tick(0.0, 1.0)
    assert [s.tick(1.0, 1.0, listening=False) for _ in range(10)] == ["wait"] * 10
    assert s.tick(1.0, 1.0) == "wait" and s.tick(2.0, 1.0) == "hung"


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_the_timeout_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="timeout must be positive"):
        Silence(bad)


def test_the_thread_calls_on_hung_once_for_a_silent_child() -> None:
    pings: list[int] = []
    hung: list[float] = []
    dog = Watchdog("t", 0.2, ping=lambda: pings.append(1), on_hung=hung.append)
    dog.start()
    wait_for("the verdict", lambda: hung, 30, every_s=0.01)
    assert dog._thread is not None
    dog._thread.join(30)
    assert not dog._thread.is_alive()  # one verdict, then the watchdog ends
    assert len(hung) == 1 and hung[0] >= 0.2
    assert len(pings) == 1  # silent since the first ping: no second one


def test_a_ping_stuck_in_a_full_pipe_is_not_sent_again() -> None:
    """The ping itself may block (the child does not read its pipe): the silence is still
    counted, and no second ping piles up behind the first."""
    release = threading.Event()
    sends: list[int] = []

    def ping() -> None:
        sends.append(1)
        release.wait(30)

    hung = threading.Event()
    dog = Watchdog("t", 0.2, ping=ping, on_hung=lambda _s: hung.set())
    dog.start()
    assert hung.wait(30)
    release.set()
    assert sends == [1]


def test_a_stopped_watchdog_gives_no_verdict() -> None:
    hung: list[float] = []
    dog = Watchdog("t", 0.2, ping=lambda: None, on_hung=hung.append)
    dog.stop()  # before start: safe, and start then runs nothing
    dog.start()
    assert dog._thread is not None
    dog._thread.join(30)
    assert not dog._thread.is_alive() and hung == []
