"""The regional's write-ahead log on disk: record framing, segments, and reading them back.

Why: the regional acknowledges a batch only once the batch is in this log (an fsync,
shared by every batch that arrived meanwhile: regional/walwriter.py). Everything after
the acknowledgement -- open windows, the window being reduced, the sinks' queues --
lives in memory and is rebuilt from the log after a crash (regional/instances.py).

Two kinds of file share one record framing, in one directory:

- ``batches-<segment>.wal``: written by the ingest process only. A segment starts with a
  CHECKPOINT record (the de-duplication state of everything logged before it), then
  BATCH records: the batch's wire bytes as received, with the time it was accepted.
  A record's *position* is ``segment << 40 | offset``: it orders every record ever
  logged, across restarts (a start opens a new segment, numbered above the last).
- ``windows.wal``: written by the merge process only. SEAL records (a window instance
  closed: window start, and the position of the last batch in it) and DONE records
  (every sink confirmed every block of that instance).

A record is ``length u32 | crc32 u32 | type u8 | payload``; the CRC covers type and
payload. A torn or corrupt record ends the reading of its file (everything after it in
that file is skipped and counted): a crash can only tear the tail, and a segment is
never appended to after a restart.

Batch segments are *preallocated*: written full of zeros and synced before they are
used (``prepare_spare``, off the acknowledgement path), then overwritten in place. An
fdatasync of an append must also commit the file's new size, a journal commit that on
ext4 waits for every other file's pending data (ClickHouse's parts, on a shared disk):
hundreds of milliseconds. Overwriting allocated blocks needs no journal commit
(docs/BENCHMARKS.md, "Write-ahead log fsync"). A record header of zeros followed by
nothing but zeros is the clean end of a preallocated segment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stratoscope.regional.dedup import Deduplicator

log = logging.getLogger("stratoscope.regional")

__all__ = [
    "BATCH", "CHECKPOINT", "DONE", "SEAL", "SPARE_NAME", "Corruption", "LogRecord", "position",
    "prepare_spare", "read_records", "segment_of", "segment_path", "segments", "take_spare",
]

CHECKPOINT = 1
BATCH = 2
SEAL = 3
DONE = 4

_HEAD = struct.Struct("<IIB")
_BATCH_HEAD = struct.Struct("<Q")  # accepted at (ns)
_SEAL = struct.Struct("<qQ?")  # window start (ns), seal position, late
#: A record larger than this is corruption (a batch is at most 32 MiB on the wire).
MAX_RECORD = 64 << 20
SEGMENT_SHIFT = 40
_SEGMENT_NAME = re.compile(r"^batches-(\d{12})\.wal$")
#: A zero-filled, synced file waiting to become the next batch segment (not a segment:
#: ``segments`` does not list it).
SPARE_NAME = "batches-spare.wal.ready"
_SPARE_TMP = "batches-spare.wal.tmp"
_ZERO_HEAD = bytes(_HEAD.size)


def position(segment: int, offset: int) -> int:
    return segment << SEGMENT_SHIFT | offset


def segment_of(pos: int) -> int:
    return pos >> SEGMENT_SHIFT


def segment_path(directory: Path, segment: int) -> Path:
    return directory / f"batches-{segment:012d}.wal"


def segments(directory: Path) -> list[tuple[int, Path]]:
    """The batch segments in ``directory``, oldest first."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for p in directory.iterdir():
            m = _SEGMENT_NAME.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
    return sorted(out)


def frame(kind: int, payload: bytes | memoryview) -> bytes:
    """One record, framed."""
    crc = zlib.crc32(payload, zlib.crc32(bytes((kind,))))
    return _HEAD.pack(len(payload), crc, kind) + bytes(payload)


def batch_record(accepted_ns: int, wire: bytes | memoryview) -> bytes:
    """A BATCH record, built with one copy of the batch's bytes (on the ingest path)."""
    head = _BATCH_HEAD.pack(accepted_ns)
    crc = zlib.crc32(wire, zlib.crc32(head, zlib.crc32(bytes((BATCH,)))))
    return b"".join((_HEAD.pack(len(head) + len(wire), crc, BATCH), head, wire))


def seal_record(start_ns: int, seal_pos: int, late: bool) -> bytes:
    return frame(SEAL, _SEAL.pack(start_ns, seal_pos, late))


def done_record(start_ns: int, seal_pos: int, late: bool) -> bytes:
    return frame(DONE, _SEAL.pack(start_ns, seal_pos, late))


def checkpoint_record(state: list[tuple[str, str, int, list[int]]]) -> bytes:
    """The de-duplication state (regional/dedup.py ``Deduplicator.state``) as JSON."""
    return frame(CHECKPOINT, json.dumps(state, separators=(",", ":")).encode())


@dataclass
class Corruption:
    """What reading skipped: records and bytes after a torn or corrupt record."""

    records: int = 0
    bytes: int = 0
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LogRecord:
    kind: int
    #: ``position(segment, offset)`` of the record (offset within its file)
    pos: int
    payload: memoryview

    def batch(self) -> tuple[int, memoryview]:
        """A BATCH record's (accepted_ns, wire bytes)."""
        (accepted,) = _BATCH_HEAD.unpack_from(self.payload)
        return accepted, self.payload[_BATCH_HEAD.size:]

    def seal(self) -> tuple[int, int, bool]:
        """A SEAL or DONE record's (window start ns, seal position, late)."""
        start, pos, late = _SEAL.unpack(self.payload)
        return start, pos, late

    def checkpoint(self) -> list[tuple[str, str, int, list[int]]]:
        return [(n, b, int(f), list(a)) for n, b, f, a in json.loads(bytes(self.payload))]


def read_records(path: Path, segment: int, corruption: Corruption) -> Iterator[LogRecord]:
    """Every intact record of one file, in order; stops at the first torn or corrupt one
    and adds what it skipped to ``corruption`` (and logs it)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return
    data = memoryview(raw)
    off = 0
    n = len(data)
    while off < n:
        bad = ""
        if data[off:off + _HEAD.size] == _ZERO_HEAD or (n - off < _HEAD.size and not any(data[off:])):
            if raw.count(0, off) == n - off:
                return  # the unused, zero-filled rest of a preallocated segment
            bad = "a zeroed record header followed by data"
        elif n - off < _HEAD.size:
            bad = "a torn record header"
        else:
            length, crc, kind = _HEAD.unpack_from(data, off)
            end = off + _HEAD.size + length
            if length > MAX_RECORD or end > n:
                bad = f"a record of {length} bytes past the end of the file"
            else:
                payload = data[off + _HEAD.size:end]
                if zlib.crc32(payload, zlib.crc32(bytes((kind,)))) != crc:
                    bad = "a checksum mismatch"
                elif kind not in (CHECKPOINT, BATCH, SEAL, DONE):
                    bad = f"an unknown record type {kind}"
        if bad:
            skipped = n - off
            corruption.records += 1
            corruption.bytes += skipped
            corruption.files.append(path.name)
            log.error("write-ahead log %s: %s at offset %d; skipping its last %d bytes",
                      path, bad, off, skipped)
            return
        yield LogRecord(kind, position(segment, off), payload)
        off = end


def prepare_spare(directory: Path, size: int) -> bool:
    """Leave a zero-filled, synced file of ``size`` bytes at ``SPARE_NAME`` for the next
    segment (unless one of that size is there); False if the disk refused (the writer
    then appends to an unprepared segment). Runs in a thread of its own."""
    ready = directory / SPARE_NAME
    with contextlib.suppress(FileNotFoundError):
        if ready.stat().st_size == size:
            return True
        ready.unlink()
    tmp = directory / _SPARE_TMP
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            zeros = bytes(1 << 20)
            left = size
            while left > 0:
                left -= os.write(fd, zeros[:min(left, len(zeros))])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, ready)
        fsync_dir(directory)
        return True
    except OSError as exc:
        log.warning("write-ahead log: cannot prepare the next segment in %s (%s); "
                    "appending to an unprepared one", directory, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False


def take_spare(directory: Path, path: Path) -> bool:
    """Rename the prepared spare to ``path`` (a new segment); False if there is none."""
    try:
        os.rename(directory / SPARE_NAME, path)
    except FileNotFoundError:
        return False
    return True


def fsync_dir(directory: Path) -> None:
    """Make a file's creation, rename or deletion in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _identity(wire: memoryview) -> tuple[str, str, int]:
    from stratoscope.v1 import batch_pb2 as pb

    b = pb.Batch.FromString(bytes(wire))
    return b.node_id, b.boot_id, b.seq


def seen_batches(directory: Path) -> Deduplicator:
    """Which batches the log says were taken: the newest intact checkpoint, plus every
    BATCH record from its segment on (what the ingest process answers DUPLICATE)."""
    from stratoscope.regional.dedup import Deduplicator

    dedup = Deduplicator()
    segs = segments(directory)
    start = 0
    corruption = Corruption()
    for i in range(len(segs) - 1, -1, -1):
        seg, path = segs[i]
        first = next(iter(read_records(path, seg, corruption)), None)
        if first is not None and first.kind == CHECKPOINT:
            dedup.load(first.checkpoint())
            start = i
            break
    for seg, path in segs[start:]:
        for rec in read_records(path, seg, corruption):
            if rec.kind == BATCH:
                dedup.add(*_identity(rec.batch()[1]))
    return dedup


def close_synced(fd: int) -> None:
    """fsync and close a log file (closed even if the fsync fails, which then raises)."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
