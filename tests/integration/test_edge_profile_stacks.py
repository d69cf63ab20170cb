"""The profiler's stack tables are emptied by every drain.

A stack table that is never emptied fills up: ``bpf_get_stackid`` then refuses every new
stack whose bucket holds an older one (EEXIST), and samples lose their stacks more and more
over an edge's life. BCC's ``StackTrace.clear()`` does nothing, so the collector deletes
what it read itself.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from stratoscope.edge.batch import batch_to_dict
from stratoscope.edge.collector import Collector
from stratoscope.edge.config import EdgeConfig

pytestmark = pytest.mark.kernel


def test_every_drain_empties_the_stack_table_it_read() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test loads BPF programs and must run as root (see README)")
    collector = Collector(EdgeConfig(programs=["profile"], programs_explicit=True, metrics_port=0))
    collector.start()
    try:
        (prog,) = collector.programs
        stacks = 0
        for _ in range(3):
            # Stacks to record: a process that spends a moment in the kernel and in user space.
            subprocess.run(["dd", "if=/dev/zero", "of=/dev/null", "bs=1M", "count=1000"],
                           check=True, capture_output=True)
            batch = batch_to_dict(collector.drain())
            stacks += sum(1 for p in batch["profiles"] for s in p["samples"]
                          if s["kernel_stack"] or s["user_stack"])
            drained = prog._bpf[f"stacks_{prog._active ^ 1}".encode()]
            assert len(drained) == 0  # BCC counts a stack table by walking its keys
        assert stacks > 0
    finally:
        collector.stop()
