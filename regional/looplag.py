"""How long an event loop was kept from running: the longest stall, measured.

Why: an ack is only as fast as the ingest process's event loop, and the merge
process's loop hands frames to the sinks; anything that holds either loop (a slow
callback, a thread holding the GIL, a garbage collection) delays every stream at
once. A watcher sleeps ``every_s`` in a loop and records how late it woke: that
lateness is the stall every other task on the loop saw too. The regional exports
the longest per process (``stratoscope_regional_event_loop_stall_seconds``) and a
histogram of all of them; loadtest/regional_throughput.py prints them.

The watcher's own cost is one timer per ``every_s`` (10 ms: ~100 wake-ups a second).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

#: How often the watcher wakes; stalls shorter than this are seen as up to this much.
WATCH_EVERY_S = 0.01


@dataclass
class Lag:
    """Stalls seen since the last ``take()``: the longest, and each one past 1 ms."""

    longest_s: float = 0.0
    samples: list[float] | None = None

    def take(self) -> tuple[float, list[float]]:
        """(longest, stalls) since the last call, and start a new period."""
        out = (self.longest_s, self.samples or [])
        self.longest_s, self.samples = 0.0, None
        return out


async def watch(lag: Lag, every_s: float = WATCH_EVERY_S,
                clock: Callable[[], float] = time.perf_counter) -> None:
    """Record into ``lag`` how late each ``every_s`` sleep of this loop woke; forever."""
    while True:
        t0 = clock()
        await asyncio.sleep(every_s)
        late = clock() - t0 - every_s
        if late > 0.001:
            if lag.samples is None:
                lag.samples = []
            lag.samples.append(late)
            lag.longest_s = max(lag.longest_s, late)


async def monitor(report: Callable[[float, list[float]], None], every_s: float = 1.0) -> None:
    """Watch this loop and ``report(longest_s, stalls)`` every ``every_s``; forever."""
    lag = Lag()
    watcher = asyncio.create_task(watch(lag))
    try:
        while True:
            await asyncio.sleep(every_s)
            report(*lag.take())
    finally:
        watcher.cancel()
