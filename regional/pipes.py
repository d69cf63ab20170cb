"""Objects across a pipe with their arrays out of band: pickled, but never copied into
the pickle (pickle protocol 5, PEP 574).

Why: a window's frame is ~80 MB of numpy columns per 250 nodes. Pickled in band it is
copied into the pickle on the way out and out of it on the way in, both into fresh
memory (page faults: ~3-10 us each on this VM), in the merge process (from its frame
child, then to every sink process) and again in the sink. Out of band, the arrays'
buffers are written to the pipe as they are and read into one buffer each that the
unpickled arrays then use (on a multiprocessing Connection, ``recv_bytes_into`` copies
once more on the way in).

A message is: 8-byte length of the header, the header (pickled: the buffer lengths and
the object's pickle), then every out-of-band buffer, back to back.
"""

from __future__ import annotations

import os
import pickle
from multiprocessing.connection import Connection
from typing import Any


def _dumps(obj: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    header = pickle.dumps(([memoryview(b).nbytes for b in buffers], data), protocol=5)
    return header, buffers


def _loads(header: bytes | bytearray, read: Any) -> Any:
    sizes, data = pickle.loads(header)
    return pickle.loads(data, buffers=[read(n) for n in sizes])


# -- multiprocessing connections ----------------------------------------------------------

def send(conn: Connection, obj: Any) -> None:
    """Send ``obj`` (the caller serializes concurrent senders)."""
    header, buffers = _dumps(obj)
    conn.send_bytes(header)
    for b in buffers:
        conn.send_bytes(b.raw())


def recv(conn: Connection) -> Any:
    """Receive what ``send`` sent. Each out-of-band buffer lands in a bytearray of its own;
    what was read-only when sent comes back read-only (pickle keeps that)."""

    def read(n: int) -> bytearray:
        buf = bytearray(n)
        if n:
            conn.recv_bytes_into(buf)
        else:
            conn.recv_bytes()
        return buf

    return _loads(conn.recv_bytes(), read)


# -- raw file descriptors (a forked child's pipe) -----------------------------------------

class EndOfStream(EOFError):
    """The stream ended cleanly, between two messages."""


def write(fd: int, obj: Any) -> None:
    header, buffers = _dumps(obj)
    _write_all(fd, len(header).to_bytes(8, "little"))
    _write_all(fd, header)
    for b in buffers:
        _write_all(fd, b.raw())


def read(fd: int) -> Any:
    """What ``write`` wrote; raises EndOfStream at the end of the stream, EOFError in the
    middle of a message (the writer died)."""
    head = os.read(fd, 8)
    if not head:
        raise EndOfStream("end of stream")
    if len(head) < 8:
        head += read_exact(fd, 8 - len(head))
    return _loads(read_exact(fd, int.from_bytes(head, "little")), lambda n: read_exact(fd, n))


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_exact(fd: int, n: int) -> bytearray:
    """Exactly ``n`` bytes from ``fd`` (EOFError if the stream ends first)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise EOFError(f"stream ended after {got} of {n} bytes")
        got += k
    return buf
