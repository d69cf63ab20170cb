"""Objects across a pipe with their arrays out of band: pickled, but never copied into
the pickle (pickle protocol 5, PEP 574).

Why: a window's frame is ~80 MB of numpy columns per 250 nodes. Pickled in band it is
copied into the pickle on the way out and out of it on the way in, both into fresh
memory (page faults: ~3-10 us each on this VM), in the merge process (from its frame
child, then to every sink process) and again in the sink. Out of band, the arrays'
buffers are written to the pipe as they are and read into one buffer each that the
unpickled arrays then use, with one ``writev``/``readv`` for as many buffers as the pipe
takes at once. A multiprocessing Connection carries the same frames on its socket.

A message is: 8-byte length of the header, the header (pickled: the buffer lengths and
the object's pickle), then every out-of-band buffer, back to back.

Every process boundary of the regional (ingest <-> merge, merge <-> each sink process,
frame child -> merge) talks over one ``Channel[Send, Recv]``: typed messages (small
frozen dataclasses each boundary module declares) in this framing, both ways.
"""

from __future__ import annotations

import os
import pickle
import threading
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any, Generic, TypeVar, cast

Send = TypeVar("Send")
Recv = TypeVar("Recv")

_IOV_MAX = 1024  # Linux's limit on buffers per readv/writev


def _dumps(obj: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    header = pickle.dumps(([memoryview(b).nbytes for b in buffers], data), protocol=5)
    return header, buffers


# -- multiprocessing connections ----------------------------------------------------------

def send(conn: Connection, obj: Any) -> None:
    """Send ``obj`` over a multiprocessing Connection, framed as ``write`` frames it (the
    caller serializes concurrent senders). Only ``recv`` may read it."""
    write(conn.fileno(), obj)


def recv(conn: Connection) -> Any:
    """Receive what ``send`` sent. Each out-of-band buffer lands in a bytearray of its own;
    what was read-only when sent comes back read-only (pickle keeps that).

    Reads the Connection's socket directly: ``Connection.recv_bytes_into`` reads a large
    message into a BytesIO chunk by chunk and copies it out again: ~250 us of CPU for a
    148 kB batch on this VM, ~40 us read straight into its buffer (loadtest/pipe_cost.py).
    """
    return read(conn.fileno())


# -- raw file descriptors (a forked child's pipe) -----------------------------------------

class EndOfStream(EOFError):
    """The stream ended cleanly, between two messages."""


def write(fd: int, obj: Any) -> None:
    header, buffers = _dumps(obj)
    _write_all(fd, [len(header).to_bytes(8, "little"), header, *(b.raw() for b in buffers)])


def read(fd: int) -> Any:
    """What ``write`` wrote; raises EndOfStream at the end of the stream, EOFError in the
    middle of a message (the writer died)."""
    head = os.read(fd, 8)
    if not head:
        raise EndOfStream("end of stream")
    if len(head) < 8:
        head += read_exact(fd, 8 - len(head))
    sizes, data = pickle.loads(read_exact(fd, int.from_bytes(head, "little")))
    buffers = [bytearray(n) for n in sizes]
    _read_into(fd, buffers)
    return pickle.loads(data, buffers=buffers)


def _write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    """Write every part, in order, with as few ``writev`` calls as the pipe allows."""
    views: list[memoryview] = [memoryview(p) for p in parts]
    views = [v for v in views if v.nbytes]
    i = 0
    while i < len(views):
        i = _advance(views, i, os.writev(fd, views[i:i + _IOV_MAX]))


def _read_into(fd: int, buffers: list[bytearray]) -> None:
    """Fill every buffer, in order, straight from ``fd`` (``readv``; no staging copy);
    EOFError if the stream ends first."""
    views = [memoryview(b) for b in buffers if b]
    i = got = 0
    while i < len(views):
        k = os.readv(fd, views[i:i + _IOV_MAX])
        if k == 0:
            raise EOFError(f"stream ended after {got} of {sum(map(len, buffers))} bytes")
        got += k
        i = _advance(views, i, k)


def _advance(views: list[memoryview], i: int, n: int) -> int:
    """Past ``n`` bytes written or read into ``views[i:]``: whole views are skipped, a
    partly done one is sliced to its rest; returns the index of the first view not done."""
    while n:
        if n >= views[i].nbytes:
            n -= views[i].nbytes
            i += 1
        else:
            views[i] = views[i][n:]
            n = 0
    return i


def read_exact(fd: int, n: int) -> bytearray:
    """Exactly ``n`` bytes from ``fd`` (EOFError if the stream ends first)."""
    buf = bytearray(n)
    _read_into(fd, [buf])
    return buf


# -- the typed channel ---------------------------------------------------------------------

class Channel(Generic[Send, Recv]):
    """One end of a process boundary: ``send`` takes ``Send`` messages, ``recv`` returns
    ``Recv`` ones, both in this module's framing.

    Over a multiprocessing Connection (``Channel.over``: one socket, both ways) or over
    the two ends of ``os.pipe`` pairs (``recv_fd``/``send_fd``; either may be None for a
    one-way channel). Concurrent senders are serialized; there must be one reader.
    """

    def __init__(self, recv_fd: int | None = None, send_fd: int | None = None,
                 conn: Connection | None = None) -> None:
        self._recv_fd = recv_fd
        self._send_fd = send_fd
        self._conn = conn  # kept open as long as the channel is
        self._send_lock = threading.Lock()
        self.closed = False

    @classmethod
    def over(cls, conn: Connection) -> Channel[Send, Recv]:
        fd = conn.fileno()
        return cls(fd, fd, conn)

    def send(self, msg: Send) -> None:
        """Raises OSError (or ValueError once closed) if the other end is gone."""
        if self._send_fd is None or self.closed:
            raise ValueError("channel is closed or receive-only")
        with self._send_lock:
            write(self._send_fd, msg)

    def recv(self) -> Recv:
        """The next message; EndOfStream when the other end closed cleanly, EOFError or
        OSError when it died."""
        if self._recv_fd is None or self.closed:
            raise EOFError("channel is closed or send-only")
        return cast(Recv, read(self._recv_fd))  # a Connection's socket read directly (recv)

    def close(self) -> None:
        """Close this end (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self._conn is not None:
            self._conn.close()
            return
        for fd in {self._recv_fd, self._send_fd} - {None}:
            assert fd is not None
            os.close(fd)


class InheritedFd:
    """A file descriptor handed to a spawned child as multiprocessing hands it a
    Connection's: the child gets a copy under the same number (``fd``)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (_inherited, (reduction.DupFd(self.fd),))


def _inherited(dup: Any) -> InheritedFd:
    return InheritedFd(dup.detach())
