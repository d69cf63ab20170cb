"""Create the Kafka topics a regional writes to (PREFIX.metrics, .profiles, .events) when
they are missing, and print what it did as one JSON line.

Run by the kafka_topics role with the regional's own venv and settings file, so the
brokers, TLS, SASL and password are exactly the ones the regional uses. Topics that exist
are left as they are (partitions and settings are not changed).

    python stratoscope_kafka_topics.py /etc/stratoscope/regional.yaml PARTITIONS REPLICATION [CONFIG_JSON]
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stratoscope.regional.sinks.config import KafkaSettings
from stratoscope.regional.sinks.kafka import KINDS

#: Kafka's error code for a topic created by someone else meanwhile.
TOPIC_ALREADY_EXISTS = 36


async def ensure_topics(settings: KafkaSettings, partitions: int, replication: int,
                        config: dict[str, str]) -> dict[str, list[str]]:
    """{"created": [...], "existing": [...]} for the regional's topics."""
    wanted = [f"{settings.topic_prefix}.{kind}" for kind in KINDS]
    timeout_ms = int(settings.request_timeout * 1000)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap,
                                request_timeout_ms=timeout_ms, **settings.security())
    await admin.start()
    try:
        have = set(await admin.list_topics())
        missing = [t for t in wanted if t not in have]
        created: list[str] = []
        if missing:
            response: Any = await admin.create_topics(
                [NewTopic(name=t, num_partitions=partitions, replication_factor=replication,
                          topic_configs=config) for t in missing],
                timeout_ms=timeout_ms,
            )
            for topic, code, *message in response.topic_errors:
                if code == 0:
                    created.append(topic)
                elif code != TOPIC_ALREADY_EXISTS:
                    raise RuntimeError(f"creating topic {topic}: error {code} {message}")
    finally:
        await admin.close()
    return {"created": sorted(created), "existing": sorted(set(wanted) - set(created))}


def main(argv: list[str]) -> int:
    if len(argv) not in (4, 5):
        print(__doc__, file=sys.stderr)
        return 2
    settings_file, partitions, replication = Path(argv[1]), int(argv[2]), int(argv[3])
    config = json.loads(argv[4]) if len(argv) == 5 else {}
    section = (yaml.safe_load(settings_file.read_text()) or {}).get("kafka")
    if not section:
        print(f"{settings_file} has no kafka section", file=sys.stderr)
        return 2
    result = asyncio.run(ensure_topics(KafkaSettings(**section), partitions, replication,
                                       {str(k): str(v) for k, v in config.items()}))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
