"""The regional's write-ahead log (regional/wal.py, walwriter.py, instances.py): framing,
torn and corrupt records, de-duplication through checkpoints, and rebuilding window
instances with the same block identities after a restart."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from stratoscope.edge.batch import BatchBuilder
from stratoscope.edge.decode import Histogram
from stratoscope.regional import wal
from stratoscope.regional.dedup import Deduplicator
from stratoscope.regional.instances import InstanceLog
from stratoscope.regional.merge import Aggregator, MergeSettings
from stratoscope.regional.validate import Limits
from stratoscope.regional.walwriter import WalWriter
from stratoscope.v1 import batch_pb2 as pb

NS = 1_000_000_000
MINUTE = (time.time_ns() // (60 * NS) - 5) * 60 * NS  # a closed minute


def batch(node: str, seq: int, read: int, minute: int = MINUTE, boot: str = "b1") -> pb.Batch:
    end = minute + 10 * NS * (1 + (seq - 1) % 6)
    b = BatchBuilder(node, boot, seq, end - 10 * NS, end, {})
    b.add_counters("syscalls_total", "calls", "h", ["syscall"], {("read",): read})
    b.add_histograms("syscall_latency", "ns", "h", ["syscall"], {("read",): Histogram({3: read}, count=read, sum=read)})
    return b.build()


def log_batches(directory: Path, batches: list[pb.Batch], segment_bytes: int = 64 << 20,
                dedup: Deduplicator | None = None) -> list[int]:
    """Append ``batches`` with a real writer; their positions, in order."""
    writer = WalWriter(directory, dedup or Deduplicator(), segment_bytes=segment_bytes)
    writer.start()
    positions: list[int | None] = []
    done = threading.Event()

    def on_done(pos: int | None) -> None:
        positions.append(pos)
        if len(positions) == len(batches):
            done.set()

    for b in batches:
        writer.append(wal.batch_record(time.time_ns(), b.SerializeToString()), (b.node_id, b.boot_id, b.seq), on_done)
    assert done.wait(30)
    writer.close()
    assert None not in positions
    return [p for p in positions if p is not None]


def test_positions_grow_in_append_order_and_a_restart_opens_a_new_segment(tmp_path: Path) -> None:
    first = log_batches(tmp_path, [batch("n1", s, 1) for s in (1, 2, 3)])
    assert first == sorted(first) and len(set(first)) == 3
    assert {wal.segment_of(p) for p in first} == {1}
    again = log_batches(tmp_path, [batch("n1", 4, 1)])
    assert wal.segment_of(again[0]) == 2
    corruption = wal.Corruption()
    kinds = [r.kind for seg, path in wal.segments(tmp_path) for r in wal.read_records(path, seg, corruption)]
    assert kinds == [wal.CHECKPOINT, wal.BATCH, wal.BATCH, wal.BATCH, wal.CHECKPOINT, wal.BATCH]
    assert corruption.records == 0


def test_segments_rotate_and_checkpoints_remember_deleted_segments(tmp_path: Path) -> None:
    # tiny segments: every group of records opens a new one
    log_batches(tmp_path, [batch("n1", s, 1) for s in range(1, 9)], segment_bytes=1)
    segs = wal.segments(tmp_path)
    assert len(segs) >= 2
    for _, path in segs[:-1]:  # what the regional deletes once every sink has it
        path.unlink()
    seen = wal.seen_batches(tmp_path)
    assert all(seen.seen("n1", "b1", s) for s in range(1, 9))
    assert not seen.seen("n1", "b1", 9)


def test_a_torn_tail_and_a_corrupt_record_are_skipped_and_counted(tmp_path: Path) -> None:
    log_batches(tmp_path, [batch("n1", s, 1) for s in (1, 2, 3)])
    (seg, path), = wal.segments(tmp_path)
    data = path.read_bytes()
    records = list(wal.read_records(path, seg, wal.Corruption()))
    last = records[-1].pos & ((1 << wal.SEGMENT_SHIFT) - 1)
    path.write_bytes(data[:-7])  # a crash tore the last record
    c = wal.Corruption()
    assert [r.kind for r in wal.read_records(path, seg, c)] == [wal.CHECKPOINT, wal.BATCH, wal.BATCH]
    assert (c.records, c.bytes) == (1, len(data) - 7 - last)
    second = records[2].pos & ((1 << wal.SEGMENT_SHIFT) - 1)
    flipped = bytearray(data)
    flipped[second + 20] ^= 0xFF  # a bad byte inside the second batch
    path.write_bytes(bytes(flipped))
    c = wal.Corruption()
    assert [r.kind for r in wal.read_records(path, seg, c)] == [wal.CHECKPOINT, wal.BATCH]
    assert (c.records, c.bytes) == (1, len(data) - second)
    assert wal.seen_batches(tmp_path).seen("n1", "b1", 1)
    assert not wal.seen_batches(tmp_path).seen("n1", "b1", 2)


def test_dedup_state_round_trips_and_forget_undoes_one_batch() -> None:
    d = Deduplicator()
    for s in (1, 2, 3, 7):
        d.add("n", "b", s)
    e = Deduplicator()
    e.load(d.state())
    assert [e.seen("n", "b", s) for s in range(1, 9)] == [True, True, True, False, False, False, True, False]
    e.forget("n", "b", 2)
    assert [e.seen("n", "b", s) for s in range(1, 9)] == [True, False, True, False, False, False, True, False]
    e.forget("n", "b", 7)
    assert not e.seen("n", "b", 7)


def _settings() -> MergeSettings:
    return MergeSettings(resolution_s=60, lateness_s=0, rollups=())


def test_instances_done_delete_segments_and_a_restart_rebuilds_the_same_blocks(tmp_path: Path) -> None:
    # window 1 (n1, n2) and window 2 (n1), logged in segments of their own
    w1 = [batch("n1", 1, 5), batch("n2", 1, 7), batch("n1", 2, 11)]
    w2 = [batch("n1", 7, 13, minute=MINUTE + 60 * NS)]
    pos1 = log_batches(tmp_path, w1)
    pos2 = log_batches(tmp_path, w2)
    agg = Aggregator(_settings())
    inst = InstanceLog(tmp_path, sinks=1)
    inst.open()
    assert inst.replay(agg, Limits()).batches == 4  # the log is replayed into the merge
    due = agg.take_due(time.time_ns())
    assert [w.start_ns for w in due] == [MINUTE, MINUTE + 60 * NS]
    inst.seal(due)
    assert [w.seal_pos for w in due] == [pos1[-1], pos2[-1]]
    blocks = [list(agg.emit([w])) for w in due]
    ids = [sorted(b.block_id for b in bl) for bl in blocks]
    for bl in blocks:
        inst.emitted(bl)
    inst.emission_complete(due)
    inst.active_segment = 3
    # the first window confirmed: its segment goes, the second's stays
    inst.confirmed(blocks[0])
    assert [s for s, _ in wal.segments(tmp_path)] == [2]
    inst.close()

    # a crash before the second window was confirmed: a restart re-emits exactly it,
    # with the same block ids, and skips the first
    agg2 = Aggregator(_settings())
    inst2 = InstanceLog(tmp_path, sinks=1)
    inst2.open()
    stats = inst2.replay(agg2, Limits())
    assert (stats.batches, stats.restored, stats.skipped) == (1, 1, 0)
    due2 = agg2.take_due(0)  # sealed instances come back at once, whatever the time
    assert [(w.start_ns, w.seal_pos) for w in due2] == [(MINUTE + 60 * NS, pos2[-1])]
    inst2.seal(due2)
    again = list(agg2.emit(due2))
    assert sorted(b.block_id for b in again) == ids[1]
    inst2.emitted(again)
    inst2.emission_complete(due2)
    inst2.confirmed(again)
    assert wal.segments(tmp_path) == []  # everything stored: nothing kept
    inst2.close()


def test_a_replay_does_not_count_a_confirmed_instance_twice(tmp_path: Path) -> None:
    """A segment is kept while any of its batches is unconfirmed; the confirmed batches in
    it are skipped at replay, not merged again."""
    batches = [batch("n1", 1, 5), batch("n1", 7, 13, minute=MINUTE + 60 * NS)]
    log_batches(tmp_path, batches)  # both in one segment
    agg = Aggregator(_settings())
    inst = InstanceLog(tmp_path, sinks=2)
    inst.open()
    inst.replay(agg, Limits())
    due = agg.take_due(time.time_ns())
    inst.seal(due)
    first = list(agg.emit([due[0]]))
    second = list(agg.emit([due[1]]))
    inst.emitted(first)
    inst.emitted(second)
    inst.emission_complete(due)
    inst.confirmed(first)
    inst.confirmed(first)  # both sinks have the first window
    inst.confirmed(second)  # one sink has the second
    assert len(wal.segments(tmp_path)) == 1
    inst.close()
    agg2 = Aggregator(_settings())
    inst2 = InstanceLog(tmp_path, sinks=2)
    inst2.open()
    stats = inst2.replay(agg2, Limits())
    assert (stats.batches, stats.skipped, stats.restored) == (2, 1, 1)
    assert [w.start_ns for w in agg2.take_due(0)] == [MINUTE + 60 * NS]
    inst2.close()


@pytest.mark.parametrize("fsync", ["ack", "interval"])
def test_a_writer_on_a_missing_directory_fails_every_append(tmp_path: Path, fsync: str) -> None:
    writer = WalWriter(tmp_path / "log", Deduplicator(), fsync=fsync)  # type: ignore[arg-type]
    writer.start()
    writer.close()
    got: list[int | None] = []
    writer.append(b"x", ("n", "b", 1), got.append)
    assert got == [None]


def test_a_prepared_segment_is_overwritten_in_place_and_reads_to_its_last_record(tmp_path: Path) -> None:
    seg_bytes = 256 * 1024
    assert wal.prepare_spare(tmp_path, seg_bytes)
    assert wal.segments(tmp_path) == []  # a spare is not a segment
    writer = WalWriter(tmp_path, Deduplicator(), segment_bytes=seg_bytes)
    writer.start()
    try:
        assert writer.prepared  # the first segment took the spare
        done = threading.Event()
        got: list[int | None] = []
        b = batch("n1", 1, 5)

        def on_done(pos: int | None) -> None:
            got.append(pos)
            done.set()

        writer.append(wal.batch_record(time.time_ns(), b.SerializeToString()), ("n1", "b1", 1), on_done)
        assert done.wait(30) and got[0] is not None
        (seg, path), = wal.segments(tmp_path)
        assert path.stat().st_size == seg_bytes  # written in place, not appended
        c = wal.Corruption()
        assert [r.kind for r in wal.read_records(path, seg, c)] == [wal.CHECKPOINT, wal.BATCH]
        assert (c.records, c.bytes) == (0, 0)  # the zeros after it are the clean end
    finally:
        writer.close()


def test_data_after_a_zeroed_header_is_corruption(tmp_path: Path) -> None:
    log_batches(tmp_path, [batch("n1", s, 1) for s in (1, 2)])
    (seg, path), = wal.segments(tmp_path)
    data = path.read_bytes()
    end = len(data)
    path.write_bytes(data + bytes(100) + b"\x01" + bytes(50))
    c = wal.Corruption()
    assert [r.kind for r in wal.read_records(path, seg, c)] == [wal.CHECKPOINT, wal.BATCH, wal.BATCH]
    assert (c.records, c.bytes) == (1, 151)
    path.write_bytes(data + bytes(5))  # a short zero tail: the clean end
    c = wal.Corruption()
    assert len(list(wal.read_records(path, seg, c))) == 3 and c.records == 0
    assert end == len(data)


def test_segments_rotate_into_spares_prepared_in_the_background(tmp_path: Path) -> None:
    seg_bytes = 4096
    writer = WalWriter(tmp_path, Deduplicator(), segment_bytes=seg_bytes)
    writer.start()
    sent: list[pb.Batch] = []
    try:
        assert not writer.prepared  # a new log has no spare yet
        seen_segments = {writer.segment: writer.prepared}
        while len(seen_segments) < 4:
            b = batch(f"n{len(sent)}", 1, 1)
            done = threading.Event()
            writer.append(wal.batch_record(time.time_ns(), b.SerializeToString()),
                          (b.node_id, b.boot_id, b.seq), lambda pos, done=done: done.set())
            assert done.wait(30)
            sent.append(b)
            if writer._spare_asked:  # a quarter full: wait for the spare before going on
                deadline = time.monotonic() + 30
                while not (tmp_path / wal.SPARE_NAME).exists():
                    assert time.monotonic() < deadline, "no spare prepared"
                    time.sleep(0.01)
            seen_segments.setdefault(writer.segment, writer.prepared)
        assert list(seen_segments.values()) == [False, True, True, True]
    finally:
        writer.close()
    segs = wal.segments(tmp_path)
    assert all(p.stat().st_size >= seg_bytes for _, p in segs[1:])
    c = wal.Corruption()
    kinds = [r.kind for seg, p in segs for r in wal.read_records(p, seg, c)]
    assert kinds.count(wal.BATCH) == len(sent) and c.records == 0
    seen = wal.seen_batches(tmp_path)
    assert all(seen.seen(b.node_id, b.boot_id, b.seq) for b in sent)
