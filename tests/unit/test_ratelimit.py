"""Per-node token buckets (regional/ratelimit.py), on a fake clock."""

from __future__ import annotations

from stratoscope.regional.ratelimit import NodeRates, RateSettings


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_node_gets_its_burst_then_its_rate_and_others_are_untouched() -> None:
    clock = Clock()
    rates = NodeRates(RateSettings(batches_per_s=10, bytes_per_s=0, burst_s=2), clock)
    assert [rates.take("noisy", 100) for _ in range(21)] == [""] * 20 + ["batches"]
    assert rates.take("quiet", 100) == ""
    clock.t += 0.5  # 5 batches' worth
    assert [rates.take("noisy", 100) for _ in range(6)] == [""] * 5 + ["batches"]
    clock.t += 60  # refills to the burst, no further
    assert [rates.take("noisy", 100) for _ in range(21)] == [""] * 20 + ["batches"]


def test_bytes_are_limited_and_a_batch_larger_than_the_burst_still_passes_alone() -> None:
    clock = Clock()
    rates = NodeRates(RateSettings(batches_per_s=0, bytes_per_s=1000, burst_s=1), clock)
    assert rates.take("n", 600) == ""
    assert rates.take("n", 600) == "bytes"  # nothing charged for a refusal
    assert rates.take("n", 400) == ""
    clock.t += 1
    assert rates.take("n", 5000) == ""  # a full bucket lets one oversized batch through
    clock.t += 4
    assert rates.take("n", 1) == "bytes"  # ... and the node waits it out
    clock.t += 0.002
    assert rates.take("n", 1) == ""


def test_zero_disables_and_the_node_table_is_bounded() -> None:
    assert NodeRates(RateSettings(batches_per_s=0, bytes_per_s=0)).take("n", 1 << 40) == ""
    clock = Clock()
    rates = NodeRates(RateSettings(batches_per_s=1, bytes_per_s=0, burst_s=1, max_nodes=3), clock)
    for node in ("a", "b", "c", "d"):
        assert rates.take(node, 1) == ""
    assert len(rates) == 3 and rates.evicted == 1
    assert rates.take("a", 1) == ""  # forgotten: a full bucket again
    assert rates.take("d", 1) == "batches"


def test_cpu_is_charged_after_the_fact_and_a_costly_node_waits_it_out() -> None:
    clock = Clock()
    rates = NodeRates(RateSettings(batches_per_s=0, bytes_per_s=0, cpu_per_s=0.1, burst_s=10), clock)
    assert rates.take("bomber", 100) == ""
    rates.charge_cpu("bomber", 0.9)  # within the 1 s burst: the next one passes
    assert rates.take("bomber", 100) == ""
    rates.charge_cpu("bomber", 0.9)  # now 0.8 s in debt
    assert rates.take("bomber", 100) == "cpu"
    assert rates.take("quiet", 100) == ""  # others are untouched
    clock.t += 7.9  # 0.79 s refilled: still in debt
    assert rates.take("bomber", 100) == "cpu"
    clock.t += 0.2
    assert rates.take("bomber", 100) == ""
    clock.t += 3600  # refills to the burst, no further
    rates.charge_cpu("bomber", 1.0)
    assert rates.take("bomber", 100) == "cpu"


def test_cpu_zero_disables_it() -> None:
    rates = NodeRates(RateSettings(batches_per_s=0, bytes_per_s=0, cpu_per_s=0))
    assert not rates.enabled
    rates.charge_cpu("n", 100.0)
    assert rates.take("n", 1) == ""
