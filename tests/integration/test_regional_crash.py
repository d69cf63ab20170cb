"""Fault injection on a real regional process: SIGKILL at random moments; nothing an edge
was acknowledged for is lost, nothing is stored twice (docs/GUARANTEES.md)."""

from __future__ import annotations

import random
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import kafka_bootstrap, run_edge, unique_comm
from tests.integration.regional_proc import RegionalProcess, kafka_reads, wait_until
from tests.integration.synthetic_edges import SyntheticFleet

pytestmark = [pytest.mark.kernel, pytest.mark.kafka]


def test_regional_sigkilled_five_times_stores_every_acknowledged_batch_once(
    tmp_path: Path, workload_bin: dict[str, Path]
) -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    prefix = f"crash-{uuid.uuid4().hex[:10]}"
    regional = RegionalProcess(tmp_path, "--resolution", "5s", "--lateness", "1s",
                               kafka=kafka_bootstrap(), topic_prefix=prefix)
    regional.start()
    target = f"127.0.0.1:{regional.port}"
    fleet = SyntheticFleet("crash", 20, [target], seed=seed)
    comm = unique_comm("crash")
    run_s = 60.0
    edge_run: dict[str, Any] = {}
    edge_errors: list[BaseException] = []

    def kernel_edge() -> None:  # one real BPF edge: a child making exactly 3 x 4,000 openat calls
        try:
            with run_edge(["syscalls"], interval=1.0, forward_to=[target], node_id="crash-bpf",
                          forward_close_s=180) as run:
                for k in range(3):
                    wait_until(t0 + 5 + 18 * k)
                    subprocess.run([str(workload_bin["openat"]), comm, "3000", "1000", "200000"], check=True)
                wait_until(t0 + run_s)
            edge_run["run"] = run
        except BaseException as exc:
            edge_errors.append(exc)

    t0 = time.monotonic()
    fleet.start()
    edge = threading.Thread(target=kernel_edge, name="kernel-edge")
    edge.start()
    kills = sorted(rng.uniform(4, run_s - 4) for _ in range(5))
    for at in kills:
        wait_until(t0 + at)
        regional.kill()
        regional.start()
    wait_until(t0 + run_s)
    stats = fleet.stop()
    edge.join(300)
    assert not edge_errors, edge_errors
    run = edge_run["run"]
    assert regional.stop() == 0, regional.tail()
    assert regional.starts == 6

    assert stats["rejected"] == stats["dropped"] == 0, stats
    assert run.forward_stats.rejected == 0
    assert not any(v for k, v in run.forward_counts.items() if k.startswith("dropped."))
    assert stats["acked"] + stats["duplicates"] == sum(fleet.batches.values())

    rows = regional.query("""SELECT node, sum(value) FROM stratoscope.metrics
        WHERE metric = 'syscalls_total' AND labels['syscall'] = 'read' AND labels['comm'] = 'app'
        AND resolution = 5 GROUP BY node""")
    stored = {n: int(v) for n, v in rows}
    truth = dict(fleet.reads)
    assert stored == truth
    # the roll-up across nodes (by syscall) holds every node's reads, the kernel edge's too
    (rollup, nodes), = regional.query("""SELECT sumIf(value, node = ''), sumIf(value, node != '')
        FROM stratoscope.metrics WHERE metric = 'syscalls_total' AND labels['syscall'] = 'read'
        AND resolution = 5""")
    assert int(rollup) == int(nodes) >= sum(truth.values())
    hist = regional.query("""SELECT node, sum(count) FROM stratoscope.histograms
        WHERE metric = 'syscall_latency' AND node LIKE 'crash-0%' AND resolution = 5 GROUP BY node""")
    assert {n: int(c) for n, c in hist} == dict(fleet.hist_count)
    calls = regional.query(f"""SELECT sum(value) FROM stratoscope.metrics WHERE metric = 'syscalls_total'
        AND node = 'crash-bpf' AND labels['comm'] = '{comm}' AND labels['syscall'] = 'openat'
        AND resolution = 5""")
    assert int(calls[0][0]) == 12_000

    reads, openat = kafka_reads(kafka_bootstrap(), prefix)
    assert {n: v for n, v in reads.items() if n} == truth
    assert openat[f"crash-bpf/{comm}"] == 12_000
