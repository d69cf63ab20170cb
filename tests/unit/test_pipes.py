"""Objects with out-of-band arrays across pipes (regional/pipes.py)."""

from __future__ import annotations

import multiprocessing
import os
import threading

import numpy as np
import pytest

from stratoscope.regional import pipes


def payload() -> dict[str, object]:
    return {"big": np.arange(300_000, dtype=np.uint64), "empty": np.zeros(0, np.int32),
            "strided": np.arange(10, dtype=np.int64)[::2], "text": ["a", "\0b"], "n": 7}


def check(got: dict[str, object]) -> None:
    want = payload()
    assert got.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, np.ndarray):
            g = got[k]
            assert isinstance(g, np.ndarray) and g.dtype == v.dtype and np.array_equal(g, v)
        else:
            assert got[k] == v


def test_fd_stream_round_trip_and_clean_end() -> None:
    r, w = os.pipe()

    def writer() -> None:
        pipes.write(w, payload())
        pipes.write(w, payload())
        os.close(w)

    t = threading.Thread(target=writer)
    t.start()
    check(pipes.read(r))
    got = pipes.read(r)
    check(got)
    assert got["big"].flags.writeable  # type: ignore[union-attr]
    with pytest.raises(pipes.EndOfStream):
        pipes.read(r)
    t.join()
    os.close(r)


def test_a_writer_dying_mid_message_is_not_a_clean_end() -> None:
    r, w = os.pipe()
    header, buffers = pipes._dumps(payload())
    os.write(w, len(header).to_bytes(8, "little") + header + bytes(buffers[0].raw())[:100])
    os.close(w)
    with pytest.raises(EOFError) as exc:
        pipes.read(r)
    assert not isinstance(exc.value, pipes.EndOfStream)
    os.close(r)


def test_connection_round_trip() -> None:
    a, b = multiprocessing.Pipe(duplex=True)
    t = threading.Thread(target=pipes.send, args=(a, payload()))
    t.start()
    check(pipes.recv(b))
    t.join()


def test_arrays_travel_out_of_band() -> None:
    header, buffers = pipes._dumps(payload())
    assert len(buffers) >= 1  # the big array at least
    assert len(header) < 10_000  # its 2.4 MB are not in the pickle


def test_sink_deliveries_of_some_or_all_parts_of_a_frame_round_trip() -> None:
    """What a sink process is sent (regional/sinks/process.py): a sub-frame for some of a
    frame's parts, the frame itself for all of them; either way exactly those blocks."""
    from stratoscope.regional.merge import Aggregator, MergeSettings
    from stratoscope.regional.sinks.process import pack_blocks, unpack_blocks
    from tests.frames import block_batch
    from tests.unit.test_merge import NS, T0, edge_batch

    agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0))
    for i, node in enumerate(["n1", "n2", "n3"]):
        agg.record(edge_batch(node, 1, 0, {("read", "app"): i + 1}))
    blocks = agg.flush(T0 + 60 * NS)
    assert len(blocks) == 4  # the roll-up and three nodes
    a, b = multiprocessing.Pipe(duplex=True)
    for chosen in (blocks, blocks[1:3], [blocks[3]]):
        items = pack_blocks(chosen)
        (frame,) = [it.frame for it in items]  # type: ignore[union-attr]
        assert (frame is chosen[0].frame) == (len(chosen) == len(blocks))
        t = threading.Thread(target=pipes.send, args=(a, items))
        t.start()
        got = unpack_blocks(pipes.recv(b))
        t.join()
        assert [g.block_id for g in got] == [c.block_id for c in chosen]
        assert [block_batch(g).SerializeToString() for g in got] == [block_batch(c).SerializeToString() for c in chosen]


@pytest.mark.parametrize("over_connection", [False, True])
def test_more_buffers_than_one_readv_takes_and_short_writes(
    over_connection: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over 1,024 out-of-band buffers (Linux's IOV_MAX per readv/writev) of uneven sizes
    arrive whole and in order, with every ``writev`` cut short at a random length (a
    blocking pipe rarely writes short, so the test makes it: the resume logic runs)."""
    import random

    rng = random.Random(7)
    real_writev = os.writev

    def short_writev(fd: int, views: list[memoryview]) -> int:
        budget = rng.randint(1, 3000)
        cut = []
        for v in views:
            cut.append(v[:budget])
            budget -= len(cut[-1])
            if budget <= 0:
                break
        return real_writev(fd, cut)

    monkeypatch.setattr(pipes.os, "writev", short_writev)
    arrays = [np.arange(i % 37, dtype=np.uint16) + i for i in range(2_500)]
    if over_connection:
        a, b = multiprocessing.Pipe(duplex=True)
        send, close_writer, recv, close_reader = pipes.send, a.close, lambda: pipes.recv(b), b.close
        wend: object = a
    else:
        r, w = os.pipe()
        send, close_writer, recv, close_reader = pipes.write, lambda: os.close(w), lambda: pipes.read(r), lambda: os.close(r)
        wend = w
    failed: list[BaseException] = []

    def writer() -> None:
        try:
            send(wend, arrays)  # type: ignore[arg-type]
        except BaseException as exc:
            failed.append(exc)
        finally:  # the stream ends either way: a broken writer fails the reader, not hangs it
            close_writer()

    t = threading.Thread(target=writer)
    t.start()
    try:
        got = recv()
    finally:  # reader end first: a writer blocked on a full pipe then fails instead of hanging
        close_reader()
        t.join()
    assert not failed
    assert len(got) == len(arrays)
    assert all(g.dtype == a.dtype and np.array_equal(g, a) for g, a in zip(got, arrays, strict=True))


def test_a_channel_carries_typed_messages_both_ways_and_one_way() -> None:
    """The one channel of every boundary: over a Connection (ingest, sinks) and over an
    os.pipe (the frame child), dataclass messages with their buffers out of band."""
    import dataclasses
    import os
    import pickle

    from stratoscope.regional.ingest import Accepted, Barrier, Pressure

    a, b = multiprocessing.Pipe(duplex=True)
    left: pipes.Channel[Pressure, Accepted] = pipes.Channel.over(a)
    right: pipes.Channel[Accepted, Pressure] = pipes.Channel.over(b)
    left.send(Pressure(7, True, False))
    assert right.recv() == Pressure(7, True, False)
    right.send(Accepted(pickle.PickleBuffer(b"columns"), 123))
    got = left.recv()
    assert (bytes(got.columns), got.size) == (b"columns", 123)
    left.close()
    left.close()  # idempotent
    with pytest.raises(EOFError):
        right.recv()
    right.close()

    r, w = os.pipe()
    out: pipes.Channel[Barrier, None] = pipes.Channel(send_fd=w)
    back: pipes.Channel[None, Barrier] = pipes.Channel(recv_fd=r)
    out.send(Barrier(3))
    out.close()
    assert back.recv() == Barrier(3) and dataclasses.is_dataclass(Barrier)
    with pytest.raises(pipes.EndOfStream):
        back.recv()
    back.close()
