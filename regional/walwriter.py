"""The ingest process's side of the write-ahead log: append accepted batches, group commit.

Why a thread of its own: an fsync takes milliseconds; the event loop that answers every
edge must not wait for it. Batches accepted while one write and fsync run are written
together by the next one (group commit): one fsync for many batches. A batch's
acknowledgement waits for the fsync that covers it (``fsync="ack"``, the default), or
only for the write, with an fsync at most every ``fsync_interval_s`` (``"interval"``:
a crash of the process loses nothing, a crash of the machine may lose the last
interval's batches).

Segments are preallocated (regional/wal.py): a helper thread zero-fills and syncs the
next segment once the current one is a quarter full, and the writer overwrites it in
place, so an fdatasync flushes the batches' pages and nothing else. Without a prepared
segment (the first of a log, a disk that refused) it appends, as before.

The writer keeps its own de-duplication state of what is durable (regional/dedup.py):
each new segment starts with it as a CHECKPOINT, so deleting older segments never
forgets which batches were taken. Completions are handed back in log order, so the
merge records batches in the order of their positions (regional/instances.py relies
on that).

A disk that stops returning (a hung device, a frozen filesystem: ``fsfreeze``, a
snapshot agent that never thaws) blocks the writer in the kernel, and the batches
waiting on it are never acknowledged. ``StallWatch`` times every call the writer makes
to the disk (a group's write and its fsync, a segment's rotation): ``check()``, once a
second from the ingest event loop, warns (at most once a minute) when one takes longer
than ``SLOW_S``, and once one has been in progress for ``fsync_timeout_s`` the writer
gives up: what is queued behind it is answered RETRY and never written, and ``failed``
says why (the regional then stops with exit code 1). The call itself cannot be ended:
a thread blocked in the kernel ends when the kernel returns, SIGKILL included.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stratoscope.regional import wal
from stratoscope.regional.dedup import Deduplicator

log = logging.getLogger("stratoscope.regional")

__all__ = ["FsyncPolicy", "WalWriter"]

FsyncPolicy = Literal["ack", "interval"]

#: (position, or None if the log failed) -> None; called in the writer thread.
Done = Callable[[int | None], None]

#: A write or fsync of the log that takes longer than this is logged (at most once every
#: ``WARN_EVERY_S``). An ordinary group commit takes milliseconds; under saturation, with
#: chdb's writes in the same filesystem journal, acks waited 2.6 s at p99 (README).
SLOW_S = 5.0
WARN_EVERY_S = 60.0
#: How long one write or fsync may stay in progress before the log is given up
#: (``wal_fsync_timeout``): generous, so a slow disk is not taken for a stuck one.
DEFAULT_FSYNC_TIMEOUT_S = 120.0
#: ``longest()`` covers the calls that ended in the last one to two of these.
LONGEST_PERIOD_S = 60.0


class StallWatch:
    """Times the writer's calls to the disk: pure bookkeeping with an injected clock.

    ``begin()``/``end()`` bracket one call (the writer thread); ``age()``, ``longest()``
    and ``check()`` may be called from any other thread."""

    def __init__(self, timeout_s: float = DEFAULT_FSYNC_TIMEOUT_S, slow_s: float = SLOW_S,
                 warn_every_s: float = WARN_EVERY_S, period_s: float = LONGEST_PERIOD_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout must be positive, got {timeout_s!r}")
        self.timeout_s = timeout_s
        self.slow_s = slow_s
        self.warn_every_s = warn_every_s
        self.period_s = period_s
        self.clock = clock
        #: When the call in progress began (None: none is).
        self._since: float | None = None
        #: The longest call that ended in this period and in the one before.
        self._period_start = clock()
        self._longest_now = 0.0
        self._longest_before = 0.0
        #: The longest slow call that ended since the last warning (0: none).
        self._slow_ended = 0.0
        self._warned_at: float | None = None
        #: Set once a call has been in progress for ``timeout_s``.
        self.stuck = False
        self._lock = threading.Lock()

    def begin(self) -> None:
        self._since = self.clock()

    def end(self) -> None:
        now = self.clock()
        since, self._since = self._since, None
        if since is None:
            return
        took = now - since
        with self._lock:
            self._rotate(now)
            self._longest_now = max(self._longest_now, took)
            if took >= self.slow_s:
                self._slow_ended = max(self._slow_ended, took)

    def _rotate(self, now: float) -> None:
        elapsed = now - self._period_start
        if elapsed >= self.period_s:
            self._longest_before = self._longest_now if elapsed < 2 * self.period_s else 0.0
            self._longest_now = 0.0
            self._period_start = now

    def age(self) -> float:
        """Seconds the call in progress has taken so far (0: none is in progress)."""
        since = self._since
        return max(0.0, self.clock() - since) if since is not None else 0.0

    def longest(self) -> float:
        """The longest call of the last one to two periods, the one in progress included."""
        age = self.age()
        with self._lock:
            self._rotate(self.clock())
            return max(self._longest_now, self._longest_before, age)

    def check(self) -> tuple[str, float]:
        """One look (every second or so): ("stuck", age) once the call in progress has
        taken ``timeout_s`` (only the first time); ("slow", seconds) when a call in
        progress, or one that ended since the last warning, took ``slow_s`` or more and
        no warning was given for ``warn_every_s``; else ("ok", age): nothing to say (so
        also after "stuck")."""
        now = self.clock()
        age = self.age()
        if self.stuck:
            return "ok", age
        if age >= self.timeout_s:
            self.stuck = True
            return "stuck", age
        with self._lock:
            worst = max(age, self._slow_ended)
            due = self._warned_at is None or now - self._warned_at >= self.warn_every_s
            if worst >= self.slow_s and due:
                self._warned_at = now
                self._slow_ended = 0.0
                return "slow", worst
        return "ok", age


@dataclass(slots=True)
class _Pending:
    record: bytes
    ident: tuple[str, str, int]
    done: Done


class WalWriter:
    """Appends BATCH records to the newest segment of ``directory`` (see module docstring).

    ``append`` may be called from any thread; ``done(pos)`` is called from the writer
    thread, in append order, once the record is written (and synced, by the policy).
    A failing disk calls ``done(None)`` for what it could not write and stops the
    writer: ``failed`` holds the error (the regional then stops, exit code 1; a
    supervisor restarts it, and it replays what was logged). So does a disk that stops
    returning, once ``check()`` finds one call in progress for ``fsync_timeout_s``.
    """

    def __init__(self, directory: Path, dedup_state: Deduplicator, segment_bytes: int = 64 << 20,
                 fsync: FsyncPolicy = "ack", fsync_interval_s: float = 1.0,
                 fsync_timeout_s: float = DEFAULT_FSYNC_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self._durable = dedup_state
        self._queue: list[_Pending] = []
        self._cv = threading.Condition()
        self._closing = False
        self.failed: OSError | None = None
        self._fd = -1
        self.segment = 0
        self._offset = 0
        self._last_sync = time.monotonic()
        #: Totals for /metrics: records and bytes written, fsync calls.
        self.records = 0
        self.bytes = 0
        self.syncs = 0
        #: Times every call to the disk (the module docstring).
        self.stall = StallWatch(fsync_timeout_s, clock=clock)
        self._thread = threading.Thread(target=self._run, name="wal-writer", daemon=True)
        #: Whether the segment being written was prepared (zero-filled); for tests and logs.
        self.prepared = False
        self._spare_wanted = threading.Event()
        self._spare_asked = False
        self._preparer = threading.Thread(target=self._prepare_spares, name="wal-preparer", daemon=True)

    def start(self) -> None:
        """Open a new segment (numbered above every existing one) and start writing."""
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = wal.segments(self.directory)
        self._open(existing[-1][0] + 1 if existing else 1)
        self._thread.start()
        self._preparer.start()

    def _prepare_spares(self) -> None:
        """Zero-fill the next segment when asked (a thread of its own: the writer never
        waits for it)."""
        while True:
            self._spare_wanted.wait()
            self._spare_wanted.clear()
            if self._closing:
                return
            wal.prepare_spare(self.directory, self.segment_bytes)

    def _open(self, segment: int) -> None:
        head = wal.checkpoint_record(self._durable.state())
        self.stall.begin()
        try:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
            path = wal.segment_path(self.directory, segment)
            self.prepared = wal.take_spare(self.directory, path)
            if self.prepared:
                self._fd = os.open(path, os.O_WRONLY)
            else:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._pwrite(head, 0)
            os.fsync(self._fd)
            wal.fsync_dir(self.directory)
        finally:
            self.stall.end()
        self.segment, self._offset = segment, len(head)
        self._spare_asked = False

    def _pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def append(self, record: bytes, ident: tuple[str, str, int], done: Done) -> None:
        """Queue one BATCH record (``wal.batch_record``) of batch ``ident``."""
        with self._cv:
            if self._closing or self.failed is not None:
                closed = True
            else:
                closed = False
                self._queue.append(_Pending(record, ident, done))
                self._cv.notify()
        if closed:
            done(None)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    if self.fsync == "interval":
                        if not self._cv.wait(self.fsync_interval_s):
                            break  # idle: the periodic fsync, below (not under the lock:
                    else:          # append() takes it, from the event loop)
                        self._cv.wait()
                group, self._queue = self._queue, []
                closing = self._closing
            if group:
                self._write(group)
            elif not closing and self.fsync == "interval":
                try:
                    self._sync_if_due()
                except OSError as exc:
                    self._fail(exc, [])
                    continue
            if closing and not group:
                try:
                    self._close()
                except OSError as exc:
                    log.error("closing the write-ahead log failed: %s", exc)
                return

    def _write(self, group: list[_Pending]) -> None:
        try:
            positions = []
            offset = self._offset
            for p in group:
                positions.append(wal.position(self.segment, offset))
                offset += len(p.record)
            data = b"".join(p.record for p in group)
            self.stall.begin()
            try:
                self._pwrite(data, self._offset)
                if self.fsync == "ack":
                    os.fdatasync(self._fd)
                    self.syncs += 1
            finally:
                self.stall.end()
            if self.fsync != "ack":
                self._sync_if_due()
            self._offset = offset
        except OSError as exc:
            self._fail(exc, group)
            return
        self.records += len(group)
        self.bytes += len(data)
        for p in group:
            self._durable.add(*p.ident)
        for p, pos in zip(group, positions, strict=True):
            p.done(pos)
        if not self._spare_asked and self._offset >= self.segment_bytes // 4:
            self._spare_asked = True
            self._spare_wanted.set()
        if self._offset >= self.segment_bytes:
            try:
                self._open(self.segment + 1)
            except OSError as exc:
                self.failed = exc
                log.critical("the write-ahead log cannot open a new segment (%s)", exc)
                with self._cv:
                    self._closing = True

    def _fail(self, exc: OSError, group: list[_Pending]) -> None:
        """The log cannot be written: fail ``group`` and everything queued, stop."""
        if self.failed is None:
            self.failed = exc
            log.critical("the write-ahead log cannot be written (%s): batches are no longer acknowledged", exc)
        for p in group:
            p.done(None)
        self._give_up()

    def _give_up(self) -> None:
        """Take no more batches: each one queued is answered RETRY (``done(None)``), and
        is never written (only what the writer took from the queue is)."""
        with self._cv:
            self._closing = True
            rest, self._queue = self._queue, []
            self._cv.notify()
        for p in rest:
            p.done(None)

    def check(self) -> bool:
        """Look at the call to the disk in progress, about every second (any thread but
        the writer's): log a slow one (at most once every ``WARN_EVERY_S``); give the
        log up once one has been in progress for ``fsync_timeout_s``. True the one time
        it gives up."""
        verdict, seconds = self.stall.check()
        if verdict == "slow":
            log.warning("a write or fsync of the write-ahead log took %.1f s%s: the batches waiting "
                        "on it are not acknowledged meanwhile (the log is given up after %g s, "
                        "wal_fsync_timeout)", seconds,
                        " so far" if self.stall.age() >= seconds else "", self.stall.timeout_s)
        elif verdict == "stuck" and self.failed is None:
            self.failed = TimeoutError(
                f"a write or fsync of {self.directory} has not returned for {seconds:.0f} s "
                f"(wal_fsync_timeout {self.stall.timeout_s:g} s): its disk is stuck")
            log.critical("the write-ahead log is stuck: %s; batches are no longer acknowledged "
                         "(the call itself ends only when the kernel returns it)", self.failed)
            self._give_up()
            return True
        return False

    def _sync_if_due(self) -> None:
        if time.monotonic() - self._last_sync >= self.fsync_interval_s and self._fd >= 0:
            self.stall.begin()
            try:
                os.fdatasync(self._fd)
            finally:
                self.stall.end()
            self.syncs += 1
            self._last_sync = time.monotonic()

    def _close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self.stall.begin()
            try:
                wal.close_synced(fd)
            finally:
                self.stall.end()

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, sync, close. Idempotent. A writer stuck in the kernel
        (``stall.stuck``) is not waited for: it closes when the kernel returns."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._spare_wanted.set()
        if self.stall.stuck:  # the preparer writes to the same disk: not waited for either
            return
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._preparer.is_alive():
            self._preparer.join(timeout_s)
