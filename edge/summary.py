"""A readable end-of-run summary of what the edge saw (rich tables)."""

from __future__ import annotations

from collections import Counter, defaultdict

from rich.console import Console
from rich.table import Table

from stratoscope.edge.batch import batch_to_dict
from stratoscope.histogram import histogram_quantile
from stratoscope.v1 import batch_pb2 as pb


class Summary:
    def __init__(self) -> None:
        self.batches = 0
        self.counters: dict[str, Counter[tuple[tuple[str, str], ...]]] = defaultdict(Counter)
        self.hists: dict[str, dict[tuple[tuple[str, str], ...], dict[int, int]]] = defaultdict(dict)
        self.zero: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self.stacks: Counter[tuple[str, str]] = Counter()
        self.events: Counter[tuple[str, str]] = Counter()
        self.events_lost = 0

    def add(self, batch: pb.Batch) -> None:
        b = batch_to_dict(batch)
        self.batches += 1
        for m in b["metrics"]:
            for s in m["series"]:
                self.counters[m["name"]][tuple(sorted(s["labels"].items()))] += s["value"]
        for h in b["histograms"]:
            for s in h["series"]:
                key = tuple(sorted(s["labels"].items()))
                buckets = self.hists[h["name"]].setdefault(key, {})
                for i, n in s["buckets"].items():
                    buckets[int(i)] = buckets.get(int(i), 0) + n
                self.zero[(h["name"], key)] += s["zero_count"]
        for p in b["profiles"]:
            for s in p["samples"]:
                frame = next(iter(s["user_stack"] or s["kernel_stack"] or ["[unknown]"]))
                self.stacks[(s["comm"], frame)] += s["count"]
        for e in b["events"]:
            self.events[(e["kind"], e["comm"])] += 1
        self.events_lost += b["events_lost"]

    def _top_counter(self, title: str, metric: str, labels: list[str], n: int = 10) -> Table:
        folded: Counter[tuple[str, ...]] = Counter()
        for key, v in self.counters.get(metric, {}).items():
            d = dict(key)
            folded[tuple(d.get(lab, "") for lab in labels)] += v
        t = Table(title=title)
        for lab in labels:
            t.add_column(lab)
        t.add_column("total", justify="right")
        for row, v in folded.most_common(n):
            t.add_row(*row, f"{v:,}")
        return t

    def _latency(self, title: str, metric: str, labels: list[str], unit: str, n: int = 10) -> Table:
        merged: dict[tuple[str, ...], dict[int, int]] = defaultdict(dict)
        zeros: Counter[tuple[str, ...]] = Counter()
        for key, buckets in self.hists.get(metric, {}).items():
            d = dict(key)
            k = tuple(d.get(lab, "") for lab in labels)
            for i, c in buckets.items():
                merged[k][i] = merged[k].get(i, 0) + c
            zeros[k] += self.zero[(metric, key)]
        t = Table(title=title)
        for lab in labels:
            t.add_column(lab)
        for col in ("count", f"p50 {unit}", f"p99 {unit}"):
            t.add_column(col, justify="right")
        rows = sorted(merged.items(), key=lambda kv: -sum(kv[1].values()))[:n]
        for k, buckets in rows:
            total = sum(buckets.values()) + zeros[k]
            idx, cnt = list(buckets), list(buckets.values())
            p50 = histogram_quantile(0.5, idx, cnt, zeros[k], "loglinear")
            p99 = histogram_quantile(0.99, idx, cnt, zeros[k], "loglinear")
            t.add_row(*k, f"{total:,}", f"{p50:,.0f}", f"{p99:,.0f}")
        return t

    def render(self, failed: dict[str, str] | None = None, console: Console | None = None) -> None:
        c = console or Console()
        c.rule(f"[bold]Stratoscope edge: {self.batches} batches")
        for name, reason in (failed or {}).items():
            c.print(f"[yellow]program {name} not attached: {reason}")
        c.print(self._top_counter("Top syscalls", "syscalls_total", ["syscall", "comm"]))
        c.print(self._latency("Syscall latency", "syscall_latency", ["syscall"], "ns"))
        c.print(self._latency("Run-queue latency", "sched_runqueue_latency", ["comm"], "ns"))
        c.print(self._top_counter("TCP opens", "tcp_opens_total", ["direction", "port"]))
        c.print(self._top_counter("Block bytes", "block_bytes_total", ["device", "op"]))
        c.print(self._latency("Block latency", "block_latency", ["device", "op"], "ns"))
        c.print(self._top_counter("Process events", "process_events_total", ["event", "comm"]))
        t = Table(title="Hottest functions (leaf frames of CPU samples)")
        for col in ("comm", "function", "samples"):
            t.add_column(col)
        for (comm, frame), n in self.stacks.most_common(10):
            t.add_row(comm, frame, str(n))
        c.print(t)
        if self.events_lost:
            c.print(f"[yellow]{self.events_lost} events lost (rate limit or buffer full)")
