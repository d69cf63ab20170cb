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
    "BATCH", "CHECKPOINT", "DONE", "SEAL", "Corruption", "LogRecord", "position", "read_records",
    "segment_of", "segment_path", "segments",
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
        data = memoryview(path.read_bytes())
    except FileNotFoundError:
        return
    off = 0
    n = len(data)
    while off < n:
        bad = ""
        if n - off < _HEAD.size:
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
