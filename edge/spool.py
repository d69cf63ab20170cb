"""The edge's bounded on-disk spool: every batch is written here before it is sent, and
leaves only when a regional has answered it for good (ACCEPTED, DUPLICATE or REJECTED).

Why on disk: a regional may be down for hours (an upgrade, a zone outage) and an edge
may restart meanwhile (a kernel update, an OOM kill); batches kept in memory were lost
either way. A batch here survives both and is resent, in order, with its original
identity (node_id, boot_id, seq are inside the stored bytes), so the regional's
de-duplication by that identity makes a resend harmless.

Layout: append-only segment files ``spool-000001.log``, ``spool-000002.log``, ... in one
directory. Each record is framed as

    u32 payload length | u32 CRC32 of (type byte + payload) | u8 type | payload

with three types: BATCH (written time, boot_id, seq, the serialized ``pb.Batch`` as the
forwarder sends it, already sealed), ACK (boot_id, seq: answered, or dropped) and SENT
(time, boot_id, seq, target: the regional the batch was first sent to; an empty target
frees it again, see edge/forward.py for why the target must survive a restart).

Durability: a BATCH and a SENT are fsync'd when appended (one batch per interval, so
this is cheap); an ACK is written but not fsync'd: losing one to a power cut only
resends a batch the regional then answers DUPLICATE.

Segments rotate at ``segment_bytes``. A segment is deleted once every BATCH in it is
answered and it is not the one being written; ACK and SENT records it holds about
batches of older, still present segments are first copied to the active segment, so
the rebuilt state after a restart is the same whichever segments were deleted.

Start: the segments are read in order and the unanswered batches rebuilt. A record
that is torn (a tail cut short by a SIGKILL or a power cut) or corrupt (bad length, bad
CRC, unknown type) ends the reading of its segment: the rest of that segment is skipped
and counted (``corrupt_records`` once per segment, ``corrupt_bytes``), the batches before
it are kept, and the edge starts anyway. New records always go to a fresh segment, never
after a damaged tail.

Limits: ``max_bytes`` bounds the bytes of unanswered batch records, ``max_age_s`` their
age. Past either, the OLDEST batch is dropped and counted by reason ("full", "age");
drops are logged at most once per 10 s with the number folded. Disk use can exceed
``max_bytes`` by the answered records of segments that still hold an unanswered batch
(at most a segment each; in practice one or two segments).

With ``directory=None`` the same bookkeeping runs in memory only (nothing survives a
restart): what library users and tests that do not care about restarts get. The
``stratoscope edge`` command always gives a directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("stratoscope.edge.spool")

#: A batch's identity within a node: (boot_id, seq).
Key = tuple[str, int]

BATCH, ACK, SENT = 1, 2, 3
_HEAD = struct.Struct("<IIB")
_KEY = struct.Struct("<H")
_SEQ = struct.Struct("<Q")
_TIME = struct.Struct("<d")
#: Larger than any batch a regional takes (32 MiB on the wire): a longer length is corrupt.
MAX_RECORD = 64 << 20
_NAME = re.compile(r"^spool-(\d{6,})\.log$")
#: Reasons a batch leaves the spool unanswered (the label values of the drop counter).
DROP_REASONS = ("full", "age", "corrupt", "unwritable")
#: Drops are logged at most this often, the number folded.
DROP_LOG_EVERY_S = 10.0

DEFAULT_MAX_BYTES = 256 << 20
DEFAULT_MAX_AGE_S = 24 * 3600.0
DEFAULT_SEGMENT_BYTES = 8 << 20


def _frame(kind: int, payload: bytes) -> bytes:
    return _HEAD.pack(len(payload), zlib.crc32(payload, zlib.crc32(bytes([kind]))), kind) + payload


def _key_bytes(key: Key) -> bytes:
    boot = key[0].encode()
    return _KEY.pack(len(boot)) + boot + _SEQ.pack(key[1])


def _read_key(buf: bytes, pos: int) -> tuple[Key, int]:
    (n,) = _KEY.unpack_from(buf, pos)
    pos += _KEY.size
    boot = buf[pos:pos + n].decode()
    pos += n
    (seq,) = _SEQ.unpack_from(buf, pos)
    return (boot, seq), pos + _SEQ.size


def segment_name(number: int) -> str:
    return f"spool-{number:06d}.log"


@dataclass
class _Entry:
    seg: int
    #: Where the BATCH record starts in its segment, and its size (header included).
    offset: int
    size: int
    written_s: float
    #: The regional it was first sent to and not yet answered by ("": not in doubt).
    target: str = ""
    sent_s: float = 0.0
    data: bytes | None = None  # memory mode only


@dataclass
class _Segment:
    size: int = 0
    #: Unanswered batches stored in this segment.
    live: int = 0
    #: Keys this segment holds ACK or SENT records about (to carry over when deleted).
    refs: list[Key] = field(default_factory=list)


class SpoolError(OSError):
    """The spool directory cannot be used (message says why)."""


class Spool:
    """Not thread-safe: the forwarder calls it under its own lock."""

    def __init__(self, directory: Path | None, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_age_s: float = DEFAULT_MAX_AGE_S, segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        #: A segment never exceeds a quarter of the limit (rotation before appending).
        self.segment_bytes = max(1, min(segment_bytes, max_bytes // 4))
        self.clock = clock
        self._entries: dict[Key, _Entry] = {}  # insertion order = spool order
        #: Answered batches whose segment still exists: key -> segment.
        self._done: dict[Key, int] = {}
        self._segs: dict[int, _Segment] = {}
        self._active: int | None = None
        self._fd: int | None = None
        self._next = 1
        self._lock_fd: int | None = None
        self._collecting = False
        self.depth_bytes = 0
        self.dropped: Counter[str] = Counter()
        self.corrupt_records = 0
        self.corrupt_bytes = 0
        #: Unanswered batches found at start.
        self.replayed = 0
        self._drop_unlogged: Counter[str] = Counter()
        self._drop_logged_at = float("-inf")
        if directory is not None:
            self._open_dir(directory)
            try:
                self._replay()
            except OSError as exc:
                self.close()
                raise SpoolError(f"spool directory {directory}: cannot read it: {exc}") from None
            self.replayed = len(self._entries)
            self._collect_segments()
        self.expire()

    # -- public ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def pending(self) -> list[Key]:
        """Unanswered batches, oldest first."""
        return list(self._entries)

    def targets(self) -> Iterator[tuple[Key, str, float]]:
        """(key, target, first sent) of the unanswered batches, oldest first, without a
        copy: the caller stops early and changes nothing but targets meanwhile."""
        for key, e in self._entries.items():
            yield key, e.target, e.sent_s

    def target(self, key: Key) -> tuple[str, float]:
        """(the regional ``key`` is in doubt at, or "", when it was first sent there)."""
        e = self._entries[key]
        return e.target, e.sent_s

    def in_doubt(self) -> int:
        return sum(1 for e in self._entries.values() if e.target)

    def oldest_age_s(self) -> float:
        if not self._entries:
            return 0.0
        first = next(iter(self._entries.values()))
        return max(0.0, self.clock() - first.written_s)

    def disk_bytes(self) -> int:
        return sum(s.size for s in self._segs.values())

    def segments(self) -> list[int]:
        return sorted(self._segs)

    def append(self, key: Key, data: bytes) -> None:
        """Store a batch (fsync'd) before it is sent; then apply the limits."""
        if key in self._entries:
            return
        now = self.clock()
        payload = _TIME.pack(now) + _key_bytes(key) + data
        if len(payload) > MAX_RECORD:
            raise ValueError(f"batch of {len(data)} bytes is larger than a spool record")
        seg, offset, size = self._write(BATCH, payload, sync=True)
        self._entries[key] = _Entry(seg, offset, size, now,
                                    data=data if self.directory is None else None)
        self._segs[seg].live += 1
        self.depth_bytes += size
        self._enforce(now)

    def read(self, key: Key) -> bytes | None:
        """The stored batch bytes; None (and dropped as "corrupt") if the record no longer
        reads back with its CRC."""
        e = self._entries[key]
        if e.data is not None:
            return e.data
        assert self.directory is not None
        with open(self.directory / segment_name(e.seg), "rb") as f:
            f.seek(e.offset)
            rec = f.read(e.size)
        parsed = _parse(rec, 0)
        if parsed is None or parsed[0] != BATCH:
            self._drop(key, "corrupt")
            return None
        _, payload, _ = parsed
        _, pos = _read_key(payload, _TIME.size)
        return payload[pos:]

    def ack(self, key: Key) -> bool:
        """The batch was answered for good: forget it. False if it was not here."""
        if key not in self._entries:
            return False
        self._write(ACK, _key_bytes(key), sync=False, ref=key)
        self._forget(key)
        self._collect_segments()
        return True

    def mark_sent(self, key: Key, target: str) -> None:
        """Record (fsync'd) that ``key`` goes to ``target`` and is in doubt there until it
        answers; ``target=""`` frees it. No record if nothing changes."""
        e = self._entries[key]
        if e.target == target:
            return
        now = self.clock()
        t = target.encode()
        self._write(SENT, _TIME.pack(now) + _key_bytes(key) + _KEY.pack(len(t)) + t,
                    sync=True, ref=key)
        e.target, e.sent_s = target, now

    def expire(self) -> None:
        """Apply the age limit now (also done on each append), and log folded drops."""
        self._enforce(self.clock())

    def close(self) -> None:
        """Close the active segment (deleted too if every batch in it was answered)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._active = None
        with contextlib.suppress(OSError):
            self._collect_segments(carry=False)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- limits ----------------------------------------------------------------------
    def _enforce(self, now: float) -> None:
        while self._entries and self.depth_bytes > self.max_bytes:
            self._drop(next(iter(self._entries)), "full")
        while self._entries:
            key, first = next(iter(self._entries.items()))
            if now - first.written_s <= self.max_age_s:
                break
            self._drop(key, "age")
        self._log_drops(now)

    def _drop(self, key: Key, reason: str) -> None:
        with contextlib.suppress(OSError):  # if so, it reappears at the next start, and goes again
            self._write(ACK, _key_bytes(key), sync=False, ref=key)
        self._forget(key)
        self.dropped[reason] += 1
        self._drop_unlogged[reason] += 1
        self._collect_segments()

    def drop_unwritable(self) -> None:
        """Count a batch that could not be written at all (the forwarder's append failed)."""
        self.dropped["unwritable"] += 1
        self._drop_unlogged["unwritable"] += 1
        self._log_drops(self.clock())

    def _log_drops(self, now: float) -> None:
        if not self._drop_unlogged or now - self._drop_logged_at < DROP_LOG_EVERY_S:
            return
        parts = ", ".join(f"{n} {r}" for r, n in sorted(self._drop_unlogged.items()))
        log.warning("spool dropped %d unanswered batches, oldest first (%s); limits: %d bytes, "
                    "%.0f s", sum(self._drop_unlogged.values()), parts, self.max_bytes, self.max_age_s)
        self._drop_unlogged.clear()
        self._drop_logged_at = now

    # -- bookkeeping -----------------------------------------------------------------
    def _forget(self, key: Key) -> None:
        e = self._entries.pop(key)
        self.depth_bytes -= e.size
        seg = self._segs.get(e.seg)
        if seg is not None:
            seg.live -= 1
            if self.directory is not None:
                self._done[key] = e.seg

    def _collect_segments(self, carry: bool = True) -> None:
        """Delete every segment with no unanswered batch that is not being written,
        carrying over its ACK/SENT records about batches of segments that stay."""
        if self._collecting:  # a rotation while copying records: the next call deletes it
            return
        self._collecting = True
        try:
            for number in sorted(self._segs):
                seg = self._segs[number]
                if not seg.live and number != self._active:
                    self._delete_segment(number, seg, carry)
        finally:
            self._collecting = False

    def _delete_segment(self, number: int, seg: _Segment, carry: bool = True) -> None:
        """Delete a segment, first copying the records other segments still need; with
        ``carry=False`` (at close: no segment is open) a segment that needs copies stays."""
        keep: list[tuple[int, Key]] = []
        for key in dict.fromkeys(seg.refs):
            e = self._entries.get(key)
            if e is not None and e.seg != number:  # its current target, "" (freed) too
                keep.append((SENT, key))
            elif e is None and self._done.get(key, number) != number:
                keep.append((ACK, key))
        if keep and not carry:
            return
        for kind, key in keep:
            if kind == ACK:
                self._write(ACK, _key_bytes(key), sync=False, ref=key)
            else:
                e = self._entries[key]
                t = e.target.encode()
                self._write(SENT, _TIME.pack(e.sent_s) + _key_bytes(key) + _KEY.pack(len(t)) + t,
                            sync=False, ref=key)
        if keep and self._fd is not None:
            os.fsync(self._fd)  # the copies are durable before the originals go
        del self._segs[number]
        self._done = {k: s for k, s in self._done.items() if s != number}
        if self.directory is not None:
            (self.directory / segment_name(number)).unlink(missing_ok=True)

    # -- files -----------------------------------------------------------------------
    def _open_dir(self, directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"spool directory {directory}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise SpoolError(f"spool directory {directory} is in use by another edge") from None
        if not os.access(directory, os.W_OK):
            raise SpoolError(f"spool directory {directory}: not writable")

    def _write(self, kind: int, payload: bytes, sync: bool, ref: Key | None = None) -> tuple[int, int, int]:
        """Append one record to the active segment (rotating first if it is full):
        (segment, offset, record size)."""
        rec = _frame(kind, payload)
        if self._active is not None and self._segs[self._active].size >= self.segment_bytes:
            self._rotate()
        if self._active is None:
            self._start_segment()
        assert self._active is not None
        seg = self._segs[self._active]
        offset = seg.size
        if self._fd is not None:
            try:
                os.write(self._fd, rec)
                if sync:
                    os.fsync(self._fd)
            except OSError:
                # a part may be on disk: nothing more goes after it
                seg.size += len(rec)
                self._rotate()
                raise
        seg.size += len(rec)
        if ref is not None:
            seg.refs.append(ref)
        return self._active, offset, len(rec)

    def _start_segment(self) -> None:
        number = self._next
        self._next += 1
        if self.directory is not None:
            self._fd = os.open(self.directory / segment_name(number),
                               os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)  # the new name survives a power cut
            finally:
                os.close(dfd)
        self._segs[number] = _Segment()
        self._active = number

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._active = None
        self._collect_segments()

    def _replay(self) -> None:
        assert self.directory is not None
        numbers = sorted(int(m.group(1)) for p in self.directory.iterdir()
                         if (m := _NAME.match(p.name)))
        for number in numbers:
            buf = (self.directory / segment_name(number)).read_bytes()
            seg = self._segs[number] = _Segment(size=len(buf))
            pos = 0
            while pos < len(buf):
                parsed = _parse(buf, pos)
                if parsed is None:
                    self.corrupt_records += 1
                    self.corrupt_bytes += len(buf) - pos
                    log.warning("spool segment %s: corrupt or torn record at byte %d; skipped "
                                "the last %d bytes", segment_name(number), pos, len(buf) - pos)
                    break
                kind, payload, end = parsed
                self._apply(number, seg, kind, payload, pos, end - pos)
                pos = end
        self._next = (numbers[-1] + 1) if numbers else 1

    def _apply(self, number: int, seg: _Segment, kind: int, payload: bytes, offset: int,
               size: int) -> None:
        if kind == BATCH:
            (written,) = _TIME.unpack_from(payload, 0)
            key, _ = _read_key(payload, _TIME.size)
            if key in self._entries or key in self._done:
                return
            self._entries[key] = _Entry(number, offset, size, written)
            seg.live += 1
            self.depth_bytes += size
        elif kind == ACK:
            key, _ = _read_key(payload, 0)
            seg.refs.append(key)
            if key in self._entries:
                self._forget(key)
        else:
            (sent,) = _TIME.unpack_from(payload, 0)
            key, pos = _read_key(payload, _TIME.size)
            (n,) = _KEY.unpack_from(payload, pos)
            target = payload[pos + _KEY.size:pos + _KEY.size + n].decode()
            seg.refs.append(key)
            e = self._entries.get(key)
            if e is not None:
                e.target, e.sent_s = target, sent


def _parse(buf: bytes, pos: int) -> tuple[int, bytes, int] | None:
    """(type, payload, end) of the record at ``pos``, or None if it is torn or corrupt."""
    if len(buf) - pos < _HEAD.size:
        return None
    length, crc, kind = _HEAD.unpack_from(buf, pos)
    start = pos + _HEAD.size
    if length > MAX_RECORD or start + length > len(buf) or kind not in (BATCH, ACK, SENT):
        return None
    payload = bytes(buf[start:start + length])
    if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
        return None
    try:  # a record with a valid CRC whose fields do not parse is corrupt too
        if kind == BATCH:
            _read_key(payload, _TIME.size)
        elif kind == ACK:
            _read_key(payload, 0)
        else:
            _, p = _read_key(payload, _TIME.size)
            _KEY.unpack_from(payload, p)
    except (struct.error, UnicodeDecodeError):
        return None
    return kind, payload, start + length
