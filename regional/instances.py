"""Which window instances the write-ahead log still needs, and rebuilding them after a crash.

A *window instance* is what one flush emits of one window: the regular close of a
window, or a late partial of it. Its identity in the log is its *seal position*: the
log position of the newest batch in it. Because the merge records batches in log order
(regional/walwriter.py), instance k of window W holds exactly the batches of W whose
positions lie after the seal of instance k-1 and at or before its own seal.

The merge process keeps ``windows.wal`` (regional/wal.py framing):

- SEAL, written and synced before any block of the instance reaches a sink queue;
- DONE, written once every sink has confirmed (delivered or dead-lettered) every block
  of the instance.

After a crash, ``replay`` reads the log back: a batch of a sealed instance that is not
done is merged into that same instance again (same batches, same order: the same
blocks with the same block ids, so sinks de-duplicate what they already had); a batch
of a done instance is skipped; any other batch goes to an open window as it did before.
A batch segment is deleted once every batch in it belongs to a done instance and the
ingest process writes a newer one.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from stratoscope.regional import wal
from stratoscope.regional.validate import BatchRejected, Limits, open_batch, validate
from stratoscope.v1 import batch_pb2 as pb

if TYPE_CHECKING:
    from stratoscope.regional.frame import Block
    from stratoscope.regional.merge import Aggregator, _Window

log = logging.getLogger("stratoscope.regional")

__all__ = ["InstanceLog", "ReplayStats"]

Key = tuple[int, int]  # (window start ns, seal position)

WINDOWS_FILE = "windows.wal"
#: Past this size, windows.wal is rewritten with only the seals still needed.
COMPACT_BYTES = 16 << 20


@dataclass
class ReplayStats:
    batches: int = 0
    #: batches of instances every sink had confirmed (not merged again)
    skipped: int = 0
    #: batches merged into instances sealed before the restart
    restored: int = 0
    invalid: int = 0
    corruption: wal.Corruption = field(default_factory=wal.Corruption)
    seconds: float = 0.0


@dataclass
class _Live:
    late: bool
    segments: dict[int, int]
    #: (block, sink) confirmations still awaited
    outstanding: int = 0
    #: every block of the instance has been queued
    complete: bool = False


class InstanceLog:
    """The merge process's view of the log (see the module docstring). Thread-safe:
    batches are recorded from the ingest reader thread, instances sealed and confirmed
    from the event loop."""

    def __init__(self, directory: Path, sinks: int) -> None:
        self.directory = directory
        self.sinks = sinks
        self._lock = threading.Lock()
        #: batches in each segment that are not part of a done instance
        self._refs: dict[int, int] = {}
        #: every seal the log may still need: key -> (late, done)
        self._seals: dict[Key, tuple[bool, bool]] = {}
        self._live: dict[Key, _Live] = {}
        self._block_key: dict[str, Key] = {}
        #: no segment at or above this is deleted (the ingest process writes it)
        self.active_segment = 0
        self._fd = -1
        self._bytes = 0
        #: For /metrics.
        self.done_instances = 0
        self.deleted_segments = 0
        self.replay_stats = ReplayStats()

    # -- start ----------------------------------------------------------------------
    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / WINDOWS_FILE
        corruption = wal.Corruption()
        for rec in wal.read_records(path, 0, corruption):
            start, seal_pos, late = rec.seal()
            key = (start, seal_pos)
            if rec.kind == wal.SEAL:
                self._seals.setdefault(key, (late, False))
            elif rec.kind == wal.DONE:
                self._seals[key] = (late, True)
        self.replay_stats.corruption = corruption
        existing = wal.segments(self.directory)
        # the ingest process opens a segment above every existing one
        self.active_segment = existing[-1][0] + 1 if existing else 1
        self._rewrite()

    def replay(self, aggregator: Aggregator, limits: Limits) -> ReplayStats:
        """Merge every batch the log holds back into ``aggregator`` (module docstring)."""
        t0 = time.perf_counter()
        stats = self.replay_stats
        by_window: dict[int, list[int]] = {}
        for start, seal_pos in self._seals:
            by_window.setdefault(start, []).append(seal_pos)
        for (start, _), (late, _) in self._seals.items():
            if not late:
                aggregator.mark_closed(start)
        for positions in by_window.values():
            positions.sort()
        for seg, path in wal.segments(self.directory):
            for rec in wal.read_records(path, seg, stats.corruption):
                if rec.kind != wal.BATCH:
                    continue
                stats.batches += 1
                accepted_ns, wire = rec.batch()
                try:
                    whole, inflated = open_batch(pb.Batch.FromString(bytes(wire)), limits)
                    cols = validate(whole, limits, accepted_ns, inflated if inflated >= 0 else len(wire))
                except (BatchRejected, ValueError) as exc:  # not for a batch it accepted
                    stats.invalid += 1
                    log.error("write-ahead log: a batch at %s:%d no longer validates (%s); skipped",
                              path.name, rec.pos & ((1 << wal.SEGMENT_SHIFT) - 1), exc)
                    continue
                ws = aggregator.window_of(cols)
                seals = by_window.get(ws, [])
                i = bisect.bisect_left(seals, rec.pos)
                if i < len(seals):
                    late, done = self._seals[(ws, seals[i])]
                    if done:
                        stats.skipped += 1
                        continue
                    aggregator.restore(cols, rec.pos, seals[i], late)
                    stats.restored += 1
                else:
                    aggregator.record(cols, rec.pos)
                self.recorded(rec.pos)
        stats.seconds = time.perf_counter() - t0
        if stats.batches:
            log.info("write-ahead log replayed: %d batches (%d into %d instances sealed before, %d "
                     "already stored) in %.1fs", stats.batches, stats.restored,
                     sum(1 for _, d in self._seals.values() if not d), stats.skipped, stats.seconds)
        self.collect()
        return stats

    # -- while running ----------------------------------------------------------------
    def recorded(self, pos: int) -> None:
        """A batch at ``pos`` was merged into a window."""
        seg = wal.segment_of(pos)
        with self._lock:
            self._refs[seg] = self._refs.get(seg, 0) + 1
            if seg >= self.active_segment:
                self.active_segment = seg

    def seal(self, windows: Iterable[_Window]) -> None:
        """Seal every window about to be emitted (SEAL records, synced): from here on
        its blocks may reach sinks. Windows restored from the log are sealed already."""
        records = []
        with self._lock:
            for w in windows:
                if not w.max_pos:
                    continue
                if not w.seal_pos:
                    w.seal_pos = w.max_pos
                    records.append(wal.seal_record(w.start_ns, w.seal_pos, w.late))
                    self._seals[(w.start_ns, w.seal_pos)] = (w.late, False)
                live = self._live.setdefault((w.start_ns, w.seal_pos), _Live(w.late, {}))
                live.segments = dict(w.segments)
        if records:
            self._append(b"".join(records), sync=True)

    def emitted(self, blocks: Iterable[Block]) -> None:
        """These blocks are about to be queued to every sink."""
        with self._lock:
            for b in blocks:
                frame = b.frame
                if frame is None or not frame.seal_pos:
                    continue
                key = (frame.start_ns, frame.seal_pos)
                live = self._live.get(key)
                if live is None:
                    continue
                self._block_key[b.block_id] = key
                live.outstanding += self.sinks

    def emission_complete(self, windows: Iterable[_Window]) -> None:
        """Every block of these windows has been queued (or there were none)."""
        done = []
        with self._lock:
            for w in windows:
                key = (w.start_ns, w.seal_pos)
                live = self._live.get(key)
                if live is None:
                    continue
                live.complete = True
                if live.outstanding <= 0:
                    done.append(key)
        self._finish(done)

    def confirmed(self, blocks: Iterable[Block]) -> None:
        """One sink has these blocks for good (delivered or dead-lettered)."""
        done = []
        with self._lock:
            for b in blocks:
                key = self._block_key.get(b.block_id)
                live = self._live.get(key) if key is not None else None
                if key is None or live is None:
                    continue
                live.outstanding -= 1
                if live.complete and live.outstanding <= 0:
                    done.append(key)
        self._finish(done)

    def _finish(self, keys: list[Key]) -> None:
        if not keys:
            return
        records = []
        with self._lock:
            for key in keys:
                live = self._live.pop(key, None)
                if live is None:
                    continue
                self._seals[key] = (live.late, True)
                records.append(wal.done_record(key[0], key[1], live.late))
                for seg, n in live.segments.items():
                    self._refs[seg] = self._refs.get(seg, 0) - n
                self.done_instances += 1
            if self._block_key and len(self._block_key) > 4 * len(self._live) + 100_000:
                live_keys = set(self._live)
                self._block_key = {b: k for b, k in self._block_key.items() if k in live_keys}
        if records:
            self._append(b"".join(records), sync=False)
        self.collect()

    # -- segments -------------------------------------------------------------------------
    def collect(self) -> int:
        """Delete every batch segment the log no longer needs; returns how many."""
        with self._lock:
            doomed = [(seg, p) for seg, p in wal.segments(self.directory)
                      if seg < self.active_segment and self._refs.get(seg, 0) <= 0]
        if not doomed:
            return 0
        if self._fd >= 0:
            os.fsync(self._fd)  # the DONE records that free them come first
        for seg, path in doomed:
            path.unlink(missing_ok=True)
            with self._lock:
                self._refs.pop(seg, None)
        wal.fsync_dir(self.directory)
        self.deleted_segments += len(doomed)
        if self._bytes > COMPACT_BYTES:
            self._rewrite()
        return len(doomed)

    def depth(self) -> tuple[int, int, int]:
        """(segments, bytes, batches not yet stored by every sink) of the log."""
        segs = wal.segments(self.directory)
        size = 0
        for _, p in segs:
            with contextlib.suppress(FileNotFoundError):
                size += p.stat().st_size
        with self._lock:
            batches = sum(n for n in self._refs.values() if n > 0)
        return len(segs), size, batches

    def oldest_live_start_ns(self) -> int | None:
        """The start of the oldest sealed instance not yet confirmed by every sink."""
        with self._lock:
            return min((k[0] for k in self._live), default=None)

    # -- windows.wal ----------------------------------------------------------------------
    def _append(self, data: bytes, sync: bool) -> None:
        if self._fd < 0:
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self._bytes += len(data)
        if sync:
            os.fdatasync(self._fd)

    def _rewrite(self) -> None:
        """Rewrite windows.wal with the seals a replay may still need: those not done,
        and done ones whose batches may still be in a retained segment."""
        segs = wal.segments(self.directory)
        oldest = wal.position(segs[0][0], 0) if segs else wal.position(self.active_segment, 0)
        with self._lock:
            self._seals = {k: v for k, v in self._seals.items() if not v[1] or k[1] >= oldest}
            records = []
            for (start, pos), (late, done) in sorted(self._seals.items(), key=lambda kv: kv[0][1]):
                records.append(wal.seal_record(start, pos, late))
                if done:
                    records.append(wal.done_record(start, pos, late))
        path = self.directory / WINDOWS_FILE
        tmp = path.with_suffix(".tmp")
        data = b"".join(records)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        wal.fsync_dir(self.directory)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._bytes = len(data)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            wal.close_synced(fd)
