"""Notices a child process that is alive but has stopped answering.

Why: the regional's children (the ingest process, one process per sink) talk to it over
a pipe. A child that dies closes the pipe and its owner sees it at once; a child that
hangs -- stopped, its event loop stuck, blocked in the kernel -- keeps the pipe open and
answers nothing, and whatever waits on it waits forever: a sink's deliveries time out
and are retried into the same silence, and a hung ingest process stops acknowledging
while the regional looks healthy.

So the owner pings the child (``ping``: one small message the child answers from its
event loop) whenever nothing is outstanding, and counts how long the child has been
silent since: any message from it (``heard``) ends the silence. Past ``timeout_s`` of
silence the child is hung: ``on_hung`` is called once (log it, count it, kill the
child: SIGKILL also ends a stopped process) and the watchdog stops.

The silence is counted only while the owner waits on the child (``listening``: e.g. not
while the owner's reader is busy with an earlier message, which is the owner's delay,
not the child's), and a check that comes more than an interval late restarts the count:
the owner itself did not run (the machine suspended, the whole process group stopped
and continued, a starved interpreter), so it cannot tell how long the child was silent
while it could have answered; the child gets a whole timeout again.

The merge process is watched the same way, by its ingest process (regional/ingest.py,
``MergePing``): the merge process is the regional itself, the one its supervisor
watches, so a hung one is killed by the ingest process, which then stops taking
batches and exits; the regional's exit is SIGKILL's, and the supervisor restarts it.
The merge process cannot count its own death, so the ingest process records it in
the log directory (``record_merge_hang``) and the next start reports it
(``recorded_merge_hangs``).

The timeout is generous by default (``DEFAULT_TIMEOUT_S``): a child answers a ping in
milliseconds, and its heavy work (inserts, encoding, fsync) runs in threads that leave
its event loop free (an 11.8 s chdb insert of 200 M rows in a thread kept the main
thread from running for 0.21 s at most, on this 2-core VM); the deadline only has to
tell a hung child from a slow one on a busy machine.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

#: Seconds of silence after which a child process is hung (``child_timeout``).
DEFAULT_TIMEOUT_S = 60.0
#: The longest interval between two checks (shorter for short timeouts).
CHECK_EVERY_S = 1.0
#: In the log directory: how many times the ingest process found the merge process hung
#: and killed it (a decimal number; absent: none).
MERGE_HANGS_FILE = "merge-hangs"


def recorded_merge_hangs(directory: Path | None) -> int:
    """The merge process's hangs recorded in ``directory`` (0 without one)."""
    if directory is None:
        return 0
    try:
        return int((directory / MERGE_HANGS_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def record_merge_hang(directory: Path) -> int:
    """Count one more hang of the merge process in ``directory``; returns the count.
    Not synced: a count lost to a power cut costs nothing but the count."""
    n = recorded_merge_hangs(directory) + 1
    tmp = directory / f"{MERGE_HANGS_FILE}.tmp"
    tmp.write_text(f"{n}\n")
    os.replace(tmp, directory / MERGE_HANGS_FILE)
    return n


class Silence:
    """How long a child has been silent since it was pinged: pure bookkeeping, driven
    by ``tick`` with the elapsed time (so tests need no clock)."""

    def __init__(self, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout must be positive, got {timeout_s!r}")
        self.timeout_s = timeout_s
        #: Silence counted since the outstanding ping was sent.
        self.silent_s = 0.0
        #: A ping is out and nothing was heard since.
        self.asked = False
        self._lock = threading.Lock()

    def heard(self) -> None:
        """Any message from the child: it is alive (any thread)."""
        with self._lock:
            self.asked = False
            self.silent_s = 0.0

    def tick(self, elapsed_s: float, every_s: float, listening: bool = True) -> str:
        """One check, ``elapsed_s`` after the last (due ``every_s`` after it): "ping"
        (send one now), "wait", or "hung". Nothing counts while the owner is not
        ``listening``; a check more than ``every_s`` late restarts the count."""
        with self._lock:
            if not self.asked:
                self.asked = True
                self.silent_s = 0.0
                return "ping"
            if elapsed_s > 2 * every_s:
                self.silent_s = 0.0
            elif listening:
                self.silent_s += max(0.0, elapsed_s)
            return "hung" if self.silent_s >= self.timeout_s else "wait"


class Watchdog:
    """A thread that pings a child and calls ``on_hung`` once it has been silent for
    ``timeout_s`` (see the module docstring). ``start()`` / ``stop()``; stop is
    idempotent and safe without start.

    Pings are written by a second thread, for as long as the watchdog lives: a write can
    block (the pipe full, or its lock held by a large message to a child that stopped
    reading), and the deadline must still be checked meanwhile."""

    def __init__(self, name: str, timeout_s: float, ping: Callable[[], None],
                 on_hung: Callable[[float], None],
                 listening: Callable[[], bool] = lambda: True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``ping()`` sends one ping (it may block: it runs in a thread of its own, one
        at a time; a ping asked for meanwhile is sent once it returns); ``on_hung(silent_s)``
        is called in the watchdog's thread."""
        self.name = name
        self.silence = Silence(timeout_s)
        self.every_s = min(CHECK_EVERY_S, timeout_s / 4)
        self._ping = ping
        self._on_hung = on_hung
        self._listening = listening
        self._clock = clock
        self._stop = threading.Event()
        self._want_ping = threading.Event()
        self._thread: threading.Thread | None = None

    def heard(self) -> None:
        self.silence.heard()

    def start(self) -> None:
        """Start watching (idempotent; after ``stop()`` it watches nothing)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"watchdog-{self.name}",
                                            daemon=True)
            self._thread.start()
            threading.Thread(target=self._pings, name=f"ping-{self.name}", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._want_ping.set()  # the ping thread wakes and ends

    def _pings(self) -> None:
        while True:
            self._want_ping.wait()
            if self._stop.is_set():
                return
            self._want_ping.clear()
            with contextlib.suppress(OSError, ValueError):  # the pipe is gone: the owner sees
                self._ping()                                # the child exit

    def _run(self) -> None:
        last = self._clock()
        while not self._stop.wait(self.every_s):
            now = self._clock()
            verdict = self.silence.tick(now - last, self.every_s, self._listening())
            last = now
            if verdict == "ping":
                self._want_ping.set()
            elif verdict == "hung":
                if not self._stop.is_set():
                    self._on_hung(self.silence.silent_s)
                self.stop()
                return
