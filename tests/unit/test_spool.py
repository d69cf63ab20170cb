"""The edge's spool (edge/spool.py): records, restarts, rotation, limits, damage."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stratoscope.edge.spool import Spool, SpoolError, segment_name


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def data(i: int, n: int = 100) -> bytes:
    return bytes([i % 256]) * n


#: Size of a BATCH record holding ``n`` bytes with boot id "b1" and a seq:
#: header 9 + time 8 + boot length 2 + boot 2 + seq 8.
def record(n: int = 100, boot: str = "b1") -> int:
    return 9 + 8 + 2 + len(boot) + 8 + n


def test_write_ack_and_restart_keeps_only_the_unacked_in_order(tmp_path: Path) -> None:
    clock = Clock()
    s = Spool(tmp_path, clock=clock)
    for seq in range(1, 6):
        s.append(("b1", seq), data(seq))
    assert s.ack(("b1", 2)) and s.ack(("b1", 4))
    assert not s.ack(("b1", 4))  # answered twice: nothing left to forget
    s.mark_sent(("b1", 3), "a:1")
    s.close()

    again = Spool(tmp_path, clock=clock)
    assert again.pending() == [("b1", 1), ("b1", 3), ("b1", 5)]
    assert again.replayed == 3
    assert [again.read(k) for k in again.pending()] == [data(1), data(3), data(5)]
    assert again.target(("b1", 3)) == ("a:1", clock.t)
    assert again.target(("b1", 1)) == ("", 0.0)
    assert (again.corrupt_records, again.corrupt_bytes) == (0, 0)
    assert again.depth_bytes == 3 * record()
    # a new boot's batches sit beside the old boot's: keys are (boot_id, seq)
    again.append(("b2", 1), data(7))
    assert again.pending() == [("b1", 1), ("b1", 3), ("b1", 5), ("b2", 1)]
    # the next write went to a fresh segment, not after the old one
    assert again.segments() == [1, 2]
    again.close()


def test_a_second_spool_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    with pytest.raises(SpoolError, match="in use by another edge"):
        Spool(tmp_path)
    s.close()
    Spool(tmp_path).close()


def test_rotation_and_deletion_of_answered_segments(tmp_path: Path) -> None:
    s = Spool(tmp_path, max_bytes=64 << 20, segment_bytes=2 * record())  # two batches a segment
    for seq in range(1, 7):
        s.append(("b1", seq), data(seq))
    assert s.segments() == [1, 2, 3]
    s.ack(("b1", 1))  # segment 3 is full: the ack starts segment 4
    s.ack(("b1", 2))  # segment 1 has no unanswered batch left: deleted
    assert s.segments() == [2, 3, 4]
    assert not (tmp_path / segment_name(1)).exists()
    s.ack(("b1", 5))
    s.ack(("b1", 6))
    assert s.segments() == [2, 4]
    s.ack(("b1", 4))  # segment 2 still holds batch 3
    assert s.segments() == [2, 4]
    s.mark_sent(("b1", 3), "a:1")
    s.ack(("b1", 3))
    assert s.segments() == [4]  # the one being written stays, answered or not
    s.append(("b1", 7), data(7))
    s.append(("b1", 8), data(8))
    s.append(("b1", 9), data(9))
    s.mark_sent(("b1", 7), "a:1")
    assert s.segments() == [4, 5, 6]  # 4 holds batch 7; 8 and 9 filled 5; the SENT began 6
    s.close()
    assert sorted(p.name for p in tmp_path.glob("spool-*")) == [segment_name(n) for n in (4, 5, 6)]
    again = Spool(tmp_path)
    assert again.pending() == [("b1", 7), ("b1", 8), ("b1", 9)]
    assert again.target(("b1", 7))[0] == "a:1"
    again.close()


def test_deleting_a_segment_carries_over_its_acks_and_targets(tmp_path: Path) -> None:
    """Segment 2 holds the ack of batch 1 and the target of batch 2 (both in segment 1):
    when segment 2 goes, those records are copied first, so a restart sees the same."""
    s = Spool(tmp_path, max_bytes=64 << 20, segment_bytes=2 * record())
    s.append(("b1", 1), data(1))
    s.append(("b1", 2), data(2))  # segment 1 full
    s.append(("b1", 3), data(3))  # segment 2
    s.ack(("b1", 1))
    s.mark_sent(("b1", 2), "a:1")
    s.append(("b1", 4), data(4))  # segment 2 is now full
    s.append(("b1", 5), data(5))  # segment 3
    s.ack(("b1", 3))
    s.ack(("b1", 4))  # segment 2 has no unanswered batch: deleted, its records copied
    assert s.segments() == [1, 3]
    s.close()
    again = Spool(tmp_path)
    assert again.pending() == [("b1", 2), ("b1", 5)]  # not batch 1: its ack was carried over
    assert again.target(("b1", 2))[0] == "a:1"
    again.close()


def test_size_limit_drops_the_oldest_with_exact_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    s = Spool(tmp_path, max_bytes=(1 << 20) + 10, clock=clock)
    big = (1 << 20) // 4  # four of these fill the limit but for the headers
    caplog.set_level(logging.WARNING, "stratoscope.edge.spool")
    for seq in range(1, 5):
        s.append(("b1", seq), b"x" * big)
    assert (len(s), s.dropped["full"]) == (3, 1)  # the headers pushed the 4th over
    assert s.pending() == [("b1", 2), ("b1", 3), ("b1", 4)]
    s.append(("b1", 5), b"x" * big)
    s.append(("b1", 6), b"x" * big)
    assert s.dropped["full"] == 3 and s.pending()[0] == ("b1", 4)
    # logged once (the first drop), the next two folded until 10 s have passed
    assert len([r for r in caplog.records if "dropped" in r.message]) == 1
    clock.t += 10
    s.expire()
    msgs = [r.message for r in caplog.records if "dropped" in r.message]
    assert len(msgs) == 2 and msgs[1].startswith("spool dropped 2 unanswered batches") and "2 full" in msgs[1]
    assert s.depth_bytes <= s.max_bytes
    s.close()
    again = Spool(tmp_path, max_bytes=(1 << 20) + 10, clock=clock)
    assert again.pending() == [("b1", 4), ("b1", 5), ("b1", 6)]
    again.close()


def test_age_limit_drops_the_oldest_on_expire_and_at_start(tmp_path: Path) -> None:
    clock = Clock()
    s = Spool(tmp_path, max_age_s=100, clock=clock)
    for seq in range(1, 5):
        s.append(("b1", seq), data(seq))
        clock.t += 30  # written at 0, 30, 60, 90
    clock.t = 1_000_000.0 + 101  # batch 1 is 101 s old
    s.expire()
    assert (s.pending()[0], s.dropped["age"]) == (("b1", 2), 1)
    assert s.oldest_age_s() == 71
    s.close()
    clock.t += 60  # batches 2 (161 s) and 3 (131 s) are past the limit at the next start
    again = Spool(tmp_path, max_age_s=100, clock=clock)
    assert (again.pending(), again.dropped["age"], again.replayed) == ([("b1", 4)], 2, 3)
    again.close()


def _three(tmp_path: Path) -> Path:
    s = Spool(tmp_path)
    for seq in (1, 2, 3):
        s.append(("b1", seq), data(seq))
    s.close()
    return tmp_path / segment_name(1)


def test_a_corrupt_byte_in_the_middle_skips_the_rest_of_its_segment(tmp_path: Path) -> None:
    seg = _three(tmp_path)
    raw = bytearray(seg.read_bytes())
    assert len(raw) == 3 * record()
    raw[record() + 50] ^= 0xFF  # inside the second record's payload: its CRC fails
    seg.write_bytes(raw)
    s = Spool(tmp_path)
    assert (s.corrupt_records, s.corrupt_bytes) == (1, 2 * record())
    assert s.pending() == [("b1", 1)] and s.read(("b1", 1)) == data(1)
    s.append(("b1", 4), data(4))  # a fresh segment, not after the damage
    assert s.segments() == [1, 2]
    s.close()
    again = Spool(tmp_path)
    assert again.pending() == [("b1", 1), ("b1", 4)] and again.corrupt_records == 1
    again.close()


@pytest.mark.parametrize("cut", [1, 5, 9, 20, record() - 1])
def test_a_torn_tail_is_skipped_and_counted(tmp_path: Path, cut: int) -> None:
    seg = _three(tmp_path)
    raw = seg.read_bytes()
    seg.write_bytes(raw[: 2 * record() + cut])  # the third record cut short
    s = Spool(tmp_path)
    assert (s.corrupt_records, s.corrupt_bytes) == (1, cut)
    assert s.pending() == [("b1", 1), ("b1", 2)]
    assert [s.read(k) for k in s.pending()] == [data(1), data(2)]
    s.close()


def test_a_bad_length_is_corrupt(tmp_path: Path) -> None:
    seg = _three(tmp_path)
    raw = bytearray(seg.read_bytes())
    raw[record():record() + 4] = (0xFFFFFFF0).to_bytes(4, "little")
    seg.write_bytes(raw)
    s = Spool(tmp_path)
    assert (s.corrupt_records, s.corrupt_bytes, s.pending()) == (1, 2 * record(), [("b1", 1)])
    s.close()


def test_a_record_damaged_after_start_is_dropped_when_read(tmp_path: Path) -> None:
    seg = _three(tmp_path)
    s = Spool(tmp_path)
    raw = bytearray(seg.read_bytes())
    raw[50] ^= 0xFF
    seg.write_bytes(raw)
    assert s.read(("b1", 1)) is None
    assert (s.dropped["corrupt"], s.pending()) == (1, [("b1", 2), ("b1", 3)])
    s.close()


def test_memory_mode_keeps_the_same_books_without_files(tmp_path: Path) -> None:
    s = Spool(None, max_bytes=1 << 20, segment_bytes=1000)
    for seq in range(1, 30):
        s.append(("b", seq), data(seq))
        if seq % 3:
            s.ack(("b", seq))
    assert s.pending() == [("b", k) for k in range(3, 30, 3)]
    assert s.read(("b", 3)) == data(3)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "ack", "sent", "free", "restart"]),
                          st.integers(0, 11)), max_size=60))
def test_any_sequence_replays_to_the_same_state(tmp_path_factory: pytest.TempPathFactory,
                                               ops: list[tuple[str, int]]) -> None:
    """Whatever was appended, answered, sent or freed, with restarts and small segments in
    between: a restart rebuilds exactly the unanswered batches, in order, with targets."""
    d = tmp_path_factory.mktemp("spool")
    s = Spool(d, segment_bytes=3 * record())
    model: dict[tuple[str, int], str] = {}
    appended: set[int] = set()
    for op, i in ops:
        key = ("b1", i)
        if op == "append" and i not in appended:
            appended.add(i)
            s.append(key, data(i))
            model[key] = ""
        elif op == "ack" and key in model:
            s.ack(key)
            del model[key]
        elif op in ("sent", "free") and key in model:
            target = f"r{i % 3}:1" if op == "sent" else ""
            s.mark_sent(key, target)
            model[key] = target
        elif op == "restart":
            s.close()
            s = Spool(d, segment_bytes=3 * record())
        assert s.pending() == list(model)
    s.close()
    s = Spool(d)
    assert s.pending() == list(model)
    assert {k: s.target(k)[0] for k in s.pending()} == model
    assert [s.read(k) for k in s.pending()] == [data(k[1]) for k in model]
    assert s.corrupt_records == 0
    s.close()
