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
    writer: ``failed`` holds the error (the ingest process then exits; a supervisor
    restarts the regional, which replays what was logged).
    """

    def __init__(self, directory: Path, dedup_state: Deduplicator, segment_bytes: int = 64 << 20,
                 fsync: FsyncPolicy = "ack", fsync_interval_s: float = 1.0) -> None:
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
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
        path = wal.segment_path(self.directory, segment)
        self.prepared = wal.take_spare(self.directory, path)
        if self.prepared:
            self._fd = os.open(path, os.O_WRONLY)
        else:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        head = wal.checkpoint_record(self._durable.state())
        self._pwrite(head, 0)
        os.fsync(self._fd)
        wal.fsync_dir(self.directory)
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
                    self._cv.wait(self.fsync_interval_s if self.fsync == "interval" else None)
                    if self.fsync == "interval" and not self._queue:
                        self._sync_if_due()
                group, self._queue = self._queue, []
                closing = self._closing
            if group:
                self._write(group)
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
            self._pwrite(data, self._offset)
            if self.fsync == "ack":
                os.fdatasync(self._fd)
                self.syncs += 1
            else:
                self._sync_if_due()
            self._offset = offset
        except OSError as exc:
            self.failed = exc
            log.critical("the write-ahead log cannot be written (%s): batches are no longer acknowledged", exc)
            for p in group:
                p.done(None)
            with self._cv:
                self._closing = True
                rest, self._queue = self._queue, []
            for p in rest:
                p.done(None)
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

    def _sync_if_due(self) -> None:
        if time.monotonic() - self._last_sync >= self.fsync_interval_s and self._fd >= 0:
            os.fdatasync(self._fd)
            self.syncs += 1
            self._last_sync = time.monotonic()

    def _close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            wal.close_synced(fd)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, sync, close. Idempotent."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._spare_wanted.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._preparer.is_alive():
            self._preparer.join(timeout_s)
