"""KafkaSink behind DeliveryQueue, end to end against the real broker of scripts/kafka.sh.

Run it with:

    scripts/kafka.sh start
    KAFKA_BOOTSTRAP=127.0.0.1:19092 .venv/bin/pytest tests/integration/test_kafka_sink.py -q

KAFKA_BOOTSTRAP is required: without it every test here fails (never skips).
Each test writes to its own topic prefix, so runs never see each other's records.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections import Counter
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.codec import has_zstd

from stratoscope.edge.batch import BatchBuilder, EventRow, batch_to_dict
from stratoscope.edge.decode import Histogram, ProfileRow
from stratoscope.regional.delivery import DeliveryQueue
from stratoscope.regional.frame import Block
from stratoscope.regional.sinks.base import PermanentError, RetriableError, SinkError
from stratoscope.regional.sinks.kafka import (
    ROLLUP_KEY,
    SCHEMA,
    KafkaSink,
    compression_type,
    decode_message,
)
from stratoscope.v1 import batch_pb2 as pb
from tests.conftest import kafka_bootstrap
from tests.frames import block_batch, merged_blocks

pytestmark = pytest.mark.kafka

CONSUME_DEADLINE_S = 60.0
T0 = 1_700_000_040_000_000_000  # a minute boundary (the merge aligns windows to the resolution)
MINUTE_NS = 60_000_000_000




def _prefix() -> str:
    return f"stratoscope-it-{uuid.uuid4().hex[:12]}"


# --- blocks with known content, from the regional's merge ----------------------------

def _full_batch() -> pb.Batch:
    """node-a, one minute: counters, a gauge, a histogram, a profile and events."""
    b = BatchBuilder("node-a", "boot-1", 7, T0, T0 + MINUTE_NS, {"region": "eu-1", "rack": "r9"})
    b.add_counters(
        "syscalls_total", "1", "syscalls entered", ["syscall"],
        {("read",): 10, ("write",): 32},
    )
    b.add_counters("run_queue_length", "1", "runnable tasks", [], {(): 3}, kind=pb.GAUGE)
    b.add_histograms(
        "block_io_latency", "ns", "block I/O latency", ["disk"],
        {("sda",): Histogram(buckets={10: 4, 12: 1}, zero=2, count=7, sum=9000)},
    )
    b.add_profile("cpu", 10_101_010, {
        ProfileRow(101, "burn", "/sys/fs/cgroup/a", ("do_syscall_64",), ("main", "spin")): 40,
        ProfileRow(102, "idle", "/sys/fs/cgroup/b", None, ("loop",)): 5,
    })
    b.add_events([
        EventRow(T0 + 5, "exec", 200, 1, "sh", "/sys/fs/cgroup/a", "/bin/sh", 0),
        EventRow(T0 + 9, "exit", 200, 1, "sh", "/sys/fs/cgroup/a", "", 3),
    ], lost=1)
    return b.build()


def _counters_batch(node: str, read: int, write: int) -> pb.Batch:
    b = BatchBuilder(node, "boot-2" if node else "", 3, T0, T0 + MINUTE_NS, {"region": "eu-1"},
                     producer="stratoscope-regional")
    b.add_counters(
        "syscalls_total", "1", "syscalls entered", ["syscall"],
        {("read",): read, ("write",): write},
    )
    return b.build()


def _full_block() -> Block:
    (blk,) = merged_blocks(_full_batch())
    return blk


def _blocks() -> list[Block]:
    """One merged frame: the roll-up (node "", its part first), node-a and node-b."""
    return merged_blocks(
        _full_batch(),
        _counters_batch("node-b", 100, 200),
        _counters_batch("", 1000, 2000),  # roll-up across nodes
    )


def _merged(batch: pb.Batch) -> dict[str, Any]:
    """batch_to_dict of what the merge makes of one node's only batch of a window: the
    same rows and node labels; a block has no boot_id or seq (it may merge many)."""
    return dict(batch_to_dict(batch), boot_id="", seq=0)


def _only(d: dict[str, Any], kind: str) -> dict[str, Any]:
    """batch_to_dict of a block restricted to one kind: what its record must hold."""
    out = dict(d)
    if kind != "metrics":
        out["metrics"], out["histograms"] = [], []
    if kind != "profiles":
        out["profiles"] = []
    if kind != "events":
        out["events"], out["events_lost"] = [], 0
    return out


# --- Kafka helpers ----------------------------------------------------------------

def _queue(sink: KafkaSink, **kw: Any) -> DeliveryQueue:
    opts: dict[str, Any] = {
        "max_queue_blocks": 1000,
        "batch_max_blocks": 50,
        "batch_max_wait_s": 0.05,
        "timeout_s": 30.0,
        "max_retries": 3,
        "backoff_initial_s": 0.2,
        "backoff_max_s": 1.0,
    }
    opts.update(kw)
    return DeliveryQueue(sink, **opts)


async def _consume_all(bootstrap: str, topics: list[str]) -> dict[str, list[Any]]:
    """Every record of ``topics`` from the beginning up to the current end offsets."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    assert all(t["error_code"] == 0 for t in described), described
    tps = [
        TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]
    ]
    assert {tp.topic for tp in tps} == set(topics), described
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="stratoscope-it-sink-consumer",
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: dict[str, list[Any]] = {t: [] for t in topics}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONSUME_DEADLINE_S
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            assert loop.time() < deadline, "records not consumed in time"
            got = await consumer.getmany(*tps, timeout_ms=500)
            for tp, records in got.items():
                out[tp.topic].extend(records)
        return out
    finally:
        await consumer.stop()


def _topics(prefix: str) -> dict[str, str]:
    return {k: f"{prefix}.{k}" for k in ("metrics", "profiles", "events")}


# --- tests ------------------------------------------------------------------------

async def test_blocks_arrive_split_by_kind_with_exact_values_keys_and_headers() -> None:
    bootstrap = kafka_bootstrap()
    prefix = _prefix()
    topics = _topics(prefix)
    blocks = _blocks()
    sink = KafkaSink(bootstrap, topic_prefix=prefix, request_timeout_s=30)
    q = _queue(sink)
    await q.start()
    try:
        await sink.health_check()
        await q.put(blocks)
        await q.flush()
    finally:
        await q.stop()
    assert (q.delivered, q.failed, q.dropped, q.queued) == (3, 0, 0, 0)

    # metrics x3 (every block), profiles x1 and events x1 (node-a only).
    got = await _consume_all(bootstrap, list(topics.values()))
    assert {k: len(got[t]) for k, t in topics.items()} == {
        "metrics": 3, "profiles": 1, "events": 1,
    }

    rollup, node_a, node_b = blocks
    originals = {
        node_a.block_id: _merged(_full_batch()),
        node_b.block_id: _merged(_counters_batch("node-b", 100, 200)),
        rollup.block_id: _merged(_counters_batch("", 1000, 2000)),
    }
    for kind, topic in topics.items():
        for rec in got[topic]:
            block_id, batch = decode_message(rec.value, rec.headers)
            assert dict(rec.headers) == {
                "schema": SCHEMA,
                "block_id": block_id.encode(),
                "resolution_s": b"60",
                "kind": kind.encode(),
            }
            node = originals[block_id]["node_id"]
            assert rec.key == (node.encode() if node else ROLLUP_KEY)
            # Identity, node labels and this kind's data, exactly; nothing of other kinds.
            assert batch_to_dict(batch) == _only(originals[block_id], kind)

    by_id = {
        decode_message(r.value, r.headers)[0]: batch_to_dict(decode_message(r.value, r.headers)[1])
        for r in got[topics["metrics"]]
    }
    assert set(by_id) == {node_a.block_id, node_b.block_id, rollup.block_id}
    assert [r.key for r in got[topics["metrics"]]] == [b"*", b"node-a", b"node-b"]
    a = by_id[node_a.block_id]
    assert (a["node_id"], a["boot_id"], a["seq"], a["start_ns"], a["end_ns"]) == (
        "node-a", "", 0, T0, T0 + MINUTE_NS,
    )
    assert a["node_labels"] == {"rack": "r9", "region": "eu-1"}
    assert a["metrics"] == [
        {"name": "syscalls_total", "kind": "counter", "unit": "1", "series": [
            {"labels": {"syscall": "read"}, "value": 10},
            {"labels": {"syscall": "write"}, "value": 32},
        ]},
        {"name": "run_queue_length", "kind": "gauge", "unit": "1", "series": [
            {"labels": {}, "value": 3.0},
        ]},
    ]
    assert a["histograms"] == [{
        "name": "block_io_latency", "unit": "ns", "scale": 0, "series": [{
            "labels": {"disk": "sda"}, "count": 7, "sum": 9000, "zero_count": 2,
            "buckets": {"10": 4, "12": 1},
        }],
    }]
    assert a["profiles"] == [] and a["events"] == []
    assert by_id[rollup.block_id]["node_id"] == ""

    _, prof = decode_message(got[topics["profiles"]][0].value, got[topics["profiles"]][0].headers)
    assert not prof.metrics and not prof.histograms and not prof.HasField("events")
    assert batch_to_dict(prof)["profiles"] == [{
        "name": "cpu", "period_ns": 10_101_010, "samples": [
            {"pid": 101, "comm": "burn", "cgroup": "/sys/fs/cgroup/a",
             "kernel_stack": ["do_syscall_64"], "user_stack": ["main", "spin"], "count": 40},
            {"pid": 102, "comm": "idle", "cgroup": "/sys/fs/cgroup/b",
             "kernel_stack": None, "user_stack": ["loop"], "count": 5},
        ],
    }]

    _, ev = decode_message(got[topics["events"]][0].value, got[topics["events"]][0].headers)
    evd = batch_to_dict(ev)
    assert evd["events_lost"] == 1
    assert [(e["time_ns"], e["kind"], e["pid"], e["comm"], e["detail"], e["code"])
            for e in evd["events"]] == [
        (T0 + 5, "exec", 200, "sh", "/bin/sh", 0),
        (T0 + 9, "exit", 200, "sh", "", 3),
    ]


async def test_redelivered_blocks_are_deduplicated_by_block_id_header() -> None:
    bootstrap = kafka_bootstrap()
    prefix = _prefix()
    topics = _topics(prefix)
    blocks = _blocks()
    # Once through a queue, then again through a second queue and sink, the way a
    # regional re-sends blocks whose acknowledgement it never saw (retry, restart).
    for _ in range(2):
        sink = KafkaSink(bootstrap, topic_prefix=prefix, request_timeout_s=30)
        q = _queue(sink)
        await q.start()
        try:
            await q.put(blocks)
            await q.flush()
        finally:
            await q.stop()
        assert (q.delivered, q.failed) == (3, 0)

    got = await _consume_all(bootstrap, list(topics.values()))

    def syscall_totals(dedupe: bool) -> Counter[str]:
        seen: set[tuple[str, str]] = set()
        totals: Counter[str] = Counter()
        for rec in got[topics["metrics"]]:
            block_id, batch = decode_message(rec.value, rec.headers)
            kind = dict(rec.headers)["kind"].decode()
            if dedupe:
                if (kind, block_id) in seen:
                    continue
                seen.add((kind, block_id))
            for m in batch_to_dict(batch)["metrics"]:
                if m["name"] == "syscalls_total":
                    for s in m["series"]:
                        totals[s["labels"]["syscall"]] += s["value"]
        return totals

    assert len(got[topics["metrics"]]) == 6  # every record twice in the log ...
    assert len(got[topics["profiles"]]) == 2 and len(got[topics["events"]]) == 2
    assert syscall_totals(dedupe=False) == {"read": 2 * 1110, "write": 2 * 2232}
    # ... and exactly once after de-duplicating on (kind, block_id).
    assert syscall_totals(dedupe=True) == {"read": 10 + 100 + 1000, "write": 32 + 200 + 2000}
    ids = [decode_message(r.value, r.headers)[0] for r in got[topics["events"]]]
    assert ids == [blocks[1].block_id] * 2  # node-a's


async def test_record_rejected_by_the_broker_is_a_permanent_error() -> None:
    bootstrap = kafka_bootstrap()
    prefix = _prefix()
    topics = _topics(prefix)
    # The profiles topic accepts at most 1 KiB per record batch.
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name=topics["profiles"], num_partitions=1, replication_factor=1,
                      topic_configs={"max.message.bytes": "1024"})],
            timeout_ms=30000,
        )
    finally:
        await admin.close()

    b = BatchBuilder("node-big", "boot-9", 1, T0, T0 + MINUTE_NS, {})
    b.add_counters("syscalls_total", "1", "", ["syscall"], {("read",): 5})
    frames = tuple(secrets.token_hex(32) for _ in range(200))  # ~13 KB, incompressible
    b.add_profile("cpu", 1, {ProfileRow(1, "big", "/", None, frames): 1})
    (big,) = merged_blocks(b.build())

    sink = KafkaSink(bootstrap, topic_prefix=prefix, request_timeout_s=30)
    try:
        with pytest.raises(PermanentError) as err:
            await sink.deliver([big])
    finally:
        await sink.stop()
    text = str(err.value)
    assert "1 of 2 record(s) not delivered" in text
    assert f"block {big.block_id} (profiles) to {topics['profiles']}" in text
    assert "MessageSizeTooLargeError" in text
    # the block's other record (its metrics) was written
    written = await _consume_all(bootstrap, [topics["metrics"], topics["profiles"]])
    assert (len(written[topics["metrics"]]), len(written[topics["profiles"]])) == (1, 0)

    # Through the queue: counted as failed, reported to on_drop, never retried.
    dropped: list[str] = []
    sink = KafkaSink(bootstrap, topic_prefix=prefix, request_timeout_s=30)
    q = _queue(sink, on_drop=lambda bs, why: dropped.append(why))
    await q.start()
    try:
        await q.put([big])
        await q.flush()
    finally:
        await q.stop()
    assert (q.delivered, q.failed, q.retried) == (0, 1, 0)
    assert len(dropped) == 1 and "MessageSizeTooLargeError" in dropped[0]


async def test_health_check_passes_against_the_broker_before_and_after_start() -> None:
    bootstrap = kafka_bootstrap()
    sink = KafkaSink(bootstrap, topic_prefix=_prefix(), request_timeout_s=10)
    try:
        await sink.health_check()  # a throwaway client
        await sink.start()
        await sink.start()  # idempotent
        await sink.health_check()  # the producer's own client
    finally:
        await sink.stop()
        await sink.stop()


async def test_unreachable_broker_health_check_raises_sink_error_quickly() -> None:
    kafka_bootstrap()
    sink = KafkaSink("127.0.0.1:1", topic_prefix=_prefix(), request_timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(SinkError, match=r"kafka at 127\.0\.0\.1:1: "):
        await sink.health_check()
    assert time.monotonic() - t0 < 5.0
    # Delivery to it is retriable (the broker may come back), and also quick.
    t0 = time.monotonic()
    with pytest.raises(RetriableError, match=r"cannot connect to Kafka at 127\.0\.0\.1:1"):
        await sink.deliver(_blocks()[:1])
    assert time.monotonic() - t0 < 5.0
    assert not sink.started
    await sink.stop()


# --- the record format, without a broker --------------------------------------------

def test_records_split_by_kind_and_skip_empty_kinds() -> None:
    sink = KafkaSink("127.0.0.1:1", topic_prefix="p")
    (empty,) = merged_blocks(BatchBuilder("n", "boot-1", 1, T0, T0 + MINUTE_NS, {}).build())
    (rollup,) = merged_blocks(_counters_batch("", 1, 2))
    full_block = _full_block()
    recs = sink.records([full_block, empty, rollup])
    assert [(r.block_id, r.topic, r.key) for r in recs] == [
        (full_block.block_id, "p.metrics", b"node-a"),
        (full_block.block_id, "p.profiles", b"node-a"),
        (full_block.block_id, "p.events", b"node-a"),
        (rollup.block_id, "p.metrics", ROLLUP_KEY),
    ]
    # Every part keeps the whole string table, so it decodes on its own.
    full = block_batch(full_block)
    for r in recs[:3]:
        assert list(decode_message(r.value, r.headers)[1].strings) == list(full.strings)


def test_decode_message_refuses_foreign_records() -> None:
    value = pb.Batch(node_id="n").SerializeToString()
    with pytest.raises(ValueError, match="record schema is None, expected"):
        decode_message(value, [])
    with pytest.raises(ValueError, match="record schema is b'other.v1'"):
        decode_message(value, [("schema", b"other.v1"), ("block_id", b"x")])
    with pytest.raises(ValueError, match="no block_id header"):
        decode_message(value, [("schema", SCHEMA)])
    assert decode_message(value, [("schema", SCHEMA), ("block_id", b"x")])[0] == "x"


def test_compression_choice() -> None:
    assert compression_type("auto") == ("zstd" if has_zstd() else "gzip")
    assert compression_type("gzip") == "gzip"
    assert compression_type("none") is None
    with pytest.raises(ValueError, match="unknown Kafka compression 'brotli'"):
        compression_type("brotli")
    if not has_zstd():
        with pytest.raises(ValueError, match="needs the 'cramjam' package"):
            compression_type("zstd")
