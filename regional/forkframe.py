"""Build the frames of closed windows in a forked child of the merge process.

Why: the merge process records every incoming batch and, once a minute, reduces
the closed window into frames: seconds of numpy work. In one process both share
one GIL; at 500k points/s offered the merge process was the bottleneck at 100 % of
one core while the machine had a third of a core idle. A forked child sees the
detached window copy-on-write at no cost (a detached window is never written
again), reduces it on the other core with a GIL of its own and streams the blocks
back pickled, a frame at a time, which costs the parent a small fraction of the
reduction.

The child runs only numpy and pickle over the detached windows, then leaves with
``os._exit`` (no atexit handlers, no logging: a lock held by another thread at
fork time stays held in the child). If anything goes wrong the caller reduces the
windows itself: block ids depend only on the windows, so the result is the same.
"""

from __future__ import annotations

import contextlib
import os
import signal
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from stratoscope import heap
from stratoscope.regional import pipes

T = TypeVar("T")
R = TypeVar("R")


#: Scheduling niceness of the child. A window's reduction is batch work; the ingest
#: process answering acks and the merge process recording batches are not. On 2
#: cores, paced at 190k points/s right after a saturation phase, ack p99 was 366 ms
#: with the child at the same priority and 63 ms at nice 10 (saturation end to end
#: unchanged: 263k vs 262k; loadtest/regional_throughput.py).
FRAME_CHILD_NICE = 10


class ChildFailed(RuntimeError):
    """The forked child did not deliver a result (the message says how it ended)."""


def stream_in_fork(fn: Callable[[T], Iterable[R]], arg: T, nice: int = 0) -> Iterator[R]:
    """The items of ``fn(arg)``, computed in a forked child (at ``nice``), each as soon
    as it is ready.

    Each item crosses as a pickle with its arrays out of band (regional/pipes.py: no
    copy into or out of the pickle). Blocks the calling thread between
    items (iterate it in a worker thread). Raises ChildFailed if the child fails
    part-way, after the items it delivered; its traceback goes to stderr.
    """
    heap.prepare()  # not in the child: the lookup may start a process
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: compute, write, leave without any cleanup
        code = 1
        try:
            os.close(r)
            # the parent's handlers would write to its event loop's wakeup fd, which
            # the child shares: a signal for the child must not stop the parent
            with contextlib.suppress(ValueError, OSError):
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_DFL)
            if nice:
                os.nice(nice)
            out: pipes.Channel[R, None] = pipes.Channel(send_fd=w)
            for item in fn(arg):
                out.send(item)
                # This item's arrays are garbage once written: give their pages back,
                # or the child keeps every frame's high-water mark (glibc's mmap
                # threshold rises after large frees) on top of its copy-on-write share.
                del item
                heap.release_free_memory()
            code = 0
        except BaseException:
            with contextlib.suppress(BaseException):
                os.write(2, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(w)
    chan: pipes.Channel[None, R] = pipes.Channel(recv_fd=r)
    try:
        while True:
            try:
                item = chan.recv()
            except pipes.EndOfStream:
                break
            yield item
    finally:
        chan.close()
        _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise ChildFailed(f"frame child {pid} exited with {code}")
