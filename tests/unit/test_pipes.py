"""Objects with out-of-band arrays across pipes (regional/pipes.py)."""

from __future__ import annotations

import multiprocessing
import os
import threading

import numpy as np
import pytest

from regional import pipes


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
