"""The contract every sink keeps, run against both real sinks (no mocks).

ClickHouse runs on the embedded engine (chdb, the test run's one directory, a fresh database
per test); Kafka on the broker of scripts/kafka.sh (KAFKA_BOOTSTRAP, a fresh topic
prefix per test). Blocks come from the regional's merge (tests/frames.py).

The contract (regional/sinks/base.py):
- ``stop()`` is safe without ``start()`` and twice; ``start()`` is idempotent.
- ``health_check()`` passes for a started sink that can take data, and raises
  ``RetriableError`` for one that cannot reach its backend.
- ``deliver()`` writes every block; delivering the same blocks again changes nothing
  a reader sees once it de-duplicates by block id as the sink documents (ClickHouse
  does it on insert; Kafka consumers do it on ``(kind, block_id)``).
- A backend that cannot be reached fails ``start()`` and ``deliver()`` with
  ``RetriableError``; blocks the backend refuses for good fail with ``PermanentError``.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, Protocol

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stratoscope.edge.batch import BatchBuilder, batch_to_dict
from stratoscope.edge.decode import ProfileRow
from stratoscope.regional.frame import Block
from stratoscope.regional.merge import Rollup
from stratoscope.regional.sinks.base import BlockedError, PermanentError, RetriableError, Sink
from stratoscope.regional.sinks.clickhouse import ClickHouseSink
from stratoscope.regional.sinks.kafka import KafkaSink, decode_message
from tests.conftest import kafka_bootstrap
from tests.frames import merged_blocks
from tests.integration.test_kafka_sink import _consume_all

NS = 1_000_000_000
#: A minute boundary two hours ago: inside every ClickHouse TTL.
START = (int(time.time()) // 3600 - 2) * 3600

#: (node, syscall, comm) -> syscalls_total the edges counted in the window.
EDGE_COUNTS: dict[str, dict[tuple[str, ...], int]] = {
    "n1": {("read", "nginx"): 100, ("write", "nginx"): 40, ("read", "redis"): 7},
    "n2": {("read", "nginx"): 5, ("write", "sh"): 1},
}
#: What every sink must hold after delivery: each node's series, and the roll-up across
#: nodes by syscall (node "", no comm).
EXPECTED = {
    ("n1", "read", "nginx"): 100, ("n1", "write", "nginx"): 40, ("n1", "read", "redis"): 7,
    ("n2", "read", "nginx"): 5, ("n2", "write", "sh"): 1,
    ("", "read", ""): 112, ("", "write", ""): 41,
}


def window_blocks() -> list[Block]:
    """Two nodes' batches of one window through the merge, rolled up by syscall."""
    batches = []
    for seq, (node, counts) in enumerate(EDGE_COUNTS.items(), start=1):
        b = BatchBuilder(node, "boot-1", seq, START * NS, (START + 60) * NS, {"region": "eu-1"})
        b.add_counters("syscalls_total", "1", "syscalls entered", ["syscall", "comm"], counts)
        batches.append(b.build())
    return merged_blocks(*batches, regional_id="contract",
                         rollups=(Rollup("syscalls_total", ("syscall",)),))


def oversized_block() -> Block:
    """A block with a profile record of ~13 KB (incompressible frames) and a small metric."""
    b = BatchBuilder("n-big", "boot-9", 1, START * NS, (START + 60) * NS, {})
    b.add_counters("syscalls_total", "1", "", ["syscall"], {("read",): 5})
    frames = tuple(secrets.token_hex(32) for _ in range(200))
    b.add_profile("cpu", 1, {ProfileRow(1, "big", "/", None, frames): 1})
    (blk,) = merged_blocks(b.build(), regional_id="contract-big")
    return blk


class Backend(Protocol):
    """One sink kind's side of the contract: how to make it and how to read it back."""

    def sink(self) -> Sink:
        """A sink on a backend that takes data."""

    def unreachable(self) -> Sink:
        """A sink whose backend cannot be reached."""

    async def refusing(self) -> tuple[Sink, list[Block], str]:
        """A sink, blocks its backend will refuse on every attempt, and the reason."""

    async def read_back(self) -> dict[tuple[str, str, str], int]:
        """syscalls_total per (node, syscall, comm), de-duplicated as the sink documents."""


class ClickHouseBackend:
    def __init__(self, chdb_dir: str, anchor: Any) -> None:
        self.dsn = f"chdb://{chdb_dir}"
        self.anchor = anchor
        self.db = f"contract_{uuid.uuid4().hex[:12]}"

    def sink(self) -> Sink:
        return ClickHouseSink(self.dsn, database=self.db)

    def unreachable(self) -> Sink:
        return ClickHouseSink("http://127.0.0.1:1/contract")

    async def refusing(self) -> tuple[Sink, list[Block], str]:
        # a block whose rows name a string its frame does not have: it can never be
        # shaped into rows (a missing database or table is a BlockedError: retried)
        blocks = window_blocks()
        labels = blocks[0].frame.metrics.ragged["labels"][1]
        labels["values"] = labels["values"].copy()
        labels["values"][0] = 10_000_000
        return ClickHouseSink(self.dsn, database=self.db), blocks, "cannot be shaped into rows"

    def blocked(self) -> tuple[Sink, str]:
        return ClickHouseSink(self.dsn, database=f"{self.db}_bare", migrate=False), "missing"

    async def read_back(self) -> dict[tuple[str, str, str], int]:
        rows = self.anchor.query(
            f"SELECT node, labels['syscall'], labels['comm'], sum(value) FROM {self.db}.metrics"
            " WHERE metric = 'syscalls_total' GROUP BY 1, 2, 3").result_rows
        return {(n, s, c): int(v) for n, s, c, v in rows}


class KafkaBackend:
    def __init__(self) -> None:
        self.bootstrap = kafka_bootstrap()
        self.prefix = f"stratoscope-contract-{uuid.uuid4().hex[:12]}"

    def sink(self) -> Sink:
        return KafkaSink(self.bootstrap, topic_prefix=self.prefix, request_timeout_s=30)

    def unreachable(self) -> Sink:
        return KafkaSink("127.0.0.1:1", topic_prefix=self.prefix, request_timeout_s=2)

    async def refusing(self) -> tuple[Sink, list[Block], str]:
        # the profiles topic takes at most 1 KiB per record batch
        prefix = f"{self.prefix}-small"
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=30000)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(name=f"{prefix}.profiles", num_partitions=1, replication_factor=1,
                          topic_configs={"max.message.bytes": "1024"})],
                timeout_ms=30000,
            )
        finally:
            await admin.close()
        sink = KafkaSink(self.bootstrap, topic_prefix=prefix, request_timeout_s=30)
        return sink, [oversized_block()], "MessageSizeTooLargeError"

    async def read_back(self) -> dict[tuple[str, str, str], int]:
        topic = f"{self.prefix}.metrics"
        got = await _consume_all(self.bootstrap, [topic])
        seen: set[tuple[str, str]] = set()
        out: Counter[tuple[str, str, str]] = Counter()
        for rec in got[topic]:
            block_id, batch = decode_message(rec.value, rec.headers)
            key = (dict(rec.headers)["kind"].decode(), block_id)
            if key in seen:
                continue
            seen.add(key)
            d = batch_to_dict(batch)
            for m in d["metrics"]:
                if m["name"] == "syscalls_total":
                    for s in m["series"]:
                        labels = s["labels"]
                        out[(d["node_id"], labels.get("syscall", ""), labels.get("comm", ""))] += s["value"]
        return dict(out)


@pytest.fixture(params=["clickhouse", pytest.param("kafka", marks=pytest.mark.kafka)])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "clickhouse":
        return ClickHouseBackend(request.getfixturevalue("chdb_dir"),
                                 request.getfixturevalue("anchor"))
    return KafkaBackend()


@pytest.fixture
async def sink(backend: Backend) -> AsyncIterator[Sink]:
    s = backend.sink()
    yield s
    await s.stop()


async def test_is_a_sink_and_stop_is_safe_without_start_and_twice(sink: Sink) -> None:
    assert isinstance(sink, Sink)
    await sink.stop()
    await sink.stop()
    await sink.start()
    await sink.start()  # idempotent
    await sink.stop()
    await sink.stop()
    await sink.start()  # and it starts again after a stop
    await sink.health_check()


async def test_health_check_passes_when_started(sink: Sink) -> None:
    await sink.start()
    await sink.health_check()
    await sink.health_check()


async def test_delivers_exact_values_and_a_redelivery_changes_nothing(
    backend: Backend, sink: Sink
) -> None:
    blocks = window_blocks()
    assert [b.node for b in blocks] == ["", "n1", "n2"]  # the roll-up part sorts first
    await sink.start()
    await sink.deliver(blocks)
    assert await backend.read_back() == EXPECTED
    await sink.deliver(blocks)  # a retry of the same blocks
    await sink.deliver(list(reversed(blocks[1:])))  # some of them again, in another order
    assert await backend.read_back() == EXPECTED
    # a restarted regional (a new sink, nothing remembered) sending them once more
    again = backend.sink()
    await again.start()
    try:
        await again.deliver(blocks)
    finally:
        await again.stop()
    assert await backend.read_back() == EXPECTED


async def test_unreachable_backend_is_retriable(backend: Backend) -> None:
    sink = backend.unreachable()
    try:
        with pytest.raises(RetriableError):
            await sink.start()
        with pytest.raises(RetriableError):
            await sink.health_check()
        with pytest.raises(RetriableError):
            await sink.deliver(window_blocks())
    finally:
        await sink.stop()


async def test_missing_database_is_blocked_not_permanent(anchor: Any, chdb_dir: str) -> None:
    """A store without the schema is something a person fixes: BlockedError("missing"),
    retried by the delivery queue, never dropped."""
    sink, reason = ClickHouseBackend(chdb_dir, anchor).blocked()
    await sink.start()
    try:
        with pytest.raises(BlockedError, match="UNKNOWN_DATABASE") as err:
            await sink.deliver(window_blocks())
        assert err.value.reason == reason
    finally:
        await sink.stop()


async def test_refused_blocks_are_permanent(backend: Backend) -> None:
    sink, blocks, reason = await backend.refusing()
    try:
        await sink.start()
        for _ in range(2):  # the same answer on every attempt
            with pytest.raises(PermanentError) as err:
                await sink.deliver(blocks)
            # the error names a refused block and the backend's reason
            assert blocks[0].block_id in str(err.value) and reason in str(err.value), err.value
    finally:
        await sink.stop()
    await sink.stop()
