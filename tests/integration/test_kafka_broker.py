"""End-to-end check against the real Apache Kafka broker started by scripts/kafka.sh.

Run it with:

    scripts/kafka.sh start
    KAFKA_BOOTSTRAP=127.0.0.1:19092 .venv/bin/pytest tests/integration/test_kafka_broker.py -q
    scripts/kafka.sh stop

KAFKA_BOOTSTRAP is required: without it the test fails (it never skips), so a run
that forgot to start the broker cannot pass silently.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.conftest import kafka_bootstrap

pytestmark = pytest.mark.kafka

N_MESSAGES = 1000
CONSUME_DEADLINE_S = 60.0




async def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name=topic, num_partitions=1, replication_factor=1)],
            timeout_ms=30000,
        )
    finally:
        await admin.close()


def _payload(i: int) -> tuple[bytes, bytes]:
    return f"key-{i:04d}".encode(), f"stratoscope-{i:04d}-{'x' * (i % 97)}".encode()


async def test_idempotent_produce_then_consume_exactly_once_in_order() -> None:
    bootstrap = kafka_bootstrap()
    topic = f"stratoscope-it-{uuid.uuid4().hex}"
    await _create_topic(bootstrap, topic)
    expected = [_payload(i) for i in range(N_MESSAGES)]

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        client_id="stratoscope-it-producer",
    )
    await producer.start()
    try:
        futures = [
            await producer.send(topic, key=key, value=value, partition=0) for key, value in expected
        ]
        await producer.flush()
        metadata = await asyncio.gather(*futures)
    finally:
        await producer.stop()

    assert len(metadata) == N_MESSAGES
    assert [m.offset for m in metadata] == list(range(N_MESSAGES))
    assert all(m.topic == topic and m.partition == 0 for m in metadata)

    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        client_id="stratoscope-it-consumer",
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        received: list[tuple[bytes | None, bytes | None]] = []
        offsets: list[int] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONSUME_DEADLINE_S
        while len(received) < N_MESSAGES and loop.time() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            for record in batch.get(tp, []):
                received.append((record.key, record.value))
                offsets.append(record.offset)
        end_offsets = await consumer.end_offsets([tp])
        # Anything still buffered past the 1000th record would be a duplicate.
        extra = await consumer.getmany(tp, timeout_ms=500)
    finally:
        await consumer.stop()

    assert len(received) == N_MESSAGES, (
        f"consumed {len(received)} of {N_MESSAGES} within {CONSUME_DEADLINE_S:.0f}s"
    )
    assert received == expected
    assert offsets == list(range(N_MESSAGES))
    assert end_offsets[tp] == N_MESSAGES
    assert not extra.get(tp)
