"""Hostile batches for the fuzzers, and the one check every fuzzed input goes through.

Shared by the property-based test (tests/unit/test_fuzz_batches.py, hypothesis) and the
coverage-guided target (tests/fuzz/fuzz_validate.py, atheris), so both fuzz the same
path with the same oracle:

* ``random_batch`` builds a valid batch with the edge's own ``BatchBuilder``;
* ``case`` spoils it in four stages, each named so a failure says what was done:
  field mutations (``FIELD``: out-of-range string indices, huge counts, deep stacks,
  oversized identities, giant string tables, NaN gauges, wrapping sums, event times far
  out, bucket indices out of range, mismatched column lengths...), the column encoding
  (``ENCODING``), the sealed form (``SEAL``: corrupt, bombed or re-sealed bodies, bodies
  that carry an identity of their own, bodies padded to the inflation bound or one byte
  past it), then the serialized bytes (``BYTES``);
* ``check_wire`` takes the bytes the way the ingest process does (parse, then
  ``Gate.admit``) and asserts the properties; anything else that escapes is a finding.

The oracle, ``expected_reasons``, re-derives every rule of the wire contract and of
``Limits`` from the message with plain Python (its own column reader and inflater), so a
rule that validate.py forgets or gets wrong shows up as a disagreement, not as agreement
of the code with itself. It returns every reason that applies, because validate()
reports only the first rule a batch breaks.
"""

from __future__ import annotations

import logging
import math
import random
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zstandard
from google.protobuf.descriptor import FieldDescriptor

from stratoscope.columns import WIRE, to_packed, to_raw
from stratoscope.edge.batch import BatchBuilder, EventRow
from stratoscope.edge.decode import Histogram, ProfileRow
from stratoscope.regional.batchcols import BatchCols
from stratoscope.regional.gate import Gate, RejectionLog
from stratoscope.regional.handover import pack, unpack
from stratoscope.regional.merge import Aggregator, MergeSettings
from stratoscope.regional.sinks.kafka import block_batch
from stratoscope.regional.validate import NS, REASONS, BatchRejected, Limits, parse_batch
from stratoscope.v1 import batch_pb2 as pb
from stratoscope.v1 import ingest_pb2
from stratoscope.wire import header_bytes, seal, varint

__all__ = ["BYTES", "ENCODING", "FIELD", "NOW", "SEAL", "TIGHT", "Outcome", "case",
           "check_wire", "expected_reasons", "mutate_wire", "random_batch", "seed_batches"]

NOW = 1_800_000_000 * NS
U64_MAX = 2**64 - 1
I32 = (-(2**31), 2**31 - 1)
U32_MAX = 2**32 - 1

#: Limits small enough that a fuzzer reaches every bound with inputs of a few KiB; the
#: generators stay inside them. Limits() itself is fuzzed too (giant inputs, fewer runs).
TIGHT = Limits(max_bytes=1 << 20, max_inflation=64, inflation_floor=4096, max_strings=256,
               max_string_bytes=64, max_strings_chars=4096,
               max_unreferenced_strings=4, max_series=64, max_blocks=16, max_label_keys=4,
               max_node_labels=8, max_buckets_per_series=8,
               max_stack_depth=12, max_events=16, max_window_s=600, max_future_skew_s=30,
               max_age_s=3600, max_node_id=32, max_boot_id=40)

#: Strings that stress encodings and terminals: multi-byte UTF-8, NUL, bidi, escapes.
WORDS = ["read", "write", "eth0", "é", "日本語", "🙂", "a\x00b", "\u202eevil", "\x1b[31m",
         "/system.slice/x.service", "k" * 30, "sda", "exec", "exit"]


# -- valid batches --------------------------------------------------------------------

def random_batch(rnd: random.Random, limits: Limits = TIGHT, now_ns: int = NOW) -> pb.Batch:
    """A valid batch (within ``limits``) of random shape, built by the edge's BatchBuilder:
    counters, gauges, histograms, a profile and events, each present or not."""
    node = rnd.choice(["node-1", "n", "é-node", "x" * limits.max_node_id])
    boot = rnd.choice(["boot", "7f1c0e3a-5b2d-4c3e-9f10-2a6b8d4e1c7f", "b" * limits.max_boot_id])
    seq = rnd.choice([1, 2, rnd.randint(1, U64_MAX)])
    width = rnd.choice([1, 10, 60, limits.max_window_s]) * NS
    end = now_ns + rnd.randint(-min(limits.max_age_s, 3600) + limits.max_window_s,
                               limits.max_future_skew_s) * NS
    start = end - width
    labels = {rnd.choice(WORDS): rnd.choice(WORDS) for _ in range(rnd.randint(0, 2))}
    b = BatchBuilder(node, boot, seq, start, end, labels)

    def keys() -> list[str]:
        return rnd.sample(WORDS, rnd.randint(0, 2))

    def series(ks: list[str], value: Callable[[], Any]) -> dict[tuple[str, ...], Any]:
        return {tuple(rnd.choice(WORDS) for _ in ks): value() for _ in range(rnd.randint(1, 4))}

    for _ in range(rnd.randint(0, 2)):
        ks = keys()
        b.add_counters(rnd.choice(WORDS), "1", rnd.choice(WORDS), ks,
                       series(ks, lambda: rnd.choice([0, 1, rnd.randint(0, 2**62)])))
    for _ in range(rnd.randint(0, 1)):
        ks = keys()
        gauges = series(ks, lambda: rnd.choice([0.0, -0.0, 1.5, -1e300, 1e300, 5e-324]))
        b.add_counters(rnd.choice(WORDS), "1", "", ks, gauges, kind=pb.GAUGE)
    for _ in range(rnd.randint(0, 2)):
        ks = keys()

        def hist() -> Histogram:
            idx = rnd.sample(range(-64, 128), rnd.randint(0, min(4, limits.max_buckets_per_series)))
            return Histogram({i: rnd.randint(1, 1000) for i in idx}, zero=rnd.randint(0, 3),
                             count=rnd.randint(0, 2**40), sum=rnd.randint(0, 2**60))

        b.add_histograms(rnd.choice(WORDS), "ns", "", ks, series(ks, hist))
    if rnd.random() < 0.5:
        depth = min(6, limits.max_stack_depth)

        def stack() -> tuple[str, ...] | None:
            return None if rnd.random() < 0.2 else tuple(rnd.choices(WORDS, k=rnd.randint(0, depth)))

        rows = {ProfileRow(rnd.randint(0, U32_MAX), rnd.choice(WORDS), rnd.choice(WORDS), stack(), stack()):
                rnd.randint(1, 10**6) for _ in range(rnd.randint(1, 4))}
        b.add_profile("cpu", rnd.choice([0, 52_631_578]), rows)
    if rnd.random() < 0.5:
        skew = limits.max_future_skew_s * NS
        b.add_events([EventRow(rnd.randint(max(0, start - skew), end + skew), rnd.choice(WORDS),
                               rnd.randint(0, U32_MAX), rnd.randint(0, U32_MAX), rnd.choice(WORDS),
                               rnd.choice(WORDS), rnd.choice(WORDS), rnd.randint(-(2**63), 2**63 - 1))
                      for _ in range(rnd.randint(0, 5))], lost=rnd.choice([0, 0, 3, U64_MAX]))
    return b.build()


def seed_batches(limits: Limits = TIGHT, now_ns: int = NOW) -> list[bytes]:
    """Valid serialized batches for a fuzzer's seed corpus: a fixed spread of random ones,
    the same in packed encoding, and sealed."""
    rnd = random.Random(20)
    out = []
    for i in range(24):
        b = random_batch(rnd, limits, now_ns)
        if i % 3 == 1:
            b = to_packed(b)
        elif i % 3 == 2:
            b = seal(b)
        out.append(b.SerializeToString())
    return out


# -- field mutations (on the packed form) -----------------------------------------------

Mutation = Callable[[pb.Batch, random.Random, Limits], None]
FIELD: dict[str, Mutation] = {}


def _field(fn: Mutation) -> Mutation:
    FIELD[fn.__name__.removeprefix("_")] = fn
    return fn


def _index_targets(b: pb.Batch) -> list[tuple[Any, str]]:
    """(message, field) of every string index of ``b``, scalar or repeated."""
    out: list[tuple[Any, str]] = [(b, "node_label_keys"), (b, "node_label_values")]
    for m in b.metrics:
        out += [(m, f) for f in ("name", "unit", "help", "label_keys", "label_values")]
    for h in b.histograms:
        out += [(h, f) for f in ("name", "unit", "help", "label_keys", "label_values")]
    for p in b.profiles:
        out += [(p, f) for f in ("name", "comm", "cgroup", "stack_frames")]
    if b.HasField("events"):
        out += [(b.events, f) for f in ("kind", "comm", "cgroup", "detail")]
    return out


def _poke(rnd: random.Random, column: Any, value: Any) -> None:
    """Set one element of a repeated field (appending to an empty one)."""
    if len(column):
        column[rnd.randrange(len(column))] = value
    else:
        column.append(value)


def _grow_or_shrink(rnd: random.Random, column: Any, filler: Any = 0) -> None:
    if len(column) and rnd.random() < 0.5:
        del column[rnd.randrange(len(column))]
    else:
        column.append(filler)


@_field
def _node_id(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    b.node_id = rnd.choice(["", "n" * lim.max_node_id, "n" * (lim.max_node_id + 1), "é" * lim.max_node_id,
                            "\n\x1b[31m" + "n" * 40, "x" * (1 << 20)])


@_field
def _boot_id(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    half = lim.max_boot_id // 2
    b.boot_id = rnd.choice(["", "b" * lim.max_boot_id, "b" * (lim.max_boot_id + 1), "é" * half,
                            "é" * (half + 1), "x" * (1 << 20)])


@_field
def _seq(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    b.seq = rnd.choice([0, 1, U64_MAX])


@_field
def _window(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    """Each bound of the window exactly (valid) or one nanosecond past it, and extremes."""
    skew, age, width = lim.max_future_skew_s * NS, lim.max_age_s * NS, lim.max_window_s * NS
    end = b.end_ns
    start, end = rnd.choice([
        (end, end), (end, max(0, end - NS)),  # empty, reversed
        (end - width, end), (end - width - 1, end),  # longest, one past
        (NOW + skew - NS, NOW + skew), (NOW + skew + 1 - NS, NOW + skew + 1),  # furthest ahead
        (NOW - age - NS, NOW - age), (NOW - age - 1 - NS, NOW - age - 1),  # oldest
        (b.start_ns, U64_MAX), (0, end), (0, 0), (U64_MAX - NS, U64_MAX),
    ])
    b.start_ns, b.end_ns = max(0, start), end


@_field
def _strings_first(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    if rnd.random() < 0.3:
        del b.strings[:]
    else:
        text = rnd.choice(["x", " ", "\x00"])
        if len(b.strings):
            b.strings[0] = text
        else:
            b.strings.append(text)


@_field
def _strings_unreferenced(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    k = rnd.choice([lim.max_unreferenced_strings, lim.max_unreferenced_strings + 1, rnd.randint(0, 3)])
    b.strings.extend(f"unreferenced-{i}" for i in range(k))


@_field
def _string_long(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    text = rnd.choice(["y", "é", "🙂"]) * (lim.max_string_bytes + rnd.choice([0, 1]))
    if len(b.strings) > 1:
        b.strings[rnd.randrange(1, len(b.strings))] = text
    else:
        b.strings.append(text)


def _referenced(b: pb.Batch, texts: list[str], lim: Limits) -> None:
    """Append strings to the table, each referred to (as label keys and values of a new
    counter family of as few series as the bounds allow): only the rule under test is
    broken, not the one on unreferenced strings."""
    n = len(b.strings)
    b.strings.extend(texts)
    ids = list(range(n, n + len(texts)))
    width = min(lim.max_label_keys, len(ids))
    if not width:
        return
    keys, values = ids[:width], ids[width:]
    rows = max(1, -(-len(values) // width))
    values += [0] * (rows * width - len(values))
    b.metrics.add(kind=pb.COUNTER, label_keys=keys, label_values=values, counter_values=[1] * rows)


@_field
def _strings_total(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    """The table's characters to exactly the bound, or one past it."""
    room = lim.max_strings_chars - sum(map(len, b.strings)) + rnd.choice([0, 1])
    width = lim.max_string_bytes
    texts = [f"{i:08d}".ljust(width, "t") for i in range(room // width)]
    if room % width:
        texts.append(f"{len(texts):08d}"[:room % width].ljust(room % width, "r"))
    if rnd.random() < 0.5:
        _referenced(b, texts, lim)
    else:
        b.strings.extend(texts)


@_field
def _strings_many(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    texts = [f"s{i}" for i in range(lim.max_strings - len(b.strings) + rnd.choice([0, 1]))]
    if rnd.random() < 0.5:
        _referenced(b, texts, lim)
    else:
        b.strings.extend(texts)


@_field
def _blocks_many(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    have = len(b.metrics) + len(b.histograms) + len(b.profiles)
    for _ in range(max(0, lim.max_blocks - have + rnd.choice([0, 1, 4 * lim.max_blocks]))):
        b.metrics.add(kind=pb.COUNTER)  # empty: valid, two bytes on the wire


@_field
def _label_keys_many(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    k = lim.max_label_keys + rnd.choice([0, 1])
    n = len(b.strings)
    b.strings.extend(f"key-{i}" for i in range(k))
    block = rnd.choice([b.metrics, b.histograms]).add(label_keys=range(n, n + k))
    if isinstance(block, pb.MetricBlock):
        block.kind = pb.COUNTER
    else:
        block.bucket_offsets.append(0)


@_field
def _stacks_many(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    rows = rnd.randint(0, 2)
    stacks = 2 * rows + rnd.choice([0, 1, 1000])
    b.profiles.add(stack_offsets=range(stacks + 1), stack_frames=[0] * stacks, pid=[1] * rows,
                   comm=[0] * rows, cgroup=[0] * rows, kernel_stack=[0] * rows,
                   user_stack=[-1] * rows, samples=[1] * rows)


@_field
def _node_labels_many(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    extra = lim.max_node_labels - len(b.node_label_keys) + rnd.choice([0, 1, 1000])
    b.node_label_keys.extend([0] * extra)
    b.node_label_values.extend([0] * extra)


@_field
def _index(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    msg, name = rnd.choice(_index_targets(b))
    n = len(b.strings)
    value = rnd.choice([n, n + 1, U32_MAX, max(0, n - 1), 0])
    if isinstance(getattr(msg, name), int):
        setattr(msg, name, value)
    else:
        _poke(rnd, getattr(msg, name), value)


@_field
def _metric_kind(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    if not b.metrics:
        b.metrics.add(kind=pb.COUNTER, counter_values=[1])
    m = rnd.choice(b.metrics)
    if rnd.random() < 0.5:
        m.kind = rnd.choice([pb.METRIC_KIND_UNSPECIFIED, 3, I32[1], I32[0]])
    elif m.kind == pb.COUNTER:
        m.gauge_values.append(1.0)  # a value in the other kind's column
    else:
        m.counter_values.append(1)


@_field
def _label_matrix(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    blocks = [*b.metrics, *b.histograms]
    if not blocks:
        b.metrics.add(kind=pb.COUNTER, counter_values=[1], label_keys=[0])
        blocks = list(b.metrics)
    blk = rnd.choice(blocks)
    if rnd.random() < 0.5:
        _grow_or_shrink(rnd, blk.label_values)
    elif len(blk.label_keys):
        # a key twice, the matrix widened to match: only the duplicate is wrong
        rows = len(blk.label_values) // len(blk.label_keys)
        width = len(blk.label_keys)
        values = list(blk.label_values)
        del blk.label_values[:]
        for r in range(rows):
            blk.label_values.extend([*values[r * width:(r + 1) * width], 0])
        blk.label_keys.append(blk.label_keys[0])
    else:
        blk.label_keys.append(0)  # a key but no column of values


@_field
def _gauge(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    value = rnd.choice([math.nan, math.inf, -math.inf, 1.7976931348623157e308, -0.0, 5e-324])
    b.metrics.add(kind=pb.GAUGE, gauge_values=[1.0, value][rnd.randint(0, 1):])


def _wrap_name(b: pb.Batch) -> int:
    """The one family name of every block near 2^64: two such blocks in a batch (or one
    doubled by ``_block_twice``) are each valid, and the merge adds them past 2^64-1,
    where it saturates (tests/unit/test_fuzz_batches.py, test_merged_counters_never_decrease)."""
    if "wrap" not in b.strings:
        b.strings.append("wrap")
    return list(b.strings).index("wrap")


@_field
def _counter_wrap(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    b.metrics.add(name=_wrap_name(b), kind=pb.COUNTER, counter_values=rnd.choice(
        [[U64_MAX, 1], [U64_MAX, 0], [2**63, 2**63], [2**63, 2**63 - 1], [U64_MAX] * 3]))


def _a_histogram(b: pb.Batch) -> Any:
    if not b.histograms:
        b.histograms.add(count=[3], sum=[9], zero_count=[1], bucket_offsets=[0, 2],
                         bucket_index=[0, 1], bucket_count=[1, 1])
    return b.histograms[0]


@_field
def _hist_scale(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    _a_histogram(b).scale = rnd.choice([1, -1, 20, I32[0]])


@_field
def _hist_columns(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    h = _a_histogram(b)
    _grow_or_shrink(rnd, getattr(h, rnd.choice(["count", "sum", "zero_count", "bucket_offsets",
                                                "bucket_count", "bucket_index"])))


@_field
def _hist_offsets(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    offs = _a_histogram(b).bucket_offsets
    choice = rnd.randrange(4) if len(offs) else 1
    if choice == 0:
        offs[0] = 1
    elif choice == 1:
        _poke(rnd, offs, rnd.choice([min(offs[-1] + 1, U32_MAX) if len(offs) else 1, U32_MAX]))
    elif choice == 2 and len(offs) > 2:
        offs[1], offs[-1] = min(offs[-1] + 1, U32_MAX), offs[1]  # decreasing somewhere
    else:
        del offs[:]


@_field
def _hist_bucket_index(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    h = _a_histogram(b)
    _poke(rnd, h.bucket_index, rnd.choice([-64, 127, -65, 128, *I32]))


@_field
def _hist_wide(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    w = lim.max_buckets_per_series + rnd.choice([0, 1])
    b.histograms.add(count=[w], sum=[w], zero_count=[0], bucket_offsets=[0, w],
                     bucket_index=[-64 + i % 192 for i in range(w)], bucket_count=[1] * w)


@_field
def _hist_wrap(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    big = [U64_MAX, rnd.choice([0, 1])]
    cols = {"count": [1, 1], "sum": [1, 1], "zero_count": [0, 0], "bucket_count": [1, 1]}
    cols[rnd.choice(list(cols))] = big
    b.histograms.add(name=_wrap_name(b), bucket_offsets=[0, 1, 2], bucket_index=[0, 1], **cols)


def _a_profile(b: pb.Batch) -> Any:
    if not b.profiles:
        b.profiles.add(stack_offsets=[0, 2], stack_frames=[0, 0], pid=[1], comm=[0], cgroup=[0],
                       kernel_stack=[0], user_stack=[-1], samples=[5])
    return b.profiles[0]


@_field
def _stack_deep(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    d = rnd.choice([lim.max_stack_depth, lim.max_stack_depth + 1, 1 << 17])
    b.profiles.add(stack_offsets=[0, d], stack_frames=[0] * d, pid=[1], comm=[0], cgroup=[0],
                   kernel_stack=[0], user_stack=[-1], samples=[1])


@_field
def _stack_id(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    p = _a_profile(b)
    stacks = max(0, len(p.stack_offsets) - 1)
    _poke(rnd, getattr(p, rnd.choice(["kernel_stack", "user_stack"])),
          rnd.choice([-2, -1, stacks, max(0, stacks - 1), *I32]))


@_field
def _stack_offsets(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    offs = _a_profile(b).stack_offsets
    choice = rnd.randrange(4)
    if choice == 0:
        del offs[:]
    elif choice == 1:
        _poke(rnd, offs, 1)
    elif choice == 2:
        _poke(rnd, offs, rnd.choice([min(offs[-1] + 1, U32_MAX) if len(offs) else 1, U32_MAX]))
    else:
        offs.insert(1, U32_MAX)  # decreasing after it


@_field
def _profile_columns(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    p = _a_profile(b)
    _grow_or_shrink(rnd, getattr(p, rnd.choice(["pid", "comm", "cgroup", "kernel_stack",
                                                "user_stack", "samples"])))


def _event(b: pb.Batch, time_ns: int, rows: int = 1) -> None:
    e = b.events
    e.time_ns.extend([time_ns] * rows)
    for col in (e.kind, e.pid, e.ppid, e.comm, e.cgroup, e.detail, e.code):
        col.extend([0] * rows)


@_field
def _events_many(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    _event(b, b.start_ns, max(0, lim.max_events - len(b.events.time_ns) + rnd.choice([0, 1])))


@_field
def _event_time(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    skew = lim.max_future_skew_s * NS
    t = rnd.choice([0, U64_MAX, b.start_ns - skew - 1, b.start_ns - skew, b.end_ns + skew,
                    b.end_ns + skew + 1])
    _event(b, min(max(t, 0), U64_MAX))


@_field
def _event_columns(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    if not len(b.events.time_ns):
        _event(b, b.start_ns)
    e = b.events
    _grow_or_shrink(rnd, getattr(e, rnd.choice(["time_ns", "kind", "pid", "ppid", "comm", "cgroup",
                                                "detail", "code"])))


@_field
def _events_lost(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    b.events.lost = rnd.choice([1, U64_MAX])


@_field
def _node_labels(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    _grow_or_shrink(rnd, getattr(b, rnd.choice(["node_label_keys", "node_label_values"])))


@_field
def _series_many(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    b.metrics.add(kind=pb.COUNTER, counter_values=[1] * (lim.max_series + rnd.choice([0, 1])))


@_field
def _blocks_dropped(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    b.ClearField(rnd.choice(["metrics", "histograms", "profiles", "events"]))


@_field
def _block_twice(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    """The same family twice in a batch: allowed, and must merge."""
    blocks = [c for c in (b.metrics, b.histograms, b.profiles) if len(c)]
    if blocks:
        col = rnd.choice(blocks)
        col.add().CopyFrom(col[rnd.randrange(len(col))])


@_field
def _producer(b: pb.Batch, rnd: random.Random, lim: Limits) -> None:
    b.producer = rnd.choice(["", "\x1b[2J", "p" * (1 << 20)])


# -- encoding mutations (after the encoding is chosen) ----------------------------------

def _columns(b: pb.Batch) -> list[tuple[Any, str, int]]:
    """(message, column, item size of its ``_le`` twin) of every numeric column."""
    msgs: list[Any] = [b, *b.metrics, *b.histograms, *b.profiles]
    if b.HasField("events"):
        msgs.append(b.events)
    return [(m, name, dt.itemsize) for m in msgs for name, dt in WIRE[m.DESCRIPTOR.name].items()]


def _both_encodings(b: pb.Batch, rnd: random.Random) -> None:
    msg, name, size = rnd.choice(_columns(b))
    raw: bytes = getattr(msg, name + "_le")
    packed = getattr(msg, name)
    if not raw:
        setattr(msg, name + "_le", bytes(size))
    if not len(packed):
        packed.append(0)


def _ragged_le(b: pb.Batch, rnd: random.Random) -> None:
    msg, name, size = rnd.choice(_columns(b))
    msg.ClearField(name)
    setattr(msg, name + "_le", getattr(msg, name + "_le") + rnd.randbytes(rnd.randint(1, size - 1)))


def _garbage_le(b: pb.Batch, rnd: random.Random) -> None:
    msg, name, size = rnd.choice(_columns(b))
    msg.ClearField(name)
    fill = rnd.choice([b"\xff", b"\x80", b"\x00", None])
    n = size * rnd.randint(0, 8)
    setattr(msg, name + "_le", rnd.randbytes(n) if fill is None else fill * n)


ENCODING: dict[str, Callable[[pb.Batch, random.Random], None]] = {
    "both_encodings": _both_encodings, "ragged_le": _ragged_le, "garbage_le": _garbage_le,
}


# -- the sealed form ---------------------------------------------------------------------

def _zstd(data: bytes, sized: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_content_size=sized).compress(data)


def _reseal_body(b: pb.Batch, body: pb.Batch, tail: bytes = b"") -> pb.Batch:
    sealed = seal(b)
    sealed.body = _zstd(body.SerializeToString() + tail)
    return sealed


def _body_identity(b: pb.Batch, rnd: random.Random, lim: Limits) -> pb.Batch:
    """A body that carries identity or window fields of its own, with the header's field
    left unset (so the body's value would win when the two are joined)."""
    body = pb.Batch()
    body.CopyFrom(b)
    field = rnd.choice(["node_id", "boot_id", "seq", "start_ns", "end_ns"])
    body.ClearField("node_id")
    body.ClearField("boot_id")
    if field.endswith("_id"):
        setattr(body, field, rnd.choice(["victim", "other-boot"]))
    else:  # another value, never 0 (0 would leave it out of the body)
        setattr(body, field, (getattr(b, field) + rnd.choice([1, 7 * NS])) % 2**64 or 1)
    for name in ("seq", "start_ns", "end_ns"):
        if name != field:
            body.ClearField(name)
    sealed = _reseal_body(b, body)
    if not field.endswith("_id"):
        sealed.ClearField(field)  # header seq/start/end 0: left out of the joined header
    return sealed


def _swallowed_header(b: pb.Batch, rnd: random.Random, lim: Limits) -> pb.Batch:
    """A body ending in an unknown length-delimited field whose length covers the clear
    header's bytes once they are appended: the header vanishes into that field and the
    body's own identity (another node's) is what the joined message carries."""
    body = pb.Batch()
    body.CopyFrom(b)
    body.node_id = rnd.choice(["victim", b.node_id])
    body.boot_id = rnd.choice(["other-boot", b.boot_id])
    tail = varint(99 << 3 | 2) + varint(len(header_bytes(b)))
    return _reseal_body(b, body, tail)


def _padded(b: pb.Batch, rnd: random.Random, lim: Limits) -> pb.Batch:
    """A sealed body ending in an unknown field of zeros (which the parse skips: the batch
    stays valid) sized so that the body inflates to exactly the bound for its compressed
    size (``Limits.max_inflation`` times it, at least ``inflation_floor``), one byte less,
    one byte more, or far more; with or without the size declared in the frame."""
    over = rnd.choice([-1, 0, 0, 1, 1, 4096])
    sized = rnd.random() < 0.7
    body = pb.Batch()
    body.CopyFrom(b)
    for name in _HEADER:
        body.ClearField(name)
    head = body.SerializeToString() + varint(99 << 3 | 2)
    n = 0
    for _ in range(16):  # the compressed size moves little with the padding: a few rounds
        raw = head + varint(n) + bytes(n)
        compressed = _zstd(raw, sized)
        bound = min(lim.max_bytes, max(lim.inflation_floor, lim.max_inflation * len(compressed)))
        if len(raw) == bound + over:
            break
        n = max(0, n + bound + over - len(raw))
    sealed = seal(b, level=1)
    sealed.body = compressed
    return sealed


SEAL: dict[str, Callable[[pb.Batch, random.Random, Limits], pb.Batch]] = {
    "sealed": lambda b, rnd, lim: seal(b, level=1),
    "sealed_twice": lambda b, rnd, lim: seal(seal(b, level=1), level=1),
    "body_garbage": lambda b, rnd, lim: pb.Batch(
        node_id=b.node_id, boot_id=b.boot_id, seq=b.seq, codec=pb.CODEC_ZSTD,
        body=rnd.choice([b"", rnd.randbytes(rnd.randint(1, 64)), b"\x28\xb5\x2f\xfd" + rnd.randbytes(12)])),
    "body_truncated": lambda b, rnd, lim: _cut(seal(b, level=1), rnd),
    "body_trailing": lambda b, rnd, lim: _trail(seal(b, level=1), rnd),
    "body_not_a_batch": lambda b, rnd, lim: pb.Batch(
        node_id=b.node_id, boot_id=b.boot_id, seq=b.seq, codec=pb.CODEC_ZSTD,
        body=_zstd(rnd.choice([b"\xff\xff\xff", b"\x0a\x05ab", rnd.randbytes(32)]))),
    "bomb_declared": lambda b, rnd, lim: pb.Batch(
        node_id=b.node_id, boot_id=b.boot_id, seq=b.seq, codec=pb.CODEC_ZSTD,
        body=_zstd(bytes(lim.max_bytes + 1))),
    "bomb_undeclared": lambda b, rnd, lim: pb.Batch(
        node_id=b.node_id, boot_id=b.boot_id, seq=b.seq, codec=pb.CODEC_ZSTD,
        body=_zstd(bytes(lim.max_bytes + 1), sized=False)),
    "codec_unknown": lambda b, rnd, lim: _set(seal(b, level=1), codec=rnd.choice([2, I32[1], -1])),
    "body_without_codec": lambda b, rnd, lim: _set(seal(b, level=1), codec=pb.CODEC_NONE),
    "body_identity": _body_identity,
    "swallowed_header": _swallowed_header,
    "padded": _padded,
}


def _set(b: pb.Batch, **fields: Any) -> pb.Batch:
    for k, v in fields.items():
        setattr(b, k, v)
    return b


def _cut(b: pb.Batch, rnd: random.Random) -> pb.Batch:
    b.body = b.body[:rnd.randrange(len(b.body))]
    return b


def _trail(b: pb.Batch, rnd: random.Random) -> pb.Batch:
    b.body += rnd.randbytes(rnd.randint(1, 16))
    return b


# -- byte mutations ----------------------------------------------------------------------

def _flip(wire: bytes, rnd: random.Random) -> bytes:
    data = bytearray(wire)
    for _ in range(rnd.randint(1, 4)):
        if data:
            data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
    return bytes(data)


BYTES: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "flip": _flip,
    "truncate": lambda w, rnd: w[:rnd.randrange(len(w))] if w else w,
    "append": lambda w, rnd: w + rnd.randbytes(rnd.randint(1, 16)),
    "insert": lambda w, rnd: (lambda i: w[:i] + rnd.randbytes(rnd.randint(1, 8)) + w[i:])(
        rnd.randint(0, len(w))),
    "twice": lambda w, rnd: w + w,  # protobuf merges: repeated fields doubled
    "unknown_field": lambda w, rnd: w + varint(rnd.choice([99, 536870911]) << 3 | 2) + varint(3) + b"abc",
}


def case(rnd: random.Random, limits: Limits, fields: list[str], encoding: str,
         encoding_mutation: str | None, seal_form: str | None, byte_mutation: str | None) -> bytes:
    """The wire bytes of a random valid batch spoiled by the named mutations, in order."""
    b = to_packed(random_batch(rnd, limits))
    for name in fields:
        FIELD[name](b, rnd, limits)
    if encoding == "raw":
        to_raw(b)
    if encoding_mutation is not None:
        ENCODING[encoding_mutation](b, rnd)
    if seal_form is not None:
        b = SEAL[seal_form](b, rnd, limits)
    wire = b.SerializeToString()
    if byte_mutation is not None:
        wire = BYTES[byte_mutation](wire, rnd)
    return wire


def mutate_wire(wire: bytes, rnd: random.Random, limits: Limits) -> bytes:
    """One structure-aware step from ``wire`` (a fuzzer's current input): open and parse
    it, apply one or two field mutations, re-encode and maybe seal it; the bytes flipped
    when they do not parse."""
    try:
        b = parse_batch(wire)
        if b.codec == pb.CODEC_ZSTD:
            body = pb.Batch.FromString(zstandard.ZstdDecompressor().decompress(
                b.body, max_output_size=limits.max_bytes))
            body.MergeFrom(pb.Batch(**{k: getattr(b, k) for k in
                                       ("node_id", "boot_id", "seq", "start_ns", "end_ns")}))
            b = body
        to_packed(b)
    except Exception:  # not a batch we can open: stay at the byte level
        return BYTES[rnd.choice(sorted(BYTES))](wire, rnd)
    for name in rnd.sample(sorted(FIELD), rnd.randint(1, 2)):
        FIELD[name](b, rnd, limits)
    if rnd.random() < 0.5:
        to_raw(b)
    if rnd.random() < 0.1:
        ENCODING[rnd.choice(sorted(ENCODING))](b, rnd)
    if rnd.random() < 0.3:
        b = SEAL[rnd.choice(sorted(SEAL))](b, rnd, limits)
    return b.SerializeToString()


# -- the oracle --------------------------------------------------------------------------

_TYPECODES = {FieldDescriptor.TYPE_UINT32: "I", FieldDescriptor.TYPE_SINT32: "i",
              FieldDescriptor.TYPE_UINT64: "Q", FieldDescriptor.TYPE_FIXED64: "Q",
              FieldDescriptor.TYPE_SINT64: "q", FieldDescriptor.TYPE_DOUBLE: "d"}
assert all(array(c).itemsize == (4 if c in "Ii" else 8) for c in _TYPECODES.values())


class _Unreadable(Exception):
    pass


def _col(msg: Any, name: str) -> list[Any]:
    """A column from whichever encoding is set (the contract in batch.proto), or
    _Unreadable: both set, or a raw twin that is not a whole number of values."""
    raw: bytes = getattr(msg, name + "_le")
    packed = list(getattr(msg, name))
    if not raw:
        return packed
    if packed:
        raise _Unreadable
    values = array(_TYPECODES[msg.DESCRIPTOR.fields_by_name[name].type])
    if len(raw) % values.itemsize:
        raise _Unreadable
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def _inflate(body: bytes, max_bytes: int, bound: int) -> bytes | frozenset[str]:
    """The first zstd frame of ``body`` inflated, fed 64 bytes at a time so a bomb stops
    early; or why it is refused: "inflation" once it yields more than ``bound`` (the
    bound for its size, when under ``max_bytes``; a frame that declares more is refused
    from its header), "encoding" if it is not one whole frame or yields more than
    ``max_bytes``."""
    too_far = frozenset({"inflation" if bound < max_bytes else "encoding"})
    if body[:4] != b"\x28\xb5\x2f\xfd":
        return frozenset({"encoding"})
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError:
        return frozenset({"encoding"})
    if declared > max_bytes:
        return frozenset({"encoding"})
    if declared > bound:
        return too_far
    if declared == 0:
        # python-zstandard returns b"" for a frame that declares no content without
        # reading its blocks, corrupt or not: an empty body (only the header is left)
        return b""
    d = zstandard.ZstdDecompressor().decompressobj()
    out: list[bytes] = []
    total = 0
    try:
        for at in range(0, len(body), 64):
            out.append(d.decompress(body[at:at + 64]))
            total += len(out[-1])
            if total > bound:
                return too_far
            if d.eof:
                break
    except zstandard.ZstdError:
        # corrupt: did what came before the fault already go past the bound?
        return too_far if _yield_before_fault(body, bound) > bound else frozenset({"encoding"})
    return b"".join(out) if d.eof else frozenset({"encoding"})


def _yield_before_fault(body: bytes, bound: int) -> int:
    """Bytes a corrupt frame yields before its fault (fed a byte at a time, so none is
    lost with the call that fails), or ``bound`` + 1 once past it."""
    d = zstandard.ZstdDecompressor().decompressobj()
    total = 0
    try:
        for at in range(len(body)):
            total += len(d.decompress(body[at:at + 1]))
            if total > bound or d.eof:
                break
    except zstandard.ZstdError:
        pass
    return total


_HEADER = ("node_id", "boot_id", "seq", "start_ns", "end_ns")


def expected_reasons(batch: pb.Batch, limits: Limits, now_ns: int, size: int) -> frozenset[str]:
    """Every rejection reason that applies to ``batch`` as received (``size``: its wire
    bytes); empty if it must be accepted."""
    out: set[str] = set()
    _identity(batch, limits, out)  # the clear header, before anything else
    whole = batch
    if batch.codec != pb.CODEC_NONE or batch.body:
        if batch.codec != pb.CODEC_ZSTD:
            return frozenset(out | {"encoding"})
        # how far a body may inflate for its size: the ratio bound, at least the floor
        bound = min(limits.max_bytes, max(limits.inflation_floor, limits.max_inflation * len(batch.body)))
        raw = _inflate(batch.body, limits.max_bytes, bound)
        if isinstance(raw, frozenset):
            return frozenset(out | raw)
        try:  # the identity laid over the body, the way the contract says
            whole = pb.Batch.FromString(raw + header_bytes(batch))
        except Exception:
            return frozenset(out | {"encoding"})
        if whole.codec != pb.CODEC_NONE or whole.body:
            return frozenset(out | {"encoding"})
        if any(getattr(whole, f) != getattr(batch, f) for f in _HEADER):
            out.add("identity")  # what is merged must be what was checked and deduplicated
        size = len(raw)
    if size > limits.max_bytes:
        out.add("size")
    _identity(whole, limits, out)
    if whole.seq < 1:
        out.add("identity")
    if not whole.start_ns < whole.end_ns or whole.end_ns - whole.start_ns > limits.max_window_s * NS:
        out.add("window")
    if (whole.end_ns > now_ns + limits.max_future_skew_s * NS
            or whole.end_ns < now_ns - limits.max_age_s * NS):
        out.add("window")
    n, lengths = len(whole.strings), [len(s) for s in whole.strings]
    if (n == 0 or whole.strings[0] != "" or n > limits.max_strings
            or max(lengths) > limits.max_string_bytes or sum(lengths) > limits.max_strings_chars):
        out.add("strings")
    if len(whole.metrics) + len(whole.histograms) + len(whole.profiles) > limits.max_blocks:
        return frozenset(out | {"series"})  # too many to decode: the columns are not read
    try:
        _columns_rules(whole, limits, out)
    except _Unreadable:
        out.add("encoding")
    return frozenset(out)


def _identity(b: pb.Batch, limits: Limits, out: set[str]) -> None:
    if not 1 <= len(b.node_id) <= limits.max_node_id or not 1 <= len(b.boot_id.encode()) <= limits.max_boot_id:
        out.add("identity")


def _sum_past_u64(values: list[int]) -> bool:
    return sum(values) > U64_MAX


def _columns_rules(b: pb.Batch, lim: Limits, out: set[str]) -> None:
    n = len(b.strings)
    refs: list[int] = []
    series = 0
    keys, vals = _col(b, "node_label_keys"), _col(b, "node_label_values")
    refs += keys + vals
    if len(keys) != len(vals) or len(keys) > lim.max_node_labels:
        out.add("series")
    for m in b.metrics:
        keys, vals = _col(m, "label_keys"), _col(m, "label_values")
        counters, gauges = _col(m, "counter_values"), _col(m, "gauge_values")
        refs += [m.name, m.unit, m.help, *keys, *vals]
        rows = len(counters) if m.kind == pb.COUNTER else len(gauges)
        other = gauges if m.kind == pb.COUNTER else counters
        if m.kind not in (pb.COUNTER, pb.GAUGE) or other or len(vals) != rows * len(keys) \
                or len(set(keys)) != len(keys) or len(keys) > lim.max_label_keys:
            out.add("series")
        series += rows
        if m.kind == pb.GAUGE and not all(math.isfinite(v) for v in gauges):
            out.add("values")
        if m.kind != pb.GAUGE and _sum_past_u64(counters):
            out.add("values")
    for h in b.histograms:
        keys, vals = _col(h, "label_keys"), _col(h, "label_values")
        count, sums, zero = _col(h, "count"), _col(h, "sum"), _col(h, "zero_count")
        offs, idx, cnt = _col(h, "bucket_offsets"), _col(h, "bucket_index"), _col(h, "bucket_count")
        refs += [h.name, h.unit, h.help, *keys, *vals]
        k = len(count)
        widths = [b_ - a for a, b_ in zip(offs, offs[1:], strict=False)]
        if (h.scale != 0 or len(sums) != k or len(zero) != k or len(offs) != k + 1
                or len(vals) != k * len(keys) or len(set(keys)) != len(keys) or len(keys) > lim.max_label_keys
                or not offs or offs[0] != 0 or offs[-1] != len(idx) or any(w < 0 for w in widths)
                or len(cnt) != len(idx) or any(w > lim.max_buckets_per_series for w in widths)
                or any(not -64 <= i <= 127 for i in idx)):
            out.add("buckets")
        series += k
        if any(_sum_past_u64(c) for c in (count, sums, zero, cnt)):
            out.add("values")
    for p in b.profiles:
        offs, frames = _col(p, "stack_offsets"), _col(p, "stack_frames")
        samples = _col(p, "samples")
        comm, cgroup = _col(p, "comm"), _col(p, "cgroup")
        rows = len(samples)
        stacks = len(offs) - 1
        widths = [b_ - a for a, b_ in zip(offs, offs[1:], strict=False)]
        ids = _col(p, "kernel_stack") + _col(p, "user_stack")
        refs += [p.name, *comm, *cgroup, *frames]
        if (any(len(c) != rows for c in (_col(p, "pid"), comm, cgroup, _col(p, "kernel_stack"),
                                          _col(p, "user_stack")))
                or not offs or offs[0] != 0 or offs[-1] != len(frames) or any(w < 0 for w in widths)
                or any(w > lim.max_stack_depth for w in widths) or stacks > 2 * rows
                or any(not -1 <= i < stacks for i in ids)):
            out.add("stacks")
        series += rows
    if b.HasField("events"):
        e = b.events
        times = _col(e, "time_ns")
        cols = [_col(e, c) for c in ("kind", "pid", "ppid", "comm", "cgroup", "detail", "code")]
        refs += cols[0] + cols[3] + cols[4] + cols[5]
        skew = lim.max_future_skew_s * NS
        if (any(len(c) != len(times) for c in cols) or len(times) > lim.max_events
                or any(not b.start_ns - skew <= t <= b.end_ns + skew for t in times)):
            out.add("events")
    if series > lim.max_series:
        out.add("series")
    if any(i >= n for i in refs) or n - len(set(refs) | {0}) > lim.max_unreferenced_strings:
        out.add("strings")


# -- the check ----------------------------------------------------------------------------

class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


_LOG = logging.getLogger("stratoscope.fuzz.rejections")
_LOG.propagate = False
_LOG.setLevel(logging.WARNING)
_LINES = _Lines()
_LOG.addHandler(_LINES)


@dataclass(frozen=True)
class Outcome:
    status: int  # ingest_pb2.Ack.Status
    label: str  # validate.REASONS for REJECTED, "" for ACCEPTED
    expected: frozenset[str]  # the oracle's reasons


def check_wire(wire: bytes, limits: Limits = TIGHT, now_ns: int = NOW) -> Outcome:
    """``wire`` through the ingest path (parse, ``Gate.admit``), asserting that:

    * bytes that are not a Batch are rejected for "encoding" (``parse_batch``), and nothing
      but ``BatchRejected`` leaves the parser or the gate;
    * a fresh gate answers ACCEPTED or REJECTED, a rejection with a reason from the fixed
      set that the oracle also finds, an acceptance only when the oracle finds none;
    * an accepted batch's columns carry the identity the gate checked and deduplicated,
      and go through the hand-over and the merge, to a Kafka block, without error;
    * a rejection's log line is one line of printable ASCII of bounded length.
    """
    try:
        batch = parse_batch(wire)
    except BatchRejected as exc:
        assert exc.reason == "encoding", exc.reason
        return Outcome(ingest_pb2.Ack.REJECTED, exc.reason, frozenset({"encoding"}))
    expected = expected_reasons(batch, limits, now_ns, len(wire))
    gate = Gate(limits, clock=lambda: now_ns)
    gate.rejections = RejectionLog(logger=_LOG)
    del _LINES.lines[:]
    ack, cols, label = gate.admit(batch, None, len(wire))
    status = ack.status
    if status == ingest_pb2.Ack.REJECTED:
        assert label in REASONS, label
        assert cols is None and ack.reason
        assert label in expected, f"rejected for {label!r} ({ack.reason}); the oracle found {sorted(expected)}"
        [line] = _LINES.lines
        assert line.isascii() and line.isprintable() and len(line) < 400, line
    else:
        assert status == ingest_pb2.Ack.ACCEPTED, ingest_pb2.Ack.Status.Name(status)
        assert label == "" and cols is not None
        assert not expected, f"accepted; the oracle found {sorted(expected)}"
        assert (cols.node_id, cols.boot_id, cols.seq) == (batch.node_id, batch.boot_id, batch.seq), \
            f"accepted as {(cols.node_id, cols.boot_id, cols.seq)}, checked as {(batch.node_id, batch.boot_id, batch.seq)}"
        assert (cols.start_ns, cols.end_ns) == (batch.start_ns, batch.end_ns)
        assert gate.dedup.seen(batch.node_id, batch.boot_id, batch.seq)
        _downstream(cols)
    return Outcome(status, label, expected)


def _downstream(cols: BatchCols) -> None:
    """What the regional does with an accepted batch, up to a sink's encoding."""
    agg = Aggregator(MergeSettings(resolution_s=60, lateness_s=0))
    agg.record(unpack(pack(cols)))
    for block in agg.flush(0, force=True):
        block_batch(block)
