"""Build a stratoscope.v1.Batch from decoded series, and render it as JSON.

Strings are interned once per batch; labels are a row-major matrix of string
indices; numbers go into columns, sent as raw little-endian bytes (the ``_le``
fields, which a regional maps onto arrays without parsing a value; see
stratoscope/columns.py). ``batch_to_dict`` resolves every index so a person or a
script can read a batch without the string table; ``batch_from_dict`` builds it back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from stratoscope.columns import packed_copy, to_raw
from stratoscope.edge.decode import Histogram, ProfileRow
from stratoscope.v1 import batch_pb2 as pb

Labels = tuple[str, ...]


class StringTable:
    """Index 0 is always the empty string."""

    def __init__(self) -> None:
        self._index: dict[str, int] = {"": 0}
        self.strings: list[str] = [""]

    def __call__(self, s: str) -> int:
        i = self._index.get(s)
        if i is None:
            i = self._index[s] = len(self.strings)
            self.strings.append(s)
        return i


@dataclass
class EventRow:
    time_ns: int
    kind: str
    pid: int
    ppid: int
    comm: str
    cgroup: str
    detail: str
    code: int


class BatchBuilder:
    """Accumulates one interval's blocks; ``build()`` returns the message."""

    def __init__(
        self,
        node_id: str,
        boot_id: str,
        seq: int,
        start_ns: int,
        end_ns: int,
        node_labels: dict[str, str],
        producer: str = "stratoscope-edge",
    ) -> None:
        self.s = StringTable()
        self.batch = pb.Batch(
            node_id=node_id, boot_id=boot_id, seq=seq, start_ns=start_ns, end_ns=end_ns,
            producer=producer,
        )
        for k, v in sorted(node_labels.items()):
            self.batch.node_label_keys.append(self.s(k))
            self.batch.node_label_values.append(self.s(v))
        self._events = pb.EventBlock()

    def add_counters(
        self, name: str, unit: str, help_: str, keys: list[str], series: dict[Labels, int],
        kind: int = pb.COUNTER,
    ) -> None:
        if not series:
            return
        s = self.s
        block = self.batch.metrics.add(
            name=s(name), kind=kind, unit=s(unit), help=s(help_), label_keys=[s(k) for k in keys]
        )
        values: list[int] = []
        labels: list[int] = []
        for lab, v in sorted(series.items()):
            labels.extend(s(x) for x in lab)
            values.append(v)
        block.label_values.extend(labels)
        if kind == pb.GAUGE:
            block.gauge_values.extend(float(v) for v in values)
        else:
            block.counter_values.extend(values)

    def add_histograms(
        self, name: str, unit: str, help_: str, keys: list[str], series: dict[Labels, Histogram]
    ) -> None:
        if not series:
            return
        s = self.s
        block = self.batch.histograms.add(
            name=s(name), unit=s(unit), help=s(help_), scale=0, label_keys=[s(k) for k in keys]
        )
        offsets = [0]
        labels: list[int] = []
        idx: list[int] = []
        cnt: list[int] = []
        for lab, h in sorted(series.items()):
            labels.extend(s(x) for x in lab)
            block.count.append(h.count)
            block.sum.append(h.sum)
            block.zero_count.append(h.zero)
            for i in sorted(h.buckets):
                if h.buckets[i]:
                    idx.append(i)
                    cnt.append(h.buckets[i])
            offsets.append(len(idx))
        block.label_values.extend(labels)
        block.bucket_offsets.extend(offsets)
        block.bucket_index.extend(idx)
        block.bucket_count.extend(cnt)

    def add_profile(self, name: str, period_ns: int, rows: dict[ProfileRow, int]) -> None:
        if not rows:
            return
        s = self.s
        block = self.batch.profiles.add(name=s(name), period_ns=period_ns)
        stack_ids: dict[tuple[str, ...], int] = {}
        offsets = [0]

        def stack(frames: tuple[str, ...] | None) -> int:
            if frames is None:
                return -1
            i = stack_ids.get(frames)
            if i is None:
                i = stack_ids[frames] = len(stack_ids)
                block.stack_frames.extend(s(f) for f in frames)
                offsets.append(len(block.stack_frames))
            return i

        for row, n in sorted(rows.items(), key=lambda kv: -kv[1]):
            block.pid.append(row.pid)
            block.comm.append(s(row.comm))
            block.cgroup.append(s(row.cgroup))
            block.kernel_stack.append(stack(row.kernel_stack))
            block.user_stack.append(stack(row.user_stack))
            block.samples.append(n)
        block.stack_offsets.extend(offsets)

    def add_events(self, events: Iterable[EventRow], lost: int) -> None:
        s = self.s
        e = self._events
        for ev in events:
            e.time_ns.append(ev.time_ns)
            e.kind.append(s(ev.kind))
            e.pid.append(ev.pid)
            e.ppid.append(ev.ppid)
            e.comm.append(s(ev.comm))
            e.cgroup.append(s(ev.cgroup))
            e.detail.append(s(ev.detail))
            e.code.append(ev.code)
        e.lost += lost

    def build(self) -> pb.Batch:
        if self._events.time_ns or self._events.lost:
            self.batch.events.CopyFrom(self._events)
        self.batch.strings.extend(self.s.strings)
        return to_raw(self.batch)


def _labels(strings: list[str], keys: list[int], values: list[int], i: int) -> dict[str, str]:
    n = len(keys)
    return {strings[keys[k]]: strings[values[i * n + k]] for k in range(n)}


def batch_to_dict(b: pb.Batch) -> dict[str, Any]:
    """Every string index resolved: the JSON-lines form people and tests read."""
    b = packed_copy(b)  # the repeated fields are what the code below reads
    st = list(b.strings)
    out: dict[str, Any] = {
        "node_id": b.node_id,
        "boot_id": b.boot_id,
        "seq": b.seq,
        "start_ns": b.start_ns,
        "end_ns": b.end_ns,
        "node_labels": {
            st[k]: st[v] for k, v in zip(b.node_label_keys, b.node_label_values, strict=True)
        },
        "metrics": [],
        "histograms": [],
        "profiles": [],
        "events": [],
    }
    for m in b.metrics:
        keys, vals = list(m.label_keys), list(m.label_values)
        values = list(m.counter_values) if m.kind == pb.COUNTER else list(m.gauge_values)
        out["metrics"].append({
            "name": st[m.name],
            "kind": pb.MetricKind.Name(m.kind).lower(),
            "unit": st[m.unit],
            "series": [
                {"labels": _labels(st, keys, vals, i), "value": v} for i, v in enumerate(values)
            ],
        })
    for h in b.histograms:
        keys, vals = list(h.label_keys), list(h.label_values)
        series = []
        for i in range(len(h.count)):
            lo, hi = h.bucket_offsets[i], h.bucket_offsets[i + 1]
            series.append({
                "labels": _labels(st, keys, vals, i),
                "count": h.count[i],
                "sum": h.sum[i],
                "zero_count": h.zero_count[i],
                "buckets": {
                    str(h.bucket_index[j]): h.bucket_count[j] for j in range(lo, hi)
                },
            })
        out["histograms"].append({
            "name": st[h.name], "unit": st[h.unit], "scale": h.scale, "series": series,
        })
    for p in b.profiles:
        stacks = [
            [st[f] for f in p.stack_frames[p.stack_offsets[k] : p.stack_offsets[k + 1]]]
            for k in range(len(p.stack_offsets) - 1)
        ]
        out["profiles"].append({
            "name": st[p.name],
            "period_ns": p.period_ns,
            "samples": [
                {
                    "pid": p.pid[i],
                    "comm": st[p.comm[i]],
                    "cgroup": st[p.cgroup[i]],
                    "kernel_stack": stacks[p.kernel_stack[i]] if p.kernel_stack[i] >= 0 else None,
                    "user_stack": stacks[p.user_stack[i]] if p.user_stack[i] >= 0 else None,
                    "count": p.samples[i],
                }
                for i in range(len(p.samples))
            ],
        })
    e = b.events
    for i in range(len(e.time_ns)):
        out["events"].append({
            "time_ns": e.time_ns[i], "kind": st[e.kind[i]], "pid": e.pid[i], "ppid": e.ppid[i],
            "comm": st[e.comm[i]], "cgroup": st[e.cgroup[i]], "detail": st[e.detail[i]],
            "code": e.code[i],
        })
    out["events_lost"] = e.lost
    return out


def batch_from_dict(d: dict[str, Any]) -> pb.Batch:
    """The batch of a ``batch_to_dict`` form, built again with BatchBuilder (help texts,
    which the form leaves out, empty): how loadtest/ and the tests replay recorded
    batches (loadtest/data/*.jsonl.gz)."""
    b = BatchBuilder(d["node_id"], d["boot_id"], d["seq"], d["start_ns"], d["end_ns"], d["node_labels"])
    for m in d["metrics"]:
        if m["series"]:
            keys = list(m["series"][0]["labels"])
            b.add_counters(m["name"], m["unit"], "", keys,
                           {tuple(s["labels"][k] for k in keys): s["value"] for s in m["series"]},
                           pb.GAUGE if m["kind"] == "gauge" else pb.COUNTER)
    for h in d["histograms"]:
        if h["series"]:
            keys = list(h["series"][0]["labels"])
            b.add_histograms(h["name"], h["unit"], "", keys, {
                tuple(s["labels"][k] for k in keys): Histogram(
                    {int(i): c for i, c in s["buckets"].items()}, s["zero_count"], s["count"], s["sum"])
                for s in h["series"]})
    for p in d["profiles"]:
        b.add_profile(p["name"], p["period_ns"], {
            ProfileRow(s["pid"], s["comm"], s["cgroup"],
                       tuple(s["kernel_stack"]) if s["kernel_stack"] is not None else None,
                       tuple(s["user_stack"]) if s["user_stack"] is not None else None): s["count"]
            for s in p["samples"]})
    if d["events"] or d.get("events_lost"):
        b.add_events([EventRow(e["time_ns"], e["kind"], e["pid"], e["ppid"], e["comm"], e["cgroup"],
                               e["detail"], e["code"]) for e in d["events"]], lost=d.get("events_lost", 0))
    return b.build()
