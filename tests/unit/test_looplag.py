"""The event-loop watcher sees a stall as long as the stall."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from stratoscope.regional.looplag import Lag, watch
from stratoscope.regional.service import RegionalMetrics


async def test_a_blocking_callback_is_seen_as_a_stall_of_its_length() -> None:
    lag = Lag()
    watcher = asyncio.create_task(watch(lag, every_s=0.005))
    try:
        await asyncio.sleep(0.02)  # the watcher is sleeping on its timer
        time.sleep(0.3)  # holds the loop, as a slow callback would
        # Wait for the watcher to record the stall. Other, shorter stalls (a busy machine
        # scheduling this process late) may be recorded first, so wait for this one.
        deadline = time.monotonic() + 5
        while lag.longest_s < 0.29 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
    finally:
        watcher.cancel()
    longest, stalls = lag.take()
    # The watcher woke at least 0.3 s late (minus the part of its 5 ms it had slept).
    assert longest >= 0.29
    assert longest in stalls
    assert lag.take() == (0.0, [])


def test_the_longest_stall_per_process_is_kept() -> None:
    registry = CollectorRegistry()
    m = RegionalMetrics(registry)
    m.observe_lag("ingest", 0.2, [0.2, 0.003])
    m.observe_lag("ingest", 0.05, [0.05])
    m.observe_lag("merge", 0.0, [])
    ns = "stratoscope_regional_event_loop"
    assert registry.get_sample_value(f"{ns}_longest_stall_seconds", {"process": "ingest"}) == 0.2
    assert registry.get_sample_value(f"{ns}_longest_stall_seconds", {"process": "merge"}) is None

    def below(le: str) -> float | None:
        return registry.get_sample_value(f"{ns}_stall_seconds_bucket", {"process": "ingest", "le": le})

    assert (below("0.005"), below("0.05"), below("0.25")) == (1, 2, 3)
